"""Answers precomputed by ``python -m ekipl.experts.generate``, served by record id.

The file holds one JSON line per (record, expert): ``{"id", "expert", "model", "answers": [{"sample_index",
"text", "finish_reason", "token_ids"?, "logprobs"?}, ...]}``. A record's answers are taken in file order
across lines; sample ``i`` is its ``i``-th answer. Token ids and log-probs are used only with
``same_tokenizer: true`` (the file was written by an expert sharing the policy's tokenizer); otherwise the
pool re-tokenises the text.

An answer that cannot be used (no text, a text that is not a string, with ``same_tokenizer`` token ids that
are not a list of integers) keeps its slot but is never served: the pool counts it as dropped. The file's
unusable answers are reported in one warning when it is loaded.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional, Sequence

from ekipl.experts.base import ExpertReply, ExpertRequest
from ekipl.experts.cache import stored_reply
from ekipl.experts.config import ExpertConfig
from ekipl.experts.jsonl import read_jsonl

logger = logging.getLogger(__name__)


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
        # Per record, its answers in slot order; None marks an unusable answer, so later slots keep their index.
        self.answers: dict[str, list[Optional[ExpertReply]]] = {}
        problems = []
        for row in rows:
            answers = row.get("answers")
            if "id" not in row or not isinstance(answers, list):
                continue
            stored = self.answers.setdefault(str(row["id"]), [])
            for item in answers:
                if not isinstance(item, dict):
                    continue
                try:
                    stored.append(stored_reply(item, len(stored), keep_tokens=config.same_tokenizer))
                except ValueError as error:
                    problems.append(f"record {str(row['id'])!r}, answer {len(stored)}: {error}")
                    stored.append(None)
        self.unusable_answers = len(problems)
        if problems:
            logger.warning(
                "%s: %d answer(s) cannot be used and will count as dropped; first: %s", path, len(problems), problems[0]
            )

    def answer(self, request: ExpertRequest, sample_indices: Sequence[int], deadline: float) -> list[ExpertReply]:
        stored = self.answers.get(request.uid, [])
        return [stored[index] for index in sample_indices if index < len(stored) and stored[index] is not None]

    def close(self) -> None:
        pass
