"""The fused-linear GRPO loss on the GPU: kernels for the softmax work, cuBLAS for the GEMMs.

Two schedules, the same kernels (set ``EKIPL_TRITON_SCHEDULE``; ``EKIPL_TRITON_CHUNK_MB`` sizes the one
scratch buffer of logits):

``rows`` (default, fastest): for each chunk of C rows, ``z = h_c W^T`` (cuBLAS, fp32 out) -> one kernel
    runs the softmax statistics, the token loss and writes ``dz`` over ``z`` in place -> ``dh_c = dz W``
    and ``dW += dz^T h_c`` (cuBLAS, fp32 accumulation). Three GEMMs, the ``6 N H V`` floor; extra memory
    ``4 C V`` bytes for the chunk plus an fp32 ``[V, H]`` accumulator of the weight gradient.
``vocab`` (least memory): the fused forward kernel (``tl.dot`` + online softmax, nothing stored) gives
    every row's statistics; then for each slice of Vc vocabulary columns ``z = h W_s^T`` is recomputed
    (cuBLAS) -> ``dz`` in place -> ``dW_s = dz^T h`` (complete in one GEMM, fp32 inside) and
    ``dh += dz W_s`` (fp32 accumulator). Four GEMMs (``8 N H V``); extra memory ``4 N Vc + 4 N H``
    bytes and a copy of ``h`` (its masked rows zeroed for ``dW``), which does not grow with V.

Both write ``dz`` in the inputs' dtype (the backward GEMMs run on the tensor cores), divided by the
largest aggregation weight so that fp16 does not flush it to zero; the scale is put back in fp32.
"""

from __future__ import annotations

import os

import torch

from .gemm import addmm_fp32_, mm_fp32
from .linear_stats import linear_stats
from .logit_grad import logit_grad
from .logits_loss import logits_loss
from .token_finish import token_finish
from .token_loss import TokenArgs

SCHEDULES = ("rows", "vocab")
DEFAULT_CHUNK_MB = {"rows": 1024, "vocab": 256}
_ROW_ALIGN = 64


def schedule_from_env() -> str:
    schedule = os.environ.get("EKIPL_TRITON_SCHEDULE", "rows")
    if schedule not in SCHEDULES:
        raise ValueError(f"EKIPL_TRITON_SCHEDULE must be one of {SCHEDULES}; got {schedule!r}")
    return schedule


def chunk_bytes(schedule: str) -> int:
    raw = os.environ.get("EKIPL_TRITON_CHUNK_MB")
    try:
        megabytes = DEFAULT_CHUNK_MB[schedule] if raw is None else float(raw)
    except ValueError:
        megabytes = -1.0
    if not megabytes > 0:
        raise ValueError(f"EKIPL_TRITON_CHUNK_MB must be a positive number of MiB; got {raw!r}")
    return int(megabytes * (1 << 20))


def _chunk_len(budget_bytes: int, row_bytes: int, total: int) -> int:
    length = max(1, budget_bytes // row_bytes)
    if length >= _ROW_ALIGN:
        length -= length % _ROW_ALIGN
    return min(length, total)


def _scratch(rows: int, cols: int, dtype: torch.dtype, device: torch.device):
    """An fp32 ``[rows, cols]`` buffer for logits and the ``dtype`` view where their gradient goes:
    the same bytes (each row's gradient in the first half of that row when ``dtype`` is 16-bit)."""
    logits = torch.empty((rows, cols), dtype=torch.float32, device=device)
    grad = logits if dtype == torch.float32 else logits.view(dtype)[:, :cols]
    return logits, grad


def _without_masked_rows(hidden: torch.Tensor, agg_weight: torch.Tensor) -> torch.Tensor:
    """``hidden`` with the rows of masked tokens zeroed for the weight-gradient GEMM: their logit gradient is
    zero, but 0 * NaN is NaN there, and a masked row may hold anything."""
    return torch.where((agg_weight != 0)[:, None], hidden, hidden.new_zeros(()))


def grad_scale(tok: TokenArgs) -> torch.Tensor:
    """The largest |w_t| (1 when all vanish), a device scalar: no host sync."""
    if tok.agg_weight.numel() == 0:
        return torch.ones((), dtype=torch.float32, device=tok.agg_weight.device)
    top = tok.agg_weight.abs().max()
    return torch.where(top > 0, top, torch.ones_like(top))


def fused_linear_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, tok: TokenArgs,
                      inv_tau: float, grad_hidden: bool, grad_weight: bool, schedule: str = "rows"):
    """``(loss, logprobs, entropy, d_hidden | None, d_weight | None)`` of ``sum_t w_t l_t`` over
    ``logits = hidden @ weight.T``; gradients in the inputs' dtypes."""
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}; got {schedule!r}")
    if not (grad_hidden or grad_weight):
        stats = token_finish(linear_stats(hidden, weight, targets, inv_tau), inv_tau, tok, grad_scale(tok))
        return stats["loss"].sum(), stats["logprobs"], stats["entropy"], None, None
    run = _rows_schedule if schedule == "rows" else _vocab_schedule
    return run(hidden, weight, targets, tok, inv_tau, grad_hidden, grad_weight)


def _rows_schedule(hidden, weight, targets, tok, inv_tau, grad_hidden, grad_weight):
    n, h = hidden.shape
    v = weight.shape[0]
    device = hidden.device
    chunk = _chunk_len(chunk_bytes("rows"), 4 * v, n)
    logits_buf, grad_buf = _scratch(chunk, v, hidden.dtype, device)
    scale = grad_scale(tok)
    logprobs = torch.empty(n, dtype=torch.float32, device=device)
    entropy = torch.empty_like(logprobs)
    token_loss = torch.empty_like(logprobs)
    d_hidden = torch.empty_like(hidden) if grad_hidden else None
    d_weight32 = torch.zeros((v, h), dtype=torch.float32, device=device) if grad_weight else None
    d_hidden32 = torch.empty((chunk, h), dtype=torch.float32, device=device) if grad_hidden else None
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        rows = stop - start
        z, dz = logits_buf[:rows], grad_buf[:rows]
        h_c = hidden[start:stop]
        mm_fp32(h_c, weight.T, out=z)
        out = logits_loss(z, targets[start:stop], tok.rows(start, stop), inv_tau, grad=dz, grad_scale=scale)
        logprobs[start:stop] = out["logprobs"]
        entropy[start:stop] = out["entropy"]
        token_loss[start:stop] = out["loss"]
        if grad_hidden:
            mm_fp32(dz, weight, out=d_hidden32[:rows])
            torch.mul(d_hidden32[:rows], scale, out=d_hidden32[:rows])
            d_hidden[start:stop] = d_hidden32[:rows]
        if grad_weight:
            addmm_fp32_(d_weight32, dz.T, _without_masked_rows(h_c, tok.agg_weight[start:stop]))
    d_weight = None
    if grad_weight:
        d_weight = d_weight32.mul_(scale).to(weight.dtype)
    return token_loss.sum(), logprobs, entropy, d_hidden, d_weight


def _vocab_schedule(hidden, weight, targets, tok, inv_tau, grad_hidden, grad_weight):
    n, h = hidden.shape
    v = weight.shape[0]
    device = hidden.device
    scale = grad_scale(tok)
    stats = token_finish(linear_stats(hidden, weight, targets, inv_tau), inv_tau, tok, scale)
    width = _chunk_len(chunk_bytes("vocab"), 4 * max(n, 1), v)
    flat_buf = torch.empty(n * width, dtype=torch.float32, device=device)
    d_hidden32 = torch.zeros((n, h), dtype=torch.float32, device=device) if grad_hidden else None
    d_weight = torch.empty_like(weight) if grad_weight else None
    d_weight32 = torch.empty((width, h), dtype=torch.float32, device=device) if grad_weight else None
    hidden_dw = _without_masked_rows(hidden, tok.agg_weight) if grad_weight else None
    for start in range(0, v, width):
        stop = min(start + width, v)
        cols = stop - start
        # A contiguous [n, cols] view, so that the in-place gradient shares each row's own bytes.
        z = flat_buf[: n * cols].view(n, cols)
        dz = z if hidden.dtype == torch.float32 else z.view(hidden.dtype)[:, :cols]
        w_s = weight[start:stop]
        mm_fp32(hidden, w_s.T, out=z)
        logit_grad(z, dz, targets, start, stats, inv_tau)
        if grad_weight:
            mm_fp32(dz.T, hidden_dw, out=d_weight32[:cols])
            torch.mul(d_weight32[:cols], scale, out=d_weight32[:cols])
            d_weight[start:stop] = d_weight32[:cols]
        if grad_hidden:
            addmm_fp32_(d_hidden32, dz, w_s)
    d_hidden = d_hidden32.mul_(scale).to(hidden.dtype) if grad_hidden else None
    return stats["loss"].sum(), stats["logprobs"], stats["entropy"], d_hidden, d_weight
