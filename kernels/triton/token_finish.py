"""Per-token epilogue of the fused forward: merges the split states into ``lse``, entropy and the
log-prob, then (for the loss) the weighted token loss and the two per-row gradient coefficients."""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from . import tuning
from .online_softmax import finish_state, merge_states
from .token_loss import TOKEN_INT_ARGS, VARLEN_ARGS, TokenArgs, load_token_loss


@triton.jit(do_not_specialize=TOKEN_INT_ARGS + VARLEN_ARGS + ["splits"])
def _token_finish_kernel(
    part_ptr, splits, N, lp_out, ent_out, lse_out, loss_out, coef_lp_out, coef_ent_out, scale_ptr, inv_tau,
    adv_ptr, w_ptr, expert_ptr, old_ptr, ref_ptr, beh_ptr, has_old, scalars_ptr,
    BLOCK: tl.constexpr, WITH_LOSS: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    row_ok = rows < N
    m = tl.full([BLOCK], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK], tl.float32)
    t = tl.zeros([BLOCK], tl.float32)
    target_logit = tl.zeros([BLOCK], tl.float32)
    plane = splits * N
    for split in range(0, splits):
        at = part_ptr + split * N + rows
        m, s, t = merge_states(m, s, t, tl.load(at, mask=row_ok, other=float("-inf")),
                               tl.load(at + plane, mask=row_ok, other=0.0),
                               tl.load(at + 2 * plane, mask=row_ok, other=0.0))
        target_logit += tl.load(at + 3 * plane, mask=row_ok, other=0.0)
    lse, ent = finish_state(m, s, t)
    lse = tl.where(row_ok, lse, 0.0)  # rows past N stay finite (no inf * 0 below)
    lp = target_logit - lse
    tl.store(lp_out + rows, lp, mask=row_ok)
    tl.store(ent_out + rows, ent, mask=row_ok)
    tl.store(lse_out + rows, lse, mask=row_ok)
    if WITH_LOSS:
        w_loss, w_d_lp, w_d_ent = load_token_loss(rows, row_ok, lp, ent, adv_ptr, w_ptr, expert_ptr, old_ptr, ref_ptr,
                                                  beh_ptr, has_old, scalars_ptr)
        tl.store(loss_out + rows, w_loss, mask=row_ok)
        # The backward GEMMs see the gradient divided by scale (the largest |w|): fp16 keeps it.
        coef = inv_tau / tl.load(scale_ptr)
        tl.store(coef_lp_out + rows, coef * w_d_lp, mask=row_ok)
        tl.store(coef_ent_out + rows, coef * w_d_ent, mask=row_ok)


def token_finish(partials: torch.Tensor, inv_tau: float, tok: Optional[TokenArgs] = None,
                 grad_scale: Optional[torch.Tensor] = None) -> dict:
    """Merges ``[4, splits, N]`` partial states. Returns fp32 ``[N]`` vectors ``logprobs``, ``entropy``,
    ``lse``; with ``tok`` also ``loss`` (``w_t l_t``), ``coef_lp`` and ``coef_ent`` (see
    :func:`.online_softmax.logit_grad_tile`, divided by ``grad_scale``; None: 1)."""
    _, splits, n = partials.shape
    new = lambda: torch.empty(n, dtype=torch.float32, device=partials.device)  # noqa: E731
    out = {"logprobs": new(), "entropy": new(), "lse": new()}
    with_loss = tok is not None
    if with_loss:
        out.update(loss=new(), coef_lp=new(), coef_ent=new())
    if n == 0:
        return out
    dummy = out["lse"]
    if with_loss and grad_scale is None:
        grad_scale = torch.ones((), dtype=torch.float32, device=partials.device)
    loss_args = tok.kernel_args() if with_loss else TokenArgs.unused_kernel_args(dummy)
    blocks = tuning.token_kernel_blocks()
    grid = (triton.cdiv(n, blocks["BLOCK"]),)
    _token_finish_kernel[grid](
        partials, splits, n, out["logprobs"], out["entropy"], out["lse"], out.get("loss", dummy),
        out.get("coef_lp", dummy), out.get("coef_ent", dummy), dummy if grad_scale is None else grad_scale, inv_tau,
        *loss_args, WITH_LOSS=with_loss, **blocks,
    )
    return out
