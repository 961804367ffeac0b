"""The GEMMs around the kernels, on cuBLAS, with fp32 results and fp32 accumulation.

On CUDA, 16-bit operands go straight to cuBLAS with an fp32 output (``out_dtype``, torch >= 2.8): no
fp32 copy of the LM head is ever made, and logits are never rounded to 16 bits before the softmax.
Elsewhere (the CPU runs of the interpreter tests), or if this torch refuses ``out_dtype``, the operands
are upcast: correct, but on a GPU slower and with an fp32 copy of the operands (warned once).
"""

from __future__ import annotations

import warnings

import torch

_direct_ok = hasattr(torch.ops.aten.mm, "dtype_out") and hasattr(torch.ops.aten.addmm, "dtype_out")


def _upcast_instead(exc: Exception) -> None:
    global _direct_ok
    _direct_ok = False
    warnings.warn(f"ekipl_kernels: torch.mm(out_dtype=float32) failed ({exc}); the Triton backend now upcasts GEMM "
                  "operands to fp32 (slower, more memory). Use torch >= 2.8.", stacklevel=3)


def _direct(a: torch.Tensor) -> bool:
    return _direct_ok and a.device.type == "cuda" and a.dtype != torch.float32


def mm_fp32(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``out = a @ b`` with ``out`` fp32."""
    if _direct(a):
        try:
            return torch.mm(a, b, out_dtype=torch.float32, out=out)
        except (RuntimeError, TypeError) as exc:
            _upcast_instead(exc)
    return torch.mm(a.float(), b.float(), out=out)


def addmm_fp32_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``acc += a @ b`` with ``acc`` fp32."""
    if _direct(a):
        try:
            return torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
        except (RuntimeError, TypeError) as exc:
            _upcast_instead(exc)
    return acc.addmm_(a.float(), b.float())
