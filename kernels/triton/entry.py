"""The three ``ekipl::`` ops on top of the kernels, with the ops' signatures and return conventions
(outputs that were not asked for are empty tensors). The kernels take fp32, bf16 and fp16 inputs; fp64 is
refused (its gradient does not fit the fp32 scratch it is written into in place), and the public functions
send it to the chunked backend. Targets are made contiguous: the kernels index them by row. ``schedule``,
``path`` and ``scratch_bytes`` are the caller's decisions (see ``ops.py``).
"""

from __future__ import annotations

import torch

from ..ops import SCHEDULES
from ..options import LOGPROBS_PATHS
from .linear_loss import cublas_logprobs, fused_linear_loss
from .linear_stats import linear_stats
from .logits_loss import logits_loss
from .token_finish import token_finish
from .token_loss import token_args


def _empty(like: torch.Tensor, dtype=None) -> torch.Tensor:
    return like.new_empty(0, dtype=dtype or like.dtype)


_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _check_dtype(op: str, x: torch.Tensor) -> None:
    if x.dtype not in _DTYPES:
        raise ValueError(f"ekipl::{op} on the triton backend takes fp32, bf16 or fp16 inputs; got {x.dtype} "
                         "(use backend='chunked' for fp64, as backend=None does)")


def _inv_tau(temperature: float) -> float:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0; got {temperature}")
    return 1.0 / temperature


def fused_linear_grpo_loss(hidden, weight, targets, advantages, agg_weight, is_expert, old_logprobs, ref_logprobs,
                           behavior_logprobs, scalars, need_entropy, grad_hidden, grad_weight, schedule=0,
                           scratch_bytes=0, bias=None, grad_bias=False):
    _check_dtype("fused_linear_grpo_loss", hidden)
    tok = token_args(advantages, agg_weight, is_expert, old_logprobs, ref_logprobs, behavior_logprobs, scalars)
    n = hidden.shape[0]
    grad_bias = grad_bias and bias is not None
    if n == 0:
        zero = hidden.new_zeros((), dtype=torch.float32)
        return (zero, _empty(hidden, torch.float32), _empty(hidden, torch.float32),
                torch.zeros_like(hidden) if grad_hidden else _empty(hidden),
                torch.zeros_like(weight) if grad_weight else _empty(weight),
                torch.zeros_like(bias) if grad_bias else _empty(weight))
    loss, lp, ent, d_hidden, d_weight, d_bias = fused_linear_loss(
        hidden.detach(), weight.detach(), _bias(bias, weight), targets.contiguous(), tok,
        _inv_tau(tok.scalar("temperature")), grad_hidden, grad_weight, grad_bias,
        _choice("schedule", SCHEDULES, schedule), _scratch(scratch_bytes),
    )
    return (loss, lp, ent if need_entropy else _empty(lp), _empty(hidden) if d_hidden is None else d_hidden,
            _empty(weight) if d_weight is None else d_weight, _empty(weight) if d_bias is None else d_bias)


def grpo_loss(logits, targets, advantages, agg_weight, is_expert, old_logprobs, ref_logprobs, behavior_logprobs,
              scalars, need_entropy, grad_logits):
    _check_dtype("grpo_loss", logits)
    tok = token_args(advantages, agg_weight, is_expert, old_logprobs, ref_logprobs, behavior_logprobs, scalars)
    logits = logits.detach()
    grad = torch.empty_like(logits, memory_format=torch.contiguous_format) if grad_logits else None
    out = logits_loss(logits, targets.contiguous(), tok, _inv_tau(tok.scalar("temperature")), grad=grad)
    return (out["loss"].sum(), out["logprobs"], out["entropy"] if need_entropy else _empty(out["logprobs"]),
            _empty(logits) if grad is None else grad)


def fused_linear_logprobs(hidden, weight, targets, temperature, need_entropy, path=0, scratch_bytes=0, bias=None):
    _check_dtype("fused_linear_logprobs", hidden)
    inv_tau = _inv_tau(temperature)
    hidden, weight, targets, bias = hidden.detach(), weight.detach(), targets.contiguous(), _bias(bias, weight)
    if _choice("path", LOGPROBS_PATHS, path) == "cublas":
        lp, ent = cublas_logprobs(hidden, weight, targets, inv_tau, _scratch(scratch_bytes), bias)
    else:
        stats = token_finish(linear_stats(hidden, weight, targets, inv_tau, bias), inv_tau)
        lp, ent = stats["logprobs"], stats["entropy"]
    return lp, ent if need_entropy else _empty(lp)


def _bias(bias, weight):
    """The bias as the kernels and GEMM epilogues read it: detached, contiguous, checked against the weight."""
    if bias is None:
        return None
    if bias.shape != (weight.shape[0],) or bias.dtype != weight.dtype or bias.device != weight.device:
        raise ValueError(f"bias must be [{weight.shape[0]}] {weight.dtype} on {weight.device} like the weight's rows; "
                         f"got {list(bias.shape)} {bias.dtype} on {bias.device}")
    return bias.detach().contiguous()


def _choice(name: str, names: tuple, index: int) -> str:
    if not 0 <= index < len(names):
        raise ValueError(f"{name} must index {names}; got {index}")
    return names[index]


def _scratch(scratch_bytes: int) -> int:
    if scratch_bytes < 0:
        raise ValueError(f"scratch_bytes must be >= 0 (0: the default); got {scratch_bytes}")
    return scratch_bytes
