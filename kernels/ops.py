"""The ``ekipl::`` operator schemas shared by the C++ CPU op and the Triton CUDA kernels.

One schema per op, defined here once; the C++ library registers its CPU implementation
(``TORCH_LIBRARY_IMPL(ekipl, CPU, m)``) and the Triton backend its CUDA one, so that a call dispatches by
device and ``torch.compile`` sees an opaque op with a known output shape (the fake implementations).

The loss ops take the per-token vectors of :class:`~ekipl_kernels.inputs.TokenInputs` and the config as one
vector ``scalars``, :func:`ekipl_kernels.loss_scalars.loss_scalars` (its table says what each entry means and
in which order). The linear ops take the LM head's ``bias [V]`` (None: none) last, the loss op its gradient
``grad_bias`` (column sums of the logit gradient). Outputs that were not asked for are empty.

How to compute, as decided by the caller (``KernelOptions``): ``schedule`` of the loss (an index into
:data:`SCHEDULES`), ``path`` of the log-probs (an index into ``options.LOGPROBS_PATHS``), and ``scratch_bytes``,
the budget of the buffer of logits (0: the implementation's default). The CPU op has one way of each and
reads only ``scratch_bytes``.
"""

from __future__ import annotations

import torch

SCHEDULES = ("rows", "vocab")

_TOKEN_ARGS = (
    "Tensor advantages, Tensor agg_weight, Tensor is_expert, Tensor? old_logprobs, Tensor? ref_logprobs, "
    "Tensor? behavior_logprobs, float[] scalars, bool need_entropy"
)

LIB = torch.library.Library("ekipl", "DEF")
LIB.define(
    f"fused_linear_grpo_loss(Tensor hidden, Tensor weight, Tensor targets, {_TOKEN_ARGS}, bool grad_hidden, "
    "bool grad_weight, int schedule=0, int scratch_bytes=0, Tensor? bias=None, bool grad_bias=False) "
    "-> (Tensor loss, Tensor logprobs, Tensor entropy, Tensor grad_hidden, Tensor grad_weight, Tensor grad_bias)"
)
LIB.define(
    f"grpo_loss(Tensor logits, Tensor targets, {_TOKEN_ARGS}, bool grad_logits) "
    "-> (Tensor loss, Tensor logprobs, Tensor entropy, Tensor grad_logits)"
)
LIB.define(
    "fused_linear_logprobs(Tensor hidden, Tensor weight, Tensor targets, float temperature, bool need_entropy, "
    "int path=0, int scratch_bytes=0, Tensor? bias=None) -> (Tensor logprobs, Tensor entropy)"
)


def _vector(like: torch.Tensor, n: int, wanted: bool) -> torch.Tensor:
    return like.new_empty(n if wanted else 0, dtype=torch.float32)


@torch.library.register_fake("ekipl::fused_linear_grpo_loss")
def _(hidden, weight, targets, advantages, agg_weight, is_expert, old_logprobs, ref_logprobs, behavior_logprobs,
      scalars, need_entropy, grad_hidden, grad_weight, schedule=0, scratch_bytes=0, bias=None, grad_bias=False):
    n = hidden.shape[0]
    return (
        hidden.new_empty((), dtype=torch.float32),
        _vector(hidden, n, True),
        _vector(hidden, n, need_entropy),
        torch.empty_like(hidden) if grad_hidden else hidden.new_empty(0),
        torch.empty_like(weight) if grad_weight else weight.new_empty(0),
        weight.new_empty(weight.shape[0] if grad_bias and bias is not None else 0),
    )


@torch.library.register_fake("ekipl::grpo_loss")
def _(logits, targets, advantages, agg_weight, is_expert, old_logprobs, ref_logprobs, behavior_logprobs, scalars,
      need_entropy, grad_logits):
    n = logits.shape[0]
    return (
        logits.new_empty((), dtype=torch.float32),
        _vector(logits, n, True),
        _vector(logits, n, need_entropy),
        torch.empty_like(logits) if grad_logits else logits.new_empty(0),
    )


@torch.library.register_fake("ekipl::fused_linear_logprobs")
def _(hidden, weight, targets, temperature, need_entropy, path=0, scratch_bytes=0, bias=None):
    n = hidden.shape[0]
    return _vector(hidden, n, True), _vector(hidden, n, need_entropy)
