"""The fused-linear GRPO loss on the GPU: kernels for the softmax work, cuBLAS for the GEMMs.

Two schedules, the same kernels (``KernelOptions.schedule``; :func:`plan` picks one and sizes the one
scratch buffer of fp32 logits, from ``KernelOptions.chunk_mb`` and ``memory_budget_mb``):

``rows`` (fastest): for each chunk of C rows, ``z = h_c W^T`` (cuBLAS, fp32 out) -> one kernel runs the
    softmax statistics, the token loss and writes ``dz`` over ``z`` in place -> ``dh_c = dz W`` and
    ``dW (+)= dz^T h_c`` (cuBLAS, fp32 accumulation; the first chunk writes it, so no zero fill). Three GEMMs,
    the ``6 N H V`` floor; extra memory an fp32 ``[V, H]`` accumulator (the gradient itself for fp32) and
    the chunk, which is freed before the accumulator is cast to the weight's dtype.
``vocab`` (least memory): the fused forward kernel (``tl.dot`` + online softmax, nothing stored) gives
    every row's statistics; then for each slice of Vc vocabulary columns ``z = h W_s^T`` is recomputed
    (cuBLAS) -> ``dz`` in place -> ``dW_s = dz^T h`` (complete in one GEMM, fp32 inside) and
    ``dh (+)= dz W_s`` (fp32 accumulator). Four GEMMs (``8 N H V``); extra memory ``4 N Vc`` for the
    slice, ``4 N H`` for the accumulator and a copy of ``h`` with its masked rows zeroed: nothing grows
    with V. Each slice re-reads ``h`` and the accumulator, so slices are at least H columns wide by
    default (the scratch at least an fp32 ``[N, H]``), however large N is.

With the LM head's bias, each chunk or slice of logits gets its columns of it after the GEMM (the fused forward
adds it per tile), and the bias gradient is the column sums of ``dz``, one reduction per chunk or slice.

Both write ``dz`` in the inputs' dtype (the backward GEMMs run on the tensor cores). For fp16 it is divided
by the largest aggregation weight, so that fp16 does not flush it to zero, and the scale is put back in
fp32; bf16 has fp32's exponent range and skips that pass.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton

from ..ops import SCHEDULES
from .gemm import addmm_fp32_, mm_fp32
from .linear_stats import linear_stats
from .logit_grad import logit_grad
from .logits_loss import logits_loss
from .token_finish import token_finish
from .token_loss import TokenArgs

DEFAULT_SCRATCH_MB = {"rows": 1024, "vocab": 256}
_ALIGN = 64
# Below this many rows per chunk, "auto" under a memory budget prefers vocab: each rows chunk streams W
# twice and the fp32 dW accumulator in and out (~12 V H bytes) against its 6 C V H FLOPs, which on an
# H100-class GPU (~200 FLOP per byte) costs as much as vocab's fourth GEMM when C is about 1000.
MIN_ROWS_CHUNK = 1024


def chunk_len(budget_bytes: int, unit_bytes: int, total: int) -> int:
    """Rows (or columns) per chunk: as many as ``budget_bytes`` holds at ``unit_bytes`` each, a multiple of 64
    when that many fit, spread evenly over the chunks needed (no small last chunk, whose GEMMs would stream
    the whole weight for a few rows)."""
    most = max(1, budget_bytes // max(1, unit_bytes))
    if most >= total:
        return max(1, total)
    if most >= _ALIGN:
        most -= most % _ALIGN
    even = triton.cdiv(total, triton.cdiv(total, most))
    if most >= _ALIGN:
        even = min(most, triton.cdiv(even, _ALIGN) * _ALIGN)
    return even


def _memory(schedule: str, n: int, h: int, v: int, element: int, grad_hidden: bool, grad_weight: bool):
    """``(fixed, per_unit, end)`` bytes the schedule allocates beyond its inputs, the returned gradients
    included: ``fixed + per_unit * C`` while chunks of C rows (rows) or slices of C columns (vocab) run,
    ``end`` after the scratch is freed. Per-token vectors (tens of bytes per row) are left out."""
    narrow = element != 4  # 16-bit inputs: fp32 accumulators and GEMM results, cast at the end
    if schedule == "rows":
        d_hidden = n * h * element if grad_hidden else 0
        acc = 4 * v * h if grad_weight else 0
        per_row = 4 * v + (4 * h if grad_hidden and narrow else 0) + (h * element if grad_weight else 0)
        return d_hidden + acc, per_row, d_hidden + acc + (v * h * element if grad_weight and narrow else 0)
    d_weight = v * h * element if grad_weight else 0
    masked_hidden = n * h * element if grad_weight else 0
    acc = 4 * n * h if grad_hidden else 0
    per_col = 4 * n + (4 * h if grad_weight and narrow else 0)
    return d_weight + masked_hidden + acc, per_col, d_weight + acc + (n * h * element if grad_hidden and narrow else 0)


def _unit_bytes(schedule: str, n: int, v: int) -> int:
    """Scratch bytes per chunk row (rows) or slice column (vocab)."""
    return 4 * v if schedule == "rows" else 4 * max(n, 1)


def default_scratch(schedule: str, n: int, h: int) -> int:
    scratch = DEFAULT_SCRATCH_MB[schedule] << 20
    return scratch if schedule == "rows" else max(scratch, 4 * n * h)


def peak_bytes(schedule: str, n: int, h: int, v: int, dtype: torch.dtype, grad_hidden: bool, grad_weight: bool,
               scratch_bytes: int) -> int:
    """The most memory ``schedule`` allocates beyond its inputs with this scratch, returned gradients included."""
    fixed, per_unit, end = _memory(schedule, n, h, v, torch.finfo(dtype).bits // 8, grad_hidden, grad_weight)
    units = chunk_len(scratch_bytes, _unit_bytes(schedule, n, v), n if schedule == "rows" else v)
    return max(fixed + per_unit * units, end)


def plan(n: int, h: int, v: int, dtype: torch.dtype, grad_hidden: bool, grad_weight: bool, schedule: str,
         scratch_bytes: int = 0, budget_bytes: Optional[int] = None) -> tuple[str, int]:
    """``(schedule, scratch bytes)`` to run: ``schedule`` is "auto", "rows" or "vocab"; ``scratch_bytes`` 0
    asks for the default; ``budget_bytes`` (None: none) caps the peak of :func:`peak_bytes`.

    "auto" runs rows unless a budget leaves it fewer than ``MIN_ROWS_CHUNK`` rows per chunk (or none); a
    budget below what vocab needs runs vocab with its narrowest slices."""
    element = torch.finfo(dtype).bits // 8

    def fitted(name: str) -> tuple[int, int]:
        """(scratch bytes within the budget, units it holds); the units are 0 when none fits."""
        wanted = scratch_bytes or default_scratch(name, n, h)
        unit = _unit_bytes(name, n, v)
        if budget_bytes is None:
            return wanted, wanted // unit
        fixed, per_unit, end = _memory(name, n, h, v, element, grad_hidden, grad_weight)
        fit = 0 if end > budget_bytes else max(0, budget_bytes - fixed) // per_unit
        units = min(wanted // unit, fit)
        return max(units, min(_ALIGN, n if name == "rows" else v)) * unit, units

    if schedule == "auto":
        rows_scratch, rows_units = fitted("rows")
        schedule = "rows" if budget_bytes is None or rows_units >= min(MIN_ROWS_CHUNK, n) else "vocab"
        if schedule == "rows":
            return schedule, rows_scratch
    return schedule, fitted(schedule)[0]


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


def grad_scale(tok: TokenArgs, dtype: torch.dtype) -> Optional[torch.Tensor]:
    """For fp16: the largest |w_t| (1 when all vanish), a device scalar (no host sync); None otherwise."""
    if dtype != torch.float16:
        return None
    if tok.agg_weight.numel() == 0:
        return torch.ones((), dtype=torch.float32, device=tok.agg_weight.device)
    top = tok.agg_weight.abs().max()
    return torch.where(top > 0, top, torch.ones_like(top))


def _cast(acc32: torch.Tensor, scale: Optional[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """An fp32 accumulator as the gradient: scaled back, in the inputs' dtype (itself for fp32)."""
    if scale is not None:
        acc32.mul_(scale)
    return acc32.to(dtype)


def fused_linear_loss(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], targets: torch.Tensor,
                      tok: TokenArgs, inv_tau: float, grad_hidden: bool, grad_weight: bool, grad_bias: bool,
                      schedule: str = "rows", scratch_bytes: int = 0):
    """``(loss, logprobs, entropy, d_hidden | None, d_weight | None, d_bias | None)`` of ``sum_t w_t l_t`` over
    ``logits = hidden @ weight.T + bias``; gradients in the inputs' dtypes. ``scratch_bytes`` 0: the default."""
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}; got {schedule!r}")
    grad_bias = grad_bias and bias is not None
    if not (grad_hidden or grad_weight or grad_bias):
        stats = token_finish(linear_stats(hidden, weight, targets, inv_tau, bias), inv_tau, tok)
        return stats["loss"].sum(), stats["logprobs"], stats["entropy"], None, None, None
    run = _rows_schedule if schedule == "rows" else _vocab_schedule
    scratch = scratch_bytes or default_scratch(schedule, hidden.shape[0], hidden.shape[1])
    return run(hidden, weight, bias, targets, tok, inv_tau, grad_hidden, grad_weight, grad_bias, scratch)


def _column_sums_(acc32: torch.Tensor, dz: torch.Tensor) -> None:
    """Adds the column sums of a logit gradient (any dtype) to an fp32 bias-gradient accumulator."""
    acc32.add_(dz.sum(0, dtype=torch.float32))


def _rows_schedule(hidden, weight, bias, targets, tok, inv_tau, grad_hidden, grad_weight, grad_bias, scratch_bytes):
    n, h = hidden.shape
    v = weight.shape[0]
    device, dtype = hidden.device, hidden.dtype
    chunk = chunk_len(scratch_bytes, 4 * v, n)
    logits_buf, grad_buf = _scratch(chunk, v, dtype, device)
    scale = grad_scale(tok, dtype)
    logprobs = torch.empty(n, dtype=torch.float32, device=device)
    entropy = torch.empty_like(logprobs)
    token_loss = torch.empty_like(logprobs)
    d_hidden = torch.empty_like(hidden) if grad_hidden else None
    narrow = dtype != torch.float32  # 16-bit inputs: GEMM results in fp32 first, then cast
    d_hidden32 = torch.empty((chunk, h), dtype=torch.float32, device=device) if grad_hidden and narrow else None
    d_weight32 = torch.empty((v, h), dtype=torch.float32, device=device) if grad_weight else None
    d_bias32 = torch.zeros(v, dtype=torch.float32, device=device) if grad_bias else None
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        rows = stop - start
        z, dz = logits_buf[:rows], grad_buf[:rows]
        h_c = hidden[start:stop]
        mm_fp32(h_c, weight.T, out=z)
        if bias is not None:
            z.add_(bias)
        out = logits_loss(z, targets[start:stop], tok.rows(start, stop), inv_tau, grad=dz, grad_scale=scale)
        if grad_bias:
            _column_sums_(d_bias32, dz)
        logprobs[start:stop] = out["logprobs"]
        entropy[start:stop] = out["entropy"]
        token_loss[start:stop] = out["loss"]
        if grad_hidden and d_hidden32 is None:
            mm_fp32(dz, weight, out=d_hidden[start:stop])
        elif grad_hidden:
            d_c = mm_fp32(dz, weight, out=d_hidden32[:rows])
            d_hidden[start:stop] = d_c if scale is None else d_c.mul_(scale)
        if grad_weight:
            h_live = _without_masked_rows(h_c, tok.agg_weight[start:stop])
            if start == 0:
                mm_fp32(dz.T, h_live, out=d_weight32)
            else:
                addmm_fp32_(d_weight32, dz.T, h_live)
    # The chunk goes before the accumulator is cast: the cast's output is the peak's last addition.
    del logits_buf, grad_buf, z, dz, d_hidden32
    d_weight = _cast(d_weight32, scale, weight.dtype) if grad_weight else None
    d_bias = _cast(d_bias32, scale, weight.dtype) if grad_bias else None
    return token_loss.sum(), logprobs, entropy, d_hidden, d_weight, d_bias


def _vocab_schedule(hidden, weight, bias, targets, tok, inv_tau, grad_hidden, grad_weight, grad_bias, scratch_bytes):
    n, h = hidden.shape
    v = weight.shape[0]
    device, dtype = hidden.device, hidden.dtype
    scale = grad_scale(tok, dtype)
    stats = token_finish(linear_stats(hidden, weight, targets, inv_tau, bias), inv_tau, tok, scale)
    width = chunk_len(scratch_bytes, 4 * n, v)
    flat_buf = torch.empty(n * width, dtype=torch.float32, device=device)
    d_hidden32 = torch.empty((n, h), dtype=torch.float32, device=device) if grad_hidden else None
    d_weight = torch.empty_like(weight) if grad_weight else None
    narrow = dtype != torch.float32  # 16-bit inputs: GEMM results in fp32 first, then cast
    d_weight32 = torch.empty((width, h), dtype=torch.float32, device=device) if grad_weight and narrow else None
    hidden_dw = _without_masked_rows(hidden, tok.agg_weight) if grad_weight else None
    d_bias32 = torch.zeros(v, dtype=torch.float32, device=device) if grad_bias else None
    for start in range(0, v, width):
        stop = min(start + width, v)
        cols = stop - start
        # A contiguous [n, cols] view, so that the in-place gradient shares each row's own bytes.
        z = flat_buf[: n * cols].view(n, cols)
        dz = z if dtype == torch.float32 else z.view(dtype)[:, :cols]
        w_s = weight[start:stop]
        mm_fp32(hidden, w_s.T, out=z)
        if bias is not None:
            z.add_(bias[start:stop])
        logit_grad(z, dz, targets, start, stats, inv_tau)
        if grad_bias:
            _column_sums_(d_bias32[start:stop], dz)
        if grad_weight and d_weight32 is None:
            mm_fp32(dz.T, hidden_dw, out=d_weight[start:stop])
        elif grad_weight:
            d_s = mm_fp32(dz.T, hidden_dw, out=d_weight32[:cols])
            d_weight[start:stop] = d_s if scale is None else d_s.mul_(scale)
        if grad_hidden:
            if start == 0:
                mm_fp32(dz, w_s, out=d_hidden32)
            else:
                addmm_fp32_(d_hidden32, dz, w_s)
    del flat_buf, z, dz, d_weight32, hidden_dw
    d_hidden = _cast(d_hidden32, scale, dtype) if grad_hidden else None
    d_bias = _cast(d_bias32, scale, weight.dtype) if grad_bias else None
    return stats["loss"].sum(), stats["logprobs"], stats["entropy"], d_hidden, d_weight, d_bias


def cublas_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, inv_tau: float,
                    scratch_bytes: int = 0, bias: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 ``(logprobs, entropy)`` ``[N]``: chunks of fp32 logits from cuBLAS, one Triton sweep over each."""
    n = hidden.shape[0]
    v = weight.shape[0]
    logprobs = torch.empty(n, dtype=torch.float32, device=hidden.device)
    entropy = torch.empty_like(logprobs)
    if n == 0:
        return logprobs, entropy
    chunk = chunk_len(scratch_bytes or default_scratch("rows", n, hidden.shape[1]), 4 * v, n)
    logits_buf = torch.empty((chunk, v), dtype=torch.float32, device=hidden.device)
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        z = mm_fp32(hidden[start:stop], weight.T, out=logits_buf[: stop - start])
        if bias is not None:
            z.add_(bias)
        out = logits_loss(z, targets[start:stop], None, inv_tau)
        logprobs[start:stop] = out["logprobs"]
        entropy[start:stop] = out["entropy"]
    return logprobs, entropy
