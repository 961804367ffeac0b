"""The contract every fast backend (``chunked``, ``cpu``, ``triton``) implements.

A backend module exposes three functions; all of them work on validated inputs and per-token vectors
(:class:`~ekipl_kernels.inputs.TokenInputs`), so the aggregation rules live in one place:

``linear_loss(hidden, weight, targets, tok, config, *, bias, need_entropy, grad_hidden, grad_weight, grad_bias, options) -> FusedResult``
    ``loss = sum_t tok.agg_weight[t] * l_t`` over ``logits = hidden @ weight.T + bias`` (``bias [V]`` or None),
    with its gradients with respect to ``hidden``, ``weight`` and ``bias`` (same dtypes as the inputs) formed
    during the forward.
``logits_loss(logits, targets, tok, config, *, need_entropy, grad_logits) -> FusedResult``
    The same over materialised logits; ``grad_input`` is the logits gradient.
``linear_logprobs(hidden, weight, targets, temperature, return_entropy, options, bias=None) -> (logprobs, entropy | None)``
    fp32 ``[N]`` vectors; no gradient.

``options`` is the caller's :class:`~ekipl_kernels.options.KernelOptions` (environment applied); a backend
reads the fields that concern it.

Gradients are of the loss itself; the autograd wrapper scales them by the incoming gradient.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass
class FusedResult:
    loss: torch.Tensor  # 0-dim fp32
    logprobs: torch.Tensor  # [N] fp32
    entropy: Optional[torch.Tensor]  # [N] fp32, when asked for
    grad_input: Optional[torch.Tensor]  # d loss / d hidden (or logits)
    grad_weight: Optional[torch.Tensor]  # d loss / d weight
    grad_bias: Optional[torch.Tensor] = None  # d loss / d bias
