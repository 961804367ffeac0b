"""The on-disk cache of online experts' answers: a rerun or a resumed run never pays twice for one answer.

An answer is keyed by (expert name, model, prompt hash, sampling parameters, sample index): the same
question with the same images, asked of the same model with the same settings, for the same sample slot.
One append-only JSONL file per expert (see :mod:`ekipl.experts.jsonl`); answers are written as they arrive,
even when they arrive after their step's deadline, so that a later step or run can use them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import threading
from pathlib import Path
from typing import Optional

from ekipl.experts.base import ExpertReply
from ekipl.experts.config import ExpertConfig
from ekipl.experts.jsonl import JsonlAppender, read_jsonl


def answer_key(expert: ExpertConfig, prompt_hash: str, sample_index: int) -> str:
    """The cache key of one answer (a hex digest)."""
    identity = {
        "expert": expert.name,
        "model": expert.model,
        "sampling": dataclasses.asdict(expert.sampling),
        "extra_body": expert.extra_body,
        "prompt_hash": prompt_hash,
        "sample_index": sample_index,
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode("utf-8")).hexdigest()


class AnswerCache:
    """Cached answers of one expert, loaded from and appended to ``<cache_dir>/<expert name>.jsonl``."""

    def __init__(self, cache_dir: str | os.PathLike, expert: ExpertConfig):
        self.expert = expert
        self.path = Path(cache_dir) / f"{expert.name}.jsonl"
        rows, self.unreadable_lines = read_jsonl(self.path)
        self._answers: dict[str, dict] = {row["key"]: row for row in rows if isinstance(row.get("key"), str)}
        self._lock = threading.Lock()
        self._appender = JsonlAppender(self.path)

    def __len__(self) -> int:
        return len(self._answers)

    def get(self, prompt_hash: str, sample_index: int) -> Optional[ExpertReply]:
        """The cached answer for this prompt and sample slot, marked ``from_cache``, or None."""
        with self._lock:
            row = self._answers.get(answer_key(self.expert, prompt_hash, sample_index))
        if row is None:
            return None
        return ExpertReply(
            sample_index=sample_index,
            text=row["text"],
            token_ids=row.get("token_ids"),
            logprobs=row.get("logprobs"),
            finish_reason=row.get("finish_reason", "stop"),
            from_cache=True,
        )

    def put(self, prompt_hash: str, reply: ExpertReply) -> None:
        """Append ``reply`` (flushed at once); a key already cached is not written again."""
        key = answer_key(self.expert, prompt_hash, reply.sample_index)
        row = {
            "key": key,
            "expert": self.expert.name,
            "model": self.expert.model,
            "prompt_hash": prompt_hash,
            "sample_index": reply.sample_index,
            "text": reply.text,
            "finish_reason": reply.finish_reason,
            "latency_s": round(reply.latency_s, 4),
        }
        if reply.token_ids is not None:
            row["token_ids"] = list(reply.token_ids)
        if reply.logprobs is not None:
            row["logprobs"] = list(reply.logprobs)
        with self._lock:
            if key in self._answers:
                return
            self._answers[key] = row
        self._appender.append(row)

    def close(self) -> None:
        self._appender.close()
