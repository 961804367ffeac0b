"""A step's metrics over every data-parallel rank: sums and counts reduced in one call, then divided.

Each rank sees only its share of the step's prompts; a mean of per-rank means (or rank 0's alone)
misstates any metric whose counts differ between ranks. Metrics are therefore recorded as sums with
their counts, all-reduced together, and divided once.
"""

from __future__ import annotations

import math
from typing import Iterable

import torch
import torch.distributed as dist


class StepStats:
    """Sums and counts per metric on this rank; :meth:`reduce` gives the global values."""

    def __init__(self) -> None:
        self._sums: dict[str, float] = {}
        self._counts: dict[str, float] = {}
        self._squares: dict[str, float] = {}  # for the std of the keys recorded with ``std=True``

    def _add(self, key: str, total: float, count: float) -> None:
        self._sums[key] = self._sums.get(key, 0.0) + total
        self._counts[key] = self._counts.get(key, 0.0) + count

    def mean(self, key: str, values: Iterable[float], *, std: bool = False) -> None:
        """The mean of ``values`` over all ranks (and their std, as ``<key>_std``, when asked)."""
        values = [float(v) for v in values]
        self._add(key, sum(values), len(values))
        if std:
            self._squares[key] = self._squares.get(key, 0.0) + sum(v * v for v in values)

    def ratio(self, key: str, numerator: float, denominator: float) -> None:
        """``sum(numerator) / sum(denominator)`` over ranks (0 when the denominator is 0)."""
        self._add(key, float(numerator), float(denominator))

    def total(self, key: str, value: float) -> None:
        """The sum over ranks."""
        self._add(key, float(value), math.nan)

    def rank_mean(self, key: str, value: float) -> None:
        """The mean over ranks of a value that is already a per-rank average."""
        self._add(key, float(value), 1.0)

    def reduce(self, device: torch.device | str = "cpu") -> dict[str, float]:
        """Global values; every rank must call it. Ranks may have recorded different keys (a metric that
        only exists where an expert answered): the union of keys is agreed first, so the sums line up."""
        kinds = {k: ("total" if math.isnan(self._counts[k]) else "std" if k in self._squares else "mean") for k in self._sums}
        distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        if distributed:
            every_rank: list[dict[str, str]] = [{} for _ in range(dist.get_world_size())]
            dist.all_gather_object(every_rank, kinds)
            for other in every_rank:
                kinds.update(other)
        keys = sorted(kinds)
        local = [self._sums.get(k, 0.0) for k in keys]
        local += [0.0 if kinds[k] == "total" else self._counts.get(k, 0.0) for k in keys]
        local += [self._squares.get(k, 0.0) for k in keys]
        if distributed and keys:
            tensor = torch.tensor(local, dtype=torch.float64, device=device)
            dist.all_reduce(tensor)
            local = tensor.tolist()
        n = len(keys)
        out = {}
        for key, total, count, squares in zip(keys, local[:n], local[n : 2 * n], local[2 * n :]):
            if kinds[key] == "total":
                out[key] = total
                continue
            out[key] = total / count if count else 0.0
            if kinds[key] == "std":
                out[f"{key}_std"] = math.sqrt(max(squares / count - out[key] ** 2, 0.0)) if count else 0.0
        return out
