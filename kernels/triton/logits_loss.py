"""The GRPO loss over materialised logits in one kernel: each program takes a block of rows, runs the
online log-sum-exp / entropy over their vocabulary, forms the token loss and its derivative, then
writes the logit gradient in a second sweep of the same rows (served mostly from L2: the rows were
just read). Used for ``grpo_loss`` and, on row chunks of recomputed logits, by :mod:`.linear_loss`;
without token inputs it gives the log-probs and entropies alone (the "cublas" log-probs path).
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from . import tuning
from .logit_grad import narrower_in_place, store_row_grads
from .online_softmax import finish_state, merge_tile
from .token_loss import TOKEN_INT_ARGS, VARLEN_ARGS, TokenArgs, load_token_loss


@triton.jit(do_not_specialize=TOKEN_INT_ARGS + VARLEN_ARGS)
def _logits_loss_kernel(
    logits_ptr, stride_logits, grad_ptr, stride_grad, targets_ptr, lp_out, ent_out, loss_out, scale_ptr,
    N, V, inv_tau,
    adv_ptr, w_ptr, expert_ptr, old_ptr, ref_ptr, beh_ptr, has_old, scalars_ptr,
    ROWS: tl.constexpr, BLOCK_V: tl.constexpr, WITH_LOSS: tl.constexpr, WRITE_GRAD: tl.constexpr,
    SYNC_TILES: tl.constexpr,
):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < N
    rows64 = rows.to(tl.int64)
    src = logits_ptr + rows64[:, None] * stride_logits
    m = tl.full([ROWS], float("-inf"), tl.float32)
    s = tl.zeros([ROWS], tl.float32)
    t = tl.zeros([ROWS], tl.float32)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        z = tl.load(src + cols[None, :], mask=row_ok[:, None] & (cols[None, :] < V), other=float("-inf"))
        m, s, t = merge_tile(m, s, t, z.to(tl.float32) * inv_tau)
    lse, ent = finish_state(m, s, t)
    lse = tl.where(row_ok, lse, 0.0)  # rows past N stay finite (no inf * 0 below)
    target = tl.load(targets_ptr + rows, mask=row_ok, other=0).to(tl.int64)
    # Targets are checked on the host only when that costs nothing (or when debugging): never read outside the row.
    target_ok = row_ok & (target >= 0) & (target < V)
    target_logit = tl.load(logits_ptr + rows64 * stride_logits + target, mask=target_ok, other=0.0).to(tl.float32)
    lp = target_logit * inv_tau - lse
    tl.store(lp_out + rows, lp, mask=row_ok)
    tl.store(ent_out + rows, ent, mask=row_ok)
    if WITH_LOSS:
        w_loss, w_d_lp, w_d_ent = load_token_loss(rows, row_ok, lp, ent, adv_ptr, w_ptr, expert_ptr, old_ptr, ref_ptr,
                                                  beh_ptr, has_old, scalars_ptr)
        tl.store(loss_out + rows, w_loss, mask=row_ok)
        if WRITE_GRAD:
            coef = inv_tau / tl.load(scale_ptr)
            store_row_grads(logits_ptr, stride_logits, grad_ptr, stride_grad, rows, row_ok, V, 0, target, lse, ent,
                            coef * w_d_lp, coef * w_d_ent, inv_tau, BLOCK_V, SYNC_TILES)


def logits_loss(logits: torch.Tensor, targets: torch.Tensor, tok: Optional[TokenArgs], inv_tau: float,
                grad: Optional[torch.Tensor] = None, grad_scale: Optional[torch.Tensor] = None) -> dict:
    """Per-token ``logprobs`` and ``entropy``, fp32 ``[N]``, of ``logits [N, V]``; with ``tok`` also ``loss``
    (``w_t l_t``), and with ``grad [N, V]`` (which may alias ``logits``) writes ``d loss / d logits / grad_scale``
    (``grad_scale`` None: 1)."""
    n, v = logits.shape
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    new = lambda: torch.empty(n, dtype=torch.float32, device=logits.device)  # noqa: E731
    out = {"logprobs": new(), "entropy": new()}
    if tok is not None:
        out["loss"] = new()
    if n == 0:
        return out
    if grad is not None and tok is None:
        raise ValueError("a logit gradient needs the token inputs")
    if grad_scale is None:
        grad_scale = torch.ones((), dtype=torch.float32, device=logits.device)
    blocks = tuning.row_kernel_blocks(v)
    grid = (triton.cdiv(n, blocks["ROWS"]),)
    token_args = tok.kernel_args() if tok is not None else TokenArgs.unused_kernel_args(out["logprobs"])
    _logits_loss_kernel[grid](
        logits, logits.stride(0), logits if grad is None else grad, 0 if grad is None else grad.stride(0), targets,
        out["logprobs"], out["entropy"], out.get("loss", out["logprobs"]), grad_scale, n, v, inv_tau, *token_args,
        WITH_LOSS=tok is not None, WRITE_GRAD=grad is not None,
        SYNC_TILES=grad is not None and narrower_in_place(logits, grad), **blocks,
    )
    return out
