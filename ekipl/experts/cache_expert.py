"""Answers precomputed by ``python -m ekipl.experts.generate``, served by record id.

The file holds one JSON line per (record, expert): ``{"id", "expert", "model", "answers": [{"sample_index",
"text", "finish_reason", "token_ids"?, "logprobs"?}, ...]}``. A record's answers are taken in file order
across lines; sample ``i`` is its ``i``-th answer. Token ids and log-probs are used only with
``same_tokenizer: true`` (the file was written by an expert sharing the policy's tokenizer); otherwise the
pool re-tokenises the text.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from ekipl.experts.base import ExpertReply, ExpertRequest
from ekipl.experts.config import ExpertConfig
from ekipl.experts.jsonl import read_jsonl


class CacheExpert:
    shares_prefix = True

    def __init__(self, config: ExpertConfig):
        self.config = config
        path = Path(config.path)
        if not path.is_file():
            raise FileNotFoundError(
                f"expert {config.name!r}: no answer file at {path}; write one with "
                "`python -m ekipl.experts.generate --config CFG --out FILE`"
            )
        rows, self.unreadable_lines = read_jsonl(path)
        self.answers: dict[str, list[dict[str, Any]]] = {}
        for row in rows:
            answers = row.get("answers")
            if "id" in row and isinstance(answers, list):
                self.answers.setdefault(str(row["id"]), []).extend(a for a in answers if isinstance(a, dict))

    def answer(self, request: ExpertRequest, sample_indices: Sequence[int], deadline: float) -> list[ExpertReply]:
        stored = self.answers.get(request.uid, [])
        keep_tokens = self.config.same_tokenizer
        return [
            ExpertReply(
                sample_index=index,
                text=str(stored[index].get("text", "")),
                token_ids=stored[index].get("token_ids") if keep_tokens else None,
                logprobs=stored[index].get("logprobs") if keep_tokens else None,
                finish_reason=stored[index].get("finish_reason", "stop"),
                from_cache=True,
            )
            for index in sample_indices
            if index < len(stored)
        ]

    def close(self) -> None:
        pass
