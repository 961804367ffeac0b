"""The synthetic task's solver as an expert: reads the scene stored with each record and answers in the
benchmark's format, wrong (off by one, consistently reasoned) with probability ``error_rate``."""

from __future__ import annotations

import random
import time
from typing import Sequence

from ekipl.data.synthetic import oracle_answer
from ekipl.experts.base import ExpertError, ExpertReply, ExpertRequest, seconds_left, stable_seed
from ekipl.experts.config import ExpertConfig


class OracleExpert:
    """Each sample's slips are drawn from its own seed (config seed, request seed, record, sample index), so
    an answer does not depend on what else was asked."""

    shares_prefix = True

    def __init__(self, config: ExpertConfig):
        self.config = config

    def answer(self, request: ExpertRequest, sample_indices: Sequence[int], deadline: float) -> list[ExpertReply]:
        seconds_left(deadline)
        replies = []
        for index in sample_indices:
            started = time.monotonic()
            rng = random.Random(stable_seed(self.config.seed, self.config.name, request.seed, request.uid, index))
            try:
                text = oracle_answer(request.record, error_rate=self.config.error_rate, rng=rng)
            except ValueError as error:
                raise ExpertError(f"expert {self.config.name!r}: {error}") from None
            replies.append(ExpertReply(sample_index=index, text=text, latency_s=time.monotonic() - started))
        return replies

    def close(self) -> None:
        pass
