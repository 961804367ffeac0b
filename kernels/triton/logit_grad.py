"""The logit gradient over materialised logits with known row statistics.

``store_row_grads`` is the second pass of every backward here: it re-reads a block of rows tile by tile
and writes ``d loss / d logits``. One program owns whole rows and walks their columns left to right,
so the gradient may overwrite its own logits in place, even in a narrower dtype sharing the row's
bytes: the 16-bit gradient of tile ``c`` lands on the fp32 logits of tile ``c // 2``, which this program
has already read (``SYNC_TILES``, see :func:`narrower_in_place`). The vocab schedule of
:mod:`.linear_loss` launches it on a column slice ``[N, Vc]`` of recomputed logits.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import tuning
from .online_softmax import logit_grad_tile
from .token_loss import VARLEN_ARGS


def narrower_in_place(logits: torch.Tensor, grad: torch.Tensor) -> bool:
    """Whether ``grad`` overwrites the bytes of ``logits`` in a narrower dtype (the launches' ``SYNC_TILES``)."""
    return (grad.element_size() < logits.element_size()
            and grad.untyped_storage().data_ptr() == logits.untyped_storage().data_ptr())


@triton.jit
def store_row_grads(logits_ptr, stride_logits, grad_ptr, stride_grad, rows, row_ok, n_cols, col_offset, target,
                    lse, ent, coef_lp, coef_ent, inv_tau, BLOCK_V: tl.constexpr, SYNC_TILES: tl.constexpr):
    """Writes the gradient of ``n_cols`` columns (global ids from ``col_offset``) of a row block.

    ``SYNC_TILES``: the gradient overwrites the logits in a narrower dtype (see the module docstring)."""
    rows64 = rows.to(tl.int64)
    src = logits_ptr + rows64[:, None] * stride_logits
    dst = grad_ptr + rows64[:, None] * stride_grad
    # Rows whose coefficients vanish (masked tokens) get zeros without reading their logits, selected
    # rather than computed: their statistics may be NaN.
    active = row_ok & ((coef_lp != 0) | (coef_ent != 0))
    for c0 in range(0, n_cols, BLOCK_V):
        cols = c0 + tl.arange(0, BLOCK_V)
        inside = cols[None, :] < n_cols
        z = tl.load(src + cols[None, :], mask=active[:, None] & inside, other=float("-inf")).to(tl.float32) * inv_tau
        is_target = (cols[None, :] + col_offset) == target[:, None]
        grad = tl.where(active[:, None], logit_grad_tile(z, is_target, lse, ent, coef_lp, coef_ent), 0.0)
        if SYNC_TILES:
            # Each thread loads and stores its own elements, but a 16-bit store of element j overwrites the
            # fp32 logit j // 2, which another warp of this program loads, maybe later: warps run apart, and
            # nothing else in this loop makes them wait. Storing only after every warp has loaded this tile
            # (and so every earlier one) keeps the stores on bytes already read; without it the compiled loop
            # races and dW silently takes NaN or inf. Prefetches of later tiles are safe: these stores never
            # reach past this tile's bytes.
            tl.debug_barrier()
        tl.store(dst + cols[None, :], grad.to(grad_ptr.dtype.element_ty), mask=row_ok[:, None] & inside)


@triton.jit(do_not_specialize=VARLEN_ARGS)
def _logit_grad_kernel(logits_ptr, stride_logits, grad_ptr, stride_grad, targets_ptr, lse_ptr, ent_ptr, coef_lp_ptr,
                       coef_ent_ptr, N, n_cols, col_offset, inv_tau, ROWS: tl.constexpr, BLOCK_V: tl.constexpr,
                       SYNC_TILES: tl.constexpr):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < N
    target = tl.load(targets_ptr + rows, mask=row_ok, other=-1).to(tl.int64)
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    ent = tl.load(ent_ptr + rows, mask=row_ok, other=0.0)
    coef_lp = tl.load(coef_lp_ptr + rows, mask=row_ok, other=0.0)
    coef_ent = tl.load(coef_ent_ptr + rows, mask=row_ok, other=0.0)
    store_row_grads(logits_ptr, stride_logits, grad_ptr, stride_grad, rows, row_ok, n_cols, col_offset, target, lse,
                    ent, coef_lp, coef_ent, inv_tau, BLOCK_V, SYNC_TILES)


def logit_grad(logits: torch.Tensor, grad: torch.Tensor, targets: torch.Tensor, col_offset: int, stats: dict,
               inv_tau: float) -> None:
    """Writes into ``grad [N, Vc]`` the gradient of the logits slice ``logits [N, Vc]`` (columns
    ``col_offset:col_offset+Vc`` of the vocabulary); ``stats`` as returned by ``token_finish``.
    ``grad`` may alias ``logits`` (see the module docstring)."""
    n, n_cols = logits.shape
    if n == 0 or n_cols == 0:
        return
    blocks = tuning.row_kernel_blocks(n_cols)
    grid = (triton.cdiv(n, blocks["ROWS"]),)
    _logit_grad_kernel[grid](
        logits, logits.stride(0), grad, grad.stride(0), targets, stats["lse"], stats["entropy"], stats["coef_lp"],
        stats["coef_ent"], n, n_cols, col_offset, inv_tau, SYNC_TILES=narrower_in_place(logits, grad), **blocks,
    )
