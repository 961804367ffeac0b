"""Online log-sum-exp and entropy over vocabulary tiles, and the logit gradient of one tile.

A row's running state is ``(m, s, t)``: ``m`` the largest logit seen (from -inf), ``s = sum e^(z-m)``
and ``t = sum e^(z-m) (z-m)``. Keeping ``t`` relative to ``m`` gives the entropy as
``log s - t/s`` with no cancellation however large the logits are. Absent entries (the vocabulary
tail, rows past N) enter as -inf and add exactly nothing: never exp(0).
All states are ``[rows]`` vectors and tiles ``[rows, BLOCK]``, in fp32.
"""

import triton
import triton.language as tl


@triton.jit
def merge_tile(m, s, t, z):
    """Folds a tile ``z [rows, BLOCK]`` of logits (-inf where absent) into the running state."""
    m_new = tl.maximum(m, tl.max(z, axis=1))
    # Rows with nothing finite yet keep m = -inf; measure them from 0 so no -inf - -inf appears.
    m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
    rescale = tl.exp(m - m_ref)
    shift = tl.where(s > 0, m - m_ref, 0.0)
    rel = z - m_ref[:, None]
    e = tl.exp(rel)
    s_new = rescale * s + tl.sum(e, axis=1)
    t_new = rescale * (t + shift * s) + tl.sum(e * tl.where(e > 0, rel, 0.0), axis=1)
    return m_new, s_new, t_new


@triton.jit
def merge_states(m1, s1, t1, m2, s2, t2):
    """Combines the states of two disjoint column ranges of the same rows."""
    m = tl.maximum(m1, m2)
    m_ref = tl.where(m == float("-inf"), 0.0, m)
    a1 = tl.exp(m1 - m_ref)
    a2 = tl.exp(m2 - m_ref)
    t = a1 * (t1 + tl.where(s1 > 0, m1 - m_ref, 0.0) * s1) + a2 * (t2 + tl.where(s2 > 0, m2 - m_ref, 0.0) * s2)
    return m, a1 * s1 + a2 * s2, t


@triton.jit
def finish_state(m, s, t):
    """``(lse, entropy)`` of a complete row state (rows that saw no finite logit: -inf, 0)."""
    seen = s > 0
    log_s = tl.log(tl.where(seen, s, 1.0))
    return m + log_s, tl.where(seen, log_s - t / tl.where(seen, s, 1.0), 0.0)


@triton.jit
def logit_grad_tile(z, is_target, lse, ent, coef_lp, coef_ent):
    """d loss / d logits of a tile: ``coef_lp (1[v=y] - p) - coef_ent p (z - lse + H)``.

    ``z`` are the tempered logits (-inf where absent); ``coef_lp = w dl/dlp / tau`` and
    ``coef_ent = w dl/dH / tau`` per row carry the aggregation weight and the temperature.
    """
    centred = z - lse[:, None]
    p = tl.exp(centred)
    tilt = tl.where(p > 0, centred + ent[:, None], 0.0)
    grad = -p * (coef_lp[:, None] + coef_ent[:, None] * tilt)
    return tl.where(is_target, grad + coef_lp[:, None], grad)
