"""The GEMMs around the kernels, on cuBLAS, with fp32 results and fp32 accumulation.

On CUDA, 16-bit operands go straight to cuBLAS with an fp32 output (``out_dtype``, torch >= 2.8): no
fp32 copy of the LM head is ever made, and logits are never rounded to 16 bits before the softmax.
Elsewhere (the CPU runs of the interpreter tests) the operands are upcast, which costs nothing there.
"""

from __future__ import annotations

import warnings

import torch

_HAS_OUT_DTYPE = hasattr(torch.ops.aten.mm, "dtype_out") and hasattr(torch.ops.aten.addmm, "dtype_out")
_warned = False


def _direct(a: torch.Tensor) -> bool:
    global _warned
    if a.device.type != "cuda" or a.dtype == torch.float32:
        return False
    if not _HAS_OUT_DTYPE and not _warned:
        _warned = True
        warnings.warn("ekipl_kernels: this torch has no mm(out_dtype=...); the Triton backend upcasts GEMM "
                      "operands to fp32 (slower, more memory). Use torch >= 2.8.", stacklevel=3)
    return _HAS_OUT_DTYPE


def mm_fp32(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``out = a @ b`` with ``out`` fp32."""
    if _direct(a):
        return torch.mm(a, b, out_dtype=torch.float32, out=out)
    return torch.mm(a.float(), b.float(), out=out)


def addmm_fp32_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``acc += a @ b`` with ``acc`` fp32."""
    if _direct(a):
        return torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    return acc.addmm_(a.float(), b.float())
