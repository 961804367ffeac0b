"""Fused linear forward: ``z = (h W^T + b) / tau`` tile by tile with ``tl.dot``, never stored, folded at once
into each row's online log-sum-exp / entropy state and target logit.

The vocabulary is cut into ``splits`` column ranges so that even a few hundred rows fill the GPU; each
program owns one block of rows and one range, walks its vocabulary tiles, and writes a partial state
``[4, splits, N]`` (max, sum, tilted sum, target logit) that :mod:`.token_finish` merges. Programs are
launched in groups of ``GROUP_M`` row blocks x all splits, so the ones running together share W tiles
in L2 while the small ``h`` blocks stay resident.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from . import tuning
from .online_softmax import merge_tile
from .token_loss import VARLEN_ARGS


@triton.jit(do_not_specialize=VARLEN_ARGS + ["splits"])
def _linear_stats_kernel(
    h_ptr, stride_h, w_ptr, stride_w, b_ptr, targets_ptr, part_ptr,
    N, V, H, inv_tau, splits, cols_per_split,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    DOT_FP32: tl.constexpr, FP32_PRECISION: tl.constexpr, HAS_BIAS: tl.constexpr,
):
    pid = tl.program_id(0)
    row_blocks = tl.cdiv(N, BLOCK_M)
    per_group = GROUP_M * splits
    first_block = (pid // per_group) * GROUP_M
    group_blocks = tl.minimum(row_blocks - first_block, GROUP_M)
    in_group = pid % per_group
    row_block = first_block + in_group % group_blocks
    split = in_group // group_blocks

    rows = row_block * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < N
    rows64 = rows.to(tl.int64)
    target = tl.load(targets_ptr + rows, mask=row_ok, other=-1).to(tl.int64)
    v_begin = split * cols_per_split
    v_end = tl.minimum(v_begin + cols_per_split, V)

    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK_M], tl.float32)
    t = tl.zeros([BLOCK_M], tl.float32)
    target_logit = tl.zeros([BLOCK_M], tl.float32)
    k_offsets = tl.arange(0, BLOCK_K)
    for v0 in range(v_begin, v_end, BLOCK_N):
        cols = v0 + tl.arange(0, BLOCK_N)
        col_ok = cols < v_end
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for k0 in range(0, H, BLOCK_K):
            ks = k0 + k_offsets
            a = tl.load(h_ptr + rows64[:, None] * stride_h + ks[None, :],
                        mask=row_ok[:, None] & (ks[None, :] < H), other=0.0)
            b = tl.load(w_ptr + cols.to(tl.int64)[None, :] * stride_w + ks[:, None],
                        mask=col_ok[None, :] & (ks[:, None] < H), other=0.0)
            if DOT_FP32:
                acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision=FP32_PRECISION)
            else:
                acc = tl.dot(a, b, acc)
        if HAS_BIAS:
            acc += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        z = tl.where(col_ok[None, :], acc * inv_tau, float("-inf"))
        target_logit += tl.sum(tl.where(cols[None, :] == target[:, None], z, 0.0), axis=1)
        m, s, t = merge_tile(m, s, t, z)

    out = part_ptr + split * N + rows64
    plane = splits * N
    tl.store(out, m, mask=row_ok)
    tl.store(out + plane, s, mask=row_ok)
    tl.store(out + 2 * plane, t, mask=row_ok)
    tl.store(out + 3 * plane, target_logit, mask=row_ok)


_autotuned = None if tuning.INTERPRET else triton.autotune(
    configs=tuning.LINEAR_STATS_CONFIGS, key=tuning.LINEAR_STATS_KEY
)(_linear_stats_kernel)


def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


def linear_stats(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, inv_tau: float,
                 bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Partial row states ``[4, splits, N]`` fp32 of ``softmax((hidden @ weight.T + bias) * inv_tau)``."""
    n, h = hidden.shape
    v = weight.shape[0]
    if hidden.stride(1) != 1:
        hidden = hidden.contiguous()
    if weight.stride(1) != 1:
        weight = weight.contiguous()
    splits = tuning.num_splits(n, v, _sm_count(hidden.device))
    cols_per_split = triton.cdiv(triton.cdiv(v, splits), tuning.SPLIT_ALIGN) * tuning.SPLIT_ALIGN
    splits = triton.cdiv(v, cols_per_split)
    partials = torch.empty((4, splits, n), dtype=torch.float32, device=hidden.device)
    if n == 0:
        return partials
    args = (hidden, hidden.stride(0), weight, weight.stride(0), weight if bias is None else bias.contiguous(), targets,
            partials, n, v, h, inv_tau, splits, cols_per_split)
    common = dict(GROUP_M=tuning.GROUP_M, DOT_FP32=tuning.dot_dtype_is_fp32(hidden.dtype),
                  FP32_PRECISION="ieee" if tuning.INTERPRET else "tf32x3", HAS_BIAS=bias is not None)
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK_M"]) * splits,)  # noqa: E731
    if tuning.INTERPRET:
        _linear_stats_kernel[grid](*args, **common, **tuning.LINEAR_STATS_INTERPRETED)
    else:
        _autotuned[grid](*args, **common)
    return partials
