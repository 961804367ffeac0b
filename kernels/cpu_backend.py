"""Backend "cpu": the fused C++ op (``csrc/grpo_loss_cpu.cpp``) behind the contract of ``backend_api``.

The op is built just in time on first use (:mod:`~ekipl_kernels.op_builder`); :func:`ensure_available`
raises :class:`~ekipl_kernels.backends.BackendUnavailable` with the compiler's message if it cannot be.
"""

from __future__ import annotations

import torch

from .backend_api import FusedResult
from .config import LossConfig
from .inputs import TokenInputs
from .loss_scalars import loss_scalars
from .op_builder import load_cpu_op
from .options import KernelOptions


def ensure_available() -> None:
    load_cpu_op()


def _token_args(tok: TokenInputs) -> tuple:
    return (tok.advantages, tok.agg_weight, tok.is_expert, tok.old_logprobs, tok.ref_logprobs, tok.behavior_logprobs)


def linear_loss(
    hidden, weight, targets, tok: TokenInputs, config: LossConfig, *, bias, need_entropy, grad_hidden, grad_weight,
    grad_bias, options: KernelOptions,
):
    loss, logprobs, entropy, d_hidden, d_weight, d_bias = torch.ops.ekipl.fused_linear_grpo_loss(
        hidden.detach(), weight.detach(), targets, *_token_args(tok), scalars=loss_scalars(config),
        need_entropy=need_entropy, grad_hidden=grad_hidden, grad_weight=grad_weight,
        scratch_bytes=options.scratch_bytes("cpu_chunk_mb"), bias=None if bias is None else bias.detach(),
        grad_bias=grad_bias,
    )
    return FusedResult(
        loss, logprobs, entropy if need_entropy else None, d_hidden if grad_hidden else None,
        d_weight if grad_weight else None, d_bias if grad_bias else None,
    )


def logits_loss(logits, targets, tok: TokenInputs, config: LossConfig, *, need_entropy, grad_logits):
    loss, logprobs, entropy, d_logits = torch.ops.ekipl.grpo_loss(
        logits.detach(), targets, *_token_args(tok), scalars=loss_scalars(config), need_entropy=need_entropy,
        grad_logits=grad_logits,
    )
    return FusedResult(loss, logprobs, entropy if need_entropy else None, d_logits if grad_logits else None, None)


def linear_logprobs(hidden, weight, targets, temperature: float, return_entropy: bool, options: KernelOptions,
                    bias=None):
    logprobs, entropy = torch.ops.ekipl.fused_linear_logprobs(
        hidden, weight, targets, temperature, return_entropy, scratch_bytes=options.scratch_bytes("cpu_chunk_mb"),
        bias=bias,
    )
    return logprobs, entropy if return_entropy else None
