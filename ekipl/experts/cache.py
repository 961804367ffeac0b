"""The on-disk cache of online experts' answers: a rerun or a resumed run never pays twice for one answer.

An answer is keyed by (expert name, model, prompt hash, sampling parameters, sample index): the same
question with the same images, asked of the same model with the same settings, for the same sample slot.
One append-only JSONL file per expert (see :mod:`ekipl.experts.jsonl`); answers are written as they arrive,
even when they arrive after their step's deadline, so that a later step or run can use them.

Only final answers are written: a truncated one (``finish_reason: "length"``) may still serve its own step,
but caching it would hand the same cut-off text to every later step and run in place of a fresh sample. A row
that holds no usable answer (no text, a wrong type; a hand-edited or foreign file) is skipped when the file is
loaded, with one warning per file, so that its answer is asked for again rather than failing the step.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import threading
from pathlib import Path
from typing import Any, Optional

from ekipl.experts.base import ExpertReply
from ekipl.experts.config import ExpertConfig
from ekipl.experts.jsonl import JsonlAppender, read_jsonl

logger = logging.getLogger(__name__)
FINISH_REASONS = ("stop", "length")


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


def stored_reply(item: dict[str, Any], sample_index: int, *, keep_tokens: bool) -> ExpertReply:
    """An answer as a file stores it (``text``, ``finish_reason``, ``token_ids``, ``logprobs``), as a reply
    marked ``from_cache``; token ids and log-probs only with ``keep_tokens``. Raises ValueError naming what
    makes it unusable."""
    text = item.get("text")
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"text is {'missing' if 'text' not in item else repr(text)[:40]}, not an answer's text")
    finish_reason = item.get("finish_reason", "stop")
    if finish_reason not in FINISH_REASONS:
        raise ValueError(f"finish_reason is {finish_reason!r}, expected one of {FINISH_REASONS}")
    token_ids = logprobs = None
    if keep_tokens:
        token_ids, logprobs = item.get("token_ids"), item.get("logprobs")
        if token_ids is not None and not _list_of(token_ids, int):
            raise ValueError("token_ids is not a list of integers")
        if logprobs is not None and not (_list_of(logprobs, (int, float)) and len(logprobs) == len(token_ids or ())):
            raise ValueError("logprobs is not a list of numbers, one per token id")
    return ExpertReply(
        sample_index=sample_index,
        text=text,
        token_ids=token_ids,
        logprobs=logprobs,
        finish_reason=finish_reason,
        from_cache=True,
    )


def _list_of(values: Any, kind: type | tuple[type, ...]) -> bool:
    return isinstance(values, list) and all(isinstance(v, kind) and not isinstance(v, bool) for v in values)


class AnswerCache:
    """Cached answers of one expert, loaded from and appended to ``<cache_dir>/<expert name>.jsonl``.

    ``unreadable_lines``: lines that are not JSON objects; ``unusable_rows``: rows with a key but no usable
    answer (both skipped). Token ids and log-probs are kept for an expert that shares the policy's tokenizer.
    """

    def __init__(self, cache_dir: str | os.PathLike, expert: ExpertConfig):
        self.expert = expert
        self.path = Path(cache_dir) / f"{expert.name}.jsonl"
        rows, self.unreadable_lines = read_jsonl(self.path)
        self._answers: dict[str, dict] = {}
        problems = []
        for row in rows:
            key = row.get("key")
            if not isinstance(key, str):
                continue
            try:
                reply = stored_reply(row, 0, keep_tokens=expert.same_tokenizer)
            except ValueError as error:
                problems.append(f"key {key[:12]}...: {error}")
                continue
            if reply.finish_reason == "stop":  # truncated rows (written by earlier versions) are not final
                self._answers[key] = row
        self.unusable_rows = len(problems)
        if problems:
            logger.warning(
                "%s: %d row(s) hold no usable answer and were skipped (their answers will be asked for again); "
                "first: %s", self.path, len(problems), problems[0],
            )
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
        return stored_reply(row, sample_index, keep_tokens=self.expert.same_tokenizer)

    def put(self, prompt_hash: str, reply: ExpertReply) -> None:
        """Append ``reply`` (flushed at once) if it is a final answer: non-empty text, ``finish_reason``
        "stop". A key already cached is not written again."""
        if not (isinstance(reply.text, str) and reply.text.strip() and reply.finish_reason == "stop"):
            return
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
