"""Step metrics over ranks: sums and counts reduced together, keys agreed even when one rank lacks some."""

from __future__ import annotations

import math
import os
import socket
import statistics

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

from ekipl.step_stats import StepStats

# rank 0 holds 3 samples, rank 1 holds 1: a mean of per-rank means would give (1 + 4) / 2 = 2.5, not 1.75
REWARDS = {0: [0.0, 1.0, 2.0], 1: [4.0]}


def record(stats: StepStats, rank: int) -> None:
    stats.mean("reward/mean", REWARDS[rank], std=True)
    stats.ratio("groups/zero_variance_frac", rank, 2)
    stats.total("reward/expert_answers", 3 + rank)
    stats.rank_mean("experts/a/latency_s", 1.0 + 2 * rank)
    if rank == 1:  # a metric only one rank has (an expert answered only there)
        stats.mean("experts/a/reward_mean", [2.0])


def expected() -> dict[str, float]:
    every = REWARDS[0] + REWARDS[1]
    return {"reward/mean": statistics.mean(every), "reward/mean_std": statistics.pstdev(every),
            "groups/zero_variance_frac": 0.25, "reward/expert_answers": 7.0, "experts/a/latency_s": 2.0,
            "experts/a/reward_mean": 2.0}


def test_one_rank():
    stats = StepStats()
    record(stats, 0)
    stats.mean("empty", [])
    out = stats.reduce()
    assert out["reward/mean"] == 1.0 and out["reward/mean_std"] == pytest.approx(statistics.pstdev(REWARDS[0]))
    assert out["empty"] == 0.0 and out["reward/expert_answers"] == 3.0 and "experts/a/reward_mean" not in out


def _rank(rank: int, port: int, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        stats = StepStats()
        record(stats, rank)
        results[rank] = stats.reduce()
    finally:
        dist.destroy_process_group()


def test_two_ranks_agree_on_global_values():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_rank, args=(port, results), nprocs=2, join=True)
        results = dict(results)
    for rank in (0, 1):
        assert results[rank].keys() == expected().keys()
        for key, value in expected().items():
            assert math.isclose(results[rank][key], value, abs_tol=1e-12), key
