"""Where the answer sits in a completion or a solution: inside ``<answer>...</answer>``."""

from __future__ import annotations

import re

# DOTALL so that an answer spread over lines still counts as tagged, as the format reward's pattern does.
ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def extract_answer(text: str) -> str | None:
    """The stripped contents of the first ``<answer>`` tag, or None when the text has none."""
    match = ANSWER_TAG.search(text)
    return match.group(1).strip() if match else None


def gold_answer(solution: str, answer: str | None = None) -> str:
    """The reference answer of a record: its ``answer`` field if given, else the solution's tag, else the
    whole stripped solution."""
    if answer is not None:
        return answer.strip()
    tagged = extract_answer(solution)
    return tagged if tagged is not None else solution.strip()
