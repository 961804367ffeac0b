"""Choosing the implementation behind the public functions.

``backend=None`` picks by device: the C++ op on CPU, Triton on CUDA (fp64 inputs, which Triton does not
take, go to chunked), the chunked torch path elsewhere (or where the preferred one is unavailable,
with one warning). The public functions pass ``backend=`` when given, else ``KernelOptions.backend``
(which ``EKIPL_KERNEL_BACKEND`` overrides).
"""

from __future__ import annotations

import importlib
import warnings
from types import ModuleType
from typing import Optional

import torch

from .options import BACKENDS

_MODULES = {"chunked": ".chunked", "cpu": ".cpu_backend", "triton": ".triton_backend"}
_warned: set[str] = set()


class BackendUnavailable(RuntimeError):
    """The requested backend cannot run here (missing compiler, no triton, wrong device)."""


def load_backend(name: str) -> ModuleType:
    """Imports a fast backend's module; raises :class:`BackendUnavailable` with the reason."""
    if name not in _MODULES:
        raise ValueError(f"backend must be one of {BACKENDS} or None; got {name!r}")
    try:
        module = importlib.import_module(_MODULES[name], package=__package__)
    except ImportError as exc:
        raise BackendUnavailable(f"backend {name!r} cannot be imported: {exc}") from exc
    available = getattr(module, "ensure_available", None)
    if available is not None:
        available()
    return module


def resolve_backend(backend: Optional[str], device: torch.device, dtype: torch.dtype) -> str:
    """The backend name to run for tensors of ``dtype`` on ``device``."""
    if backend is not None:
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}; got {backend!r}")
        return backend
    preferred = {"cpu": "cpu", "cuda": "triton"}.get(device.type, "chunked")
    if preferred == "triton" and dtype == torch.float64:
        return "chunked"
    if preferred == "chunked":
        return preferred
    try:
        load_backend(preferred)
        return preferred
    except BackendUnavailable as exc:
        if preferred not in _warned:
            _warned.add(preferred)
            warnings.warn(f"ekipl_kernels: {exc}; falling back to the chunked torch backend", stacklevel=3)
        return "chunked"
