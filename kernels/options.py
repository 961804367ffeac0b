"""How the loss is computed (never what): the backend, the Triton schedule, scratch sizes, input checks.

:class:`KernelOptions` is passed to the public functions (``options=``) and held by a trainer's config;
each field has an environment variable that overrides it when set and not empty, so that a run can be
switched without editing its config. An explicit ``backend=`` argument of a loss function wins over both.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, fields, replace
from typing import Optional

BACKENDS = ("reference", "chunked", "cpu", "triton")
SCHEDULES = ("auto", "rows", "vocab")
LOGPROBS_PATHS = ("fused", "cublas")


@dataclass(frozen=True)
class KernelOptions:
    """Every choice gives the same loss and gradients within rounding.

    backend: None picks by device: the C++ op on CPU, Triton on CUDA (fp64 on CUDA, and other devices:
        chunked); or one of "reference", "chunked", "cpu", "triton". [EKIPL_KERNEL_BACKEND]
    schedule: the Triton fused-linear loss with gradients. "rows" (3 GEMMs, fastest; extra memory: an fp32
        ``[V, H]`` weight-gradient accumulator for 16-bit inputs and one chunk of logits), "vocab" (4 GEMMs;
        extra memory that does not grow with V), or "auto": rows, unless ``memory_budget_mb`` is set and
        rows cannot run within it. [EKIPL_TRITON_SCHEDULE]
    chunk_mb: MiB of the Triton scratch buffer of fp32 logits; None: 1024 for rows, for vocab 256 or the
        size of an fp32 ``[N, H]``, whichever is larger (narrower vocabulary slices would re-read ``hidden``
        and the ``[N, H]`` gradient accumulator more often than they read their own logits).
        [EKIPL_TRITON_CHUNK_MB]
    memory_budget_mb: MiB of device memory the Triton loss may allocate beyond its inputs, the returned
        gradients included. It picks the schedule under "auto" and caps the scratch buffer; a budget below
        the least the vocab schedule needs runs with that least. None: no budget. [EKIPL_TRITON_MEMORY_MB]
    logprobs_path: how Triton runs ``fused_linear_logprobs``: "fused" (one kernel, ``tl.dot`` with the
        online softmax, nothing stored) or "cublas" (chunks of fp32 logits from cuBLAS, then one Triton
        sweep over them). Default "fused", which needs no scratch; ``benchmarks/gpu_check.sh`` times both
        on the GPU. [EKIPL_TRITON_LOGPROBS]
    cpu_chunk_mb: MiB of the C++ CPU op's buffer of logits; None: 200. [EKIPL_CPU_CHUNK_MB]
    debug_checks: also check the input values that only the device holds (targets within the vocabulary,
        cu_seqlens, origin, normalizer) on accelerators, where each check costs a host sync; on CPU tensors
        they are always checked. [EKIPL_KERNEL_DEBUG, 1 or 0]
    """

    backend: Optional[str] = None
    schedule: str = "auto"
    chunk_mb: Optional[float] = None
    memory_budget_mb: Optional[float] = None
    logprobs_path: str = "fused"
    cpu_chunk_mb: Optional[float] = None
    debug_checks: bool = False

    def __post_init__(self) -> None:
        for f in fields(self):
            problem = _problem(f.name, getattr(self, f.name))
            if problem:
                raise ValueError(f"KernelOptions.{f.name}={getattr(self, f.name)!r} is invalid: {problem}")

    def with_env(self) -> "KernelOptions":
        """These options with each field whose environment variable is set (and not empty) replaced by it."""
        changes = {}
        for name, (variable, parse) in ENVIRONMENT.items():
            raw = os.environ.get(variable)
            if not raw:
                continue
            try:
                value = parse(raw)
            except ValueError:
                value = raw
            problem = _problem(name, value)
            if problem:
                raise ValueError(f"{variable}={raw!r} is invalid: {problem}")
            changes[name] = value
        return replace(self, **changes) if changes else self

    def scratch_bytes(self, field_name: str) -> int:
        """``chunk_mb`` or ``cpu_chunk_mb`` in bytes; 0 when unset (the backend's default)."""
        megabytes = getattr(self, field_name)
        return 0 if megabytes is None else max(1, int(megabytes * (1 << 20)))

    @property
    def memory_budget_bytes(self) -> Optional[int]:
        return None if self.memory_budget_mb is None else int(self.memory_budget_mb * (1 << 20))


def _positive_mib(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def _problem(name: str, value) -> Optional[str]:
    """Why ``value`` cannot be field ``name``, or None."""
    choices = {"backend": BACKENDS, "schedule": SCHEDULES, "logprobs_path": LOGPROBS_PATHS}
    if name in choices:
        if value is None and name == "backend":
            return None
        return None if value in choices[name] else f"expected one of {choices[name]}"
    if name == "debug_checks":
        return None if isinstance(value, bool) else "expected True or False (1 or 0 in EKIPL_KERNEL_DEBUG)"
    return None if value is None or _positive_mib(value) else "expected a positive number of MiB (or None)"


def _flag(raw: str) -> bool:
    if raw not in ("0", "1"):
        raise ValueError(raw)
    return raw == "1"


# field -> (environment variable that overrides it, parser of its text)
ENVIRONMENT = {
    "backend": ("EKIPL_KERNEL_BACKEND", str),
    "schedule": ("EKIPL_TRITON_SCHEDULE", str),
    "chunk_mb": ("EKIPL_TRITON_CHUNK_MB", float),
    "memory_budget_mb": ("EKIPL_TRITON_MEMORY_MB", float),
    "logprobs_path": ("EKIPL_TRITON_LOGPROBS", str),
    "cpu_chunk_mb": ("EKIPL_CPU_CHUNK_MB", float),
    "debug_checks": ("EKIPL_KERNEL_DEBUG", _flag),
}
