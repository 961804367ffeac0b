"""Launch configurations: autotuned on the GPU, one fixed set under the Triton interpreter.

``INTERPRET`` is read once, when this package is imported: ``triton.jit`` decides at decoration time
whether a kernel is compiled or interpreted, so every launcher of one package copy must agree with it.
Under the interpreter each program x loop iteration costs milliseconds, so the fixed blocks are large
in rows (few programs) yet smaller than the test vocabularies in columns (the tail paths run).
"""

from __future__ import annotations

import os

import torch
import triton


def _interpreting() -> bool:
    knobs = getattr(triton, "knobs", None)  # triton >= 3.4; older ones read the variable directly
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


INTERPRET: bool = _interpreting()

# Columns of one split of the fused forward: a multiple of every BLOCK_N below, so that splits
# start on tile boundaries.
SPLIT_ALIGN = 256

# The fused forward (GEMM + online softmax): keyed on (H, V) and, by the autotuner itself, the dtypes.
LINEAR_STATS_CONFIGS = [
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64}, num_warps=8, num_stages=4),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 64}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 64}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64}, num_warps=4, num_stages=4),
]
LINEAR_STATS_KEY = ["H", "V"]
LINEAR_STATS_INTERPRETED = {"BLOCK_M": 32, "BLOCK_N": 256, "BLOCK_K": 32}
# Row blocks that share W tiles in L2 (grouped launch order); a multiple of the concurrent programs.
GROUP_M = 8


def row_kernel_blocks(n_cols: int) -> dict:
    """ROWS x BLOCK_V tile of the memory-bound row kernels (logits loss, logit gradient)."""
    if INTERPRET:
        return {"ROWS": 16, "BLOCK_V": min(256, triton.next_power_of_2(n_cols))}
    block = min(4096, triton.next_power_of_2(n_cols))
    return {"ROWS": 1, "BLOCK_V": block, "num_warps": 8 if block >= 2048 else 4}


def token_kernel_blocks() -> dict:
    """Block of the per-token kernels (split merge, loss)."""
    return {"BLOCK": 64} if INTERPRET else {"BLOCK": 256, "num_warps": 4}


def dot_dtype_is_fp32(dtype) -> bool:
    """Whether ``tl.dot`` must take fp32 operands: always under the interpreter (its bf16 dot is wrong)."""
    return INTERPRET or dtype == torch.float32


def num_splits(n_rows: int, n_cols: int, sm_count: int) -> int:
    """Vocabulary splits of the fused forward: enough programs to fill the GPU twice over."""
    if INTERPRET:
        return min(2, triton.cdiv(n_cols, SPLIT_ALIGN))
    row_blocks = triton.cdiv(n_rows, 128)
    wanted = max(GROUP_M * 2, triton.cdiv(2 * sm_count, row_blocks))
    return max(1, min(wanted, triton.cdiv(n_cols, SPLIT_ALIGN)))
