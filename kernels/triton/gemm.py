"""The GEMMs around the kernels, on cuBLAS, with fp32 results and fp32 accumulation.

On CUDA, 16-bit operands go straight to cuBLAS with an fp32 output (``out_dtype``): no fp32 copy of the
LM head is ever made, and logits are never rounded to 16 bits before the softmax. Which calls this torch
takes is probed once per process, on tiny tensors, the first time a CUDA GEMM runs (:func:`cuda_path`):

``direct``  ``mm`` and ``addmm`` both take ``out_dtype`` (torch >= ~2.10).
``mm+add``  ``addmm(fp32, bf16, bf16, out_dtype=fp32, out=...)`` is refused (older torch): an accumulating
            GEMM is a ``mm`` into a buffer of at most ``ADD_PIECE_BYTES`` plus ``add_``, piece by piece.
            Nearly as fast: one more pass over the accumulator, no full-size temporary.
``upcast``  ``mm`` refuses ``out_dtype`` too (torch < 2.8): the operands are upcast to fp32, on a GPU about
            10x slower with an fp32 copy of the weight. Warned once; ``benchmarks/gpu_check.sh`` and
            ``bench_loss.py`` fail when it is taken.

Only the probe catches errors: a failing GEMM of the loss (out of memory, a bad shape) raises as it is.
Elsewhere (the CPU tensors of the interpreter tests) the operands are upcast, which is what a CPU does.
"""

from __future__ import annotations

import warnings
from typing import Optional

import torch

PATHS = ("direct", "mm+add", "upcast")
ADD_PIECE_BYTES = 64 << 20
_path: Optional[str] = None


def cuda_path(device: torch.device) -> str:
    """How 16-bit CUDA GEMMs with fp32 results run in this process (probed on first use)."""
    global _path
    if _path is None:
        _path = _probe(device)
        if _path == "upcast":
            warnings.warn(f"ekipl_kernels: torch {torch.__version__} refuses torch.mm(bf16, bf16, out_dtype=float32); "
                          "the Triton backend upcasts GEMM operands to fp32 (about 10x slower, an fp32 copy of the "
                          "LM head). Use torch >= 2.8.", stacklevel=2)
    return _path


def _probe(device: torch.device) -> str:
    a = torch.ones((2, 8), dtype=torch.bfloat16, device=device)
    b = torch.ones((8, 4), dtype=torch.bfloat16, device=device)
    out = torch.empty((2, 4), dtype=torch.float32, device=device)
    try:
        torch.mm(a, b, out_dtype=torch.float32, out=out)
    except (RuntimeError, TypeError):  # the overload is missing or refuses these dtypes
        return "upcast"
    if not bool((out == 8).all()):
        return "upcast"
    try:
        torch.addmm(out, a, b, out_dtype=torch.float32, out=out)
    except (RuntimeError, TypeError):
        return "mm+add"
    # Accumulating into its own input must add (8 + 8), as the loss relies on.
    return "direct" if bool((out == 16).all()) else "mm+add"


def _low_precision_cuda(a: torch.Tensor) -> bool:
    return a.device.type == "cuda" and a.dtype != torch.float32


def mm_fp32(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``out = a @ b`` with ``out`` fp32."""
    if _low_precision_cuda(a) and cuda_path(a.device) != "upcast":
        return torch.mm(a, b, out_dtype=torch.float32, out=out)
    return torch.mm(a.float(), b.float(), out=out)


def addmm_fp32_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``acc += a @ b`` with ``acc`` fp32."""
    if _low_precision_cuda(a):
        path = cuda_path(a.device)
        if path == "direct":
            return torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
        if path == "mm+add":
            rows = max(1, ADD_PIECE_BYTES // (4 * max(1, acc.shape[1])))
            piece = torch.empty((min(rows, acc.shape[0]), acc.shape[1]), dtype=torch.float32, device=acc.device)
            for start in range(0, acc.shape[0], rows):
                stop = min(start + rows, acc.shape[0])
                part = piece[: stop - start]
                torch.mm(a[start:stop], b, out_dtype=torch.float32, out=part)
                acc[start:stop].add_(part)
            return acc
    return acc.addmm_(a.float(), b.float())
