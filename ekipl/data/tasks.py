"""The task names ekipl knows, the family each belongs to, and what a family's records look like.

Reason-RFT has three families (PEERS.md, "The benchmark"): visual counting, structure perception and
spatial transformation. The offline synthetic task is a counting task, so it shares counting's prompt,
rewards and scoring.
"""

from __future__ import annotations

COUNTING = "counting"
STRUCTURE = "structure"
SPATIAL = "spatial"

SYNTHETIC_TASK = "synthetic"

TASK_FAMILIES: dict[str, str] = {
    "clevr-math": COUNTING,
    "super-clevr": COUNTING,
    SYNTHETIC_TASK: COUNTING,
    "geomath": STRUCTURE,
    "geometry3k": STRUCTURE,
    "trance": SPATIAL,
    "trance-left": SPATIAL,
    "trance-right": SPATIAL,
}

# TRANCE items show the initial and the final state; the other families show one image.
IMAGES_PER_FAMILY: dict[str, int] = {COUNTING: 1, STRUCTURE: 1, SPATIAL: 2}

CHOICE_LETTERS = ("A", "B", "C", "D")


def task_family(task: str) -> str:
    """The family of ``task``; an unknown name is an error that lists the known ones."""
    try:
        return TASK_FAMILIES[task]
    except KeyError:
        raise ValueError(f"unknown task {task!r}; known tasks: {', '.join(sorted(TASK_FAMILIES))}") from None


def is_choice_answer(answer: str) -> bool:
    """Whether a structure-perception gold answer is a multiple-choice letter (the benchmark's split)."""
    return answer.strip() in CHOICE_LETTERS
