"""Sequence-level ratios (``LossConfig.ratio_level="sequence"``, GSPO) on any per-token backend, in two passes.

A token's loss then depends on the log-probs of its whole sequence, which no per-token kernel sees. The first pass
forms every log-prob (and entropy) without gradients; the loss and each token's ``dL/dlp_t`` follow on those
``[N]`` vectors (:func:`~ekipl_kernels.reference.sequence_level_derivatives`); the second pass back-propagates
``sum_t (dL/dlp_t) lp_t - alpha w_t H_t``, whose gradient is the loss's, through the backend's own fused loss. That
surrogate is exactly CISPO's per-token loss at ratio 1 (no old log-probs, so ``d l_t / d lp_t = -A_t``) with
advantages ``A_t = -(dL/dlp_t) / w_t``: every backend runs it unchanged. Cost: one log-prob pass more than a
token-level loss.
"""

from __future__ import annotations

from types import ModuleType

import torch

from .backend_api import FusedResult
from .config import LossConfig
from .inputs import TokenInputs
from .options import KernelOptions
from .reference import sequence_level_derivatives


def _surrogate(tok: TokenInputs, d_logprobs: torch.Tensor, config: LossConfig) -> tuple[TokenInputs, LossConfig]:
    """The per-token inputs and config whose loss has the gradient ``sum_t d_logprobs[t] dlp_t`` plus the entropy
    bonus's (see the module's docstring)."""
    weight = tok.agg_weight
    counted = weight != 0
    advantages = torch.where(counted, -d_logprobs / torch.where(counted, weight, 1.0), 0.0)
    inputs = TokenInputs(advantages, weight, tok.mask, torch.zeros_like(tok.is_expert), None, None, None,
                         tok.seq_start)
    return inputs, LossConfig(policy_loss="cispo", temperature=config.temperature, entropy_coef=config.entropy_coef)


def linear_loss(backend: ModuleType, hidden, weight, targets, tok: TokenInputs, config: LossConfig, *, bias,
                need_entropy, grad_hidden, grad_weight, grad_bias, options: KernelOptions) -> FusedResult:
    """``backend.linear_loss``'s contract for a sequence-level ``config``."""
    with_entropy = need_entropy or config.entropy_coef != 0
    lp, entropy = backend.linear_logprobs(hidden.detach(), weight.detach(), targets, config.temperature, with_entropy,
                                          options, bias=None if bias is None else bias.detach())
    loss, d_lp = sequence_level_derivatives(lp, entropy if config.entropy_coef != 0 else None, tok, config)
    grads = (None, None, None)
    if grad_hidden or grad_weight or grad_bias:
        surrogate_tok, surrogate_config = _surrogate(tok, d_lp, config)
        second = backend.linear_loss(hidden, weight, targets, surrogate_tok, surrogate_config, bias=bias,
                                     need_entropy=False, grad_hidden=grad_hidden, grad_weight=grad_weight,
                                     grad_bias=grad_bias, options=options)
        grads = (second.grad_input, second.grad_weight, second.grad_bias)
    return FusedResult(loss, lp, entropy if need_entropy else None, *grads)


def logits_loss(backend: ModuleType, logits, targets, tok: TokenInputs, config: LossConfig, *, need_entropy,
                grad_logits) -> FusedResult:
    """``backend.logits_loss``'s contract for a sequence-level ``config``."""
    with_entropy = need_entropy or config.entropy_coef != 0
    # The first pass: the backend's loss without gradients, for its log-probs and entropies only.
    first = backend.logits_loss(logits, targets, tok, LossConfig(temperature=config.temperature),
                                need_entropy=with_entropy, grad_logits=False)
    loss, d_lp = sequence_level_derivatives(first.logprobs, first.entropy if config.entropy_coef != 0 else None,
                                            tok, config)
    grad = None
    if grad_logits:
        surrogate_tok, surrogate_config = _surrogate(tok, d_lp, config)
        grad = backend.logits_loss(logits, targets, surrogate_tok, surrogate_config, need_entropy=False,
                                   grad_logits=True).grad_input
    return FusedResult(loss, first.logprobs, first.entropy if need_entropy else None, grad, None)
