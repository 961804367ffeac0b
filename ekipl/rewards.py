"""Task rewards and evaluation scores, as Reason-RFT defines them (PEERS.md, "The benchmark").

Every reward is a plain function ``(completion, solution) -> float`` with a known range
(``reward_range(fn)``); a training candidate's reward is the sum of its task's components (format +
accuracy, in [0, 2]). A config names rewards by registry name or as ``module:function`` for a user's own.

Training rewards and evaluation scores differ on purpose, as they do in the benchmark: the accuracy
reward is an exact string match of the answer tag's contents ("3.0" does not earn "3"), while the
evaluation score also accepts a mathematically equivalent answer; TRANCE training counts only exact
calls, with a penalty for repeats, while its evaluation gives partial credit.
"""

from __future__ import annotations

import importlib
import re
import threading
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

from math_verify import parse, verify

from ekipl.data.answers import extract_answer, gold_answer
from ekipl.data.tasks import COUNTING, SPATIAL, STRUCTURE, task_family

RewardFn = Callable[[str, str], float]

FORMAT_PATTERN = re.compile(r"<think>.*?</think>\s*<answer>.*?</answer>", re.DOTALL)
# A TRANCE call: change_color(3, 'red') -> ("change_color", "3", "red").
CALL_PATTERN = re.compile(r"(\w+)\((\w+),\s*'?(\w+)'?\)")


def _with_range(low: float, high: float):
    def mark(fn: RewardFn) -> RewardFn:
        fn.reward_range = (low, high)
        return fn

    return mark


def reward_range(fn: RewardFn) -> tuple[float, float] | None:
    """The (low, high) bounds of a reward function, or None for a user's function that declares none."""
    return getattr(fn, "reward_range", None)


@_with_range(0.0, 1.0)
def format_reward(completion: str, solution: str = "") -> float:
    """1 when the whole completion is ``<think>...</think>`` then ``<answer>...</answer>``, else 0."""
    return 1.0 if FORMAT_PATTERN.fullmatch(completion) else 0.0


@_with_range(0.0, 1.0)
def accuracy_reward(completion: str, solution: str) -> float:
    """1 when the stripped ``<answer>`` contents equal the reference answer exactly, else 0.

    Only a completion with no answer tag at all gets the benchmark's fallback: the whole stripped
    completion compared exactly, then a math-verify equivalence check.
    """
    gold = gold_answer(solution)
    predicted = extract_answer(completion)
    if predicted is not None:
        return 1.0 if predicted == gold else 0.0
    return 1.0 if completion.strip() == gold or _equivalent(gold, completion) else 0.0


@_with_range(0.0, 1.0)
def accuracy_eval_score(completion: str, solution: str) -> float:
    """The benchmark's evaluation score for counting and GeoMath: the tagged answer (or, untagged, the
    whole completion) matches the reference exactly or is mathematically equivalent to it."""
    gold = gold_answer(solution)
    predicted = extract_answer(completion)
    candidate = predicted if predicted is not None else completion.strip()
    return 1.0 if candidate == gold or _equivalent(gold, candidate) else 0.0


def _equivalent(gold: str, candidate: str) -> bool:
    # math-verify bounds its work with SIGALRM, which only the main thread may set; elsewhere (the expert
    # pool's worker threads) it must run without a timeout.
    timeout = 5 if threading.current_thread() is threading.main_thread() else None
    try:
        return bool(verify(parse(gold, parsing_timeout=timeout), parse(candidate, parsing_timeout=timeout),
                           timeout_seconds=timeout))
    except Exception:  # math-verify raises on exotic input; an unparseable answer is simply not equivalent
        return False


def _predicted_calls(completion: str) -> list[tuple[str, str, str]]:
    predicted = extract_answer(completion)
    return CALL_PATTERN.findall(predicted if predicted is not None else completion.strip())


@_with_range(0.0, 1.0)
def trance_reward(completion: str, solution: str) -> float:
    """TRANCE training reward: exact calls × (unique / total calls, a repeat penalty) / max(#pred, #gold).

    #pred counts distinct calls. 0 when no call parses in the answer (or, untagged, the completion).
    """
    calls = _predicted_calls(completion)
    gold = set(CALL_PATTERN.findall(solution))
    if not calls or not gold:
        return 0.0
    predicted = set(calls)
    repeat_penalty = len(predicted) / len(calls)
    return len(predicted & gold) * repeat_penalty / max(len(predicted), len(gold))


# Partial credit of the TRANCE evaluation, matched in this order, each call used at most once:
# the full call, then (function, object), then (function, value), then the function alone.
_TRANCE_CREDIT: tuple[tuple[Callable[[tuple[str, str, str]], tuple], float], ...] = (
    (lambda call: call, 1.0),
    (lambda call: (call[0], call[1]), 0.5),
    (lambda call: (call[0], call[2]), 0.5),
    (lambda call: call[0], 0.25),
)


@_with_range(0.0, 1.0)
def trance_eval_score(completion: str, solution: str) -> float:
    """TRANCE evaluation score: partial credit per matched call, divided by max(#pred, #gold) distinct calls.

    The benchmark pairs calls greedily in set order; here they are paired in sorted order, so the score
    does not depend on hashing.
    """
    predicted = sorted(set(_predicted_calls(completion)))
    gold = sorted(set(CALL_PATTERN.findall(solution)))
    if not predicted or not gold:
        return 0.0
    per_call = 1.0 / max(len(predicted), len(gold))
    score = 0.0
    for key, credit in _TRANCE_CREDIT:
        unmatched = []
        for call in predicted:
            partner = next((g for g in gold if key(g) == key(call)), None)
            if partner is None:
                unmatched.append(call)
            else:
                gold.remove(partner)
                score += credit * per_call
        predicted = unmatched
    return score


REWARDS: dict[str, RewardFn] = {
    "format": format_reward,
    "accuracy": accuracy_reward,
    "accuracy_eval": accuracy_eval_score,
    "trance": trance_reward,
    "trance_eval": trance_eval_score,
}

# The benchmark's training rewards per task family, and the score its evaluation reports.
TRAINING_REWARDS: dict[str, tuple[str, ...]] = {
    COUNTING: ("format", "accuracy"),
    STRUCTURE: ("format", "accuracy"),
    SPATIAL: ("format", "trance"),
}
EVAL_SCORES: dict[str, str] = {COUNTING: "accuracy_eval", STRUCTURE: "accuracy_eval", SPATIAL: "trance_eval"}


def get_reward(name_or_path: str) -> RewardFn:
    """A reward by registry name (``format``, ``accuracy``, ...) or ``module:function`` for a user's own."""
    if name_or_path in REWARDS:
        return REWARDS[name_or_path]
    module_name, _, function_name = name_or_path.partition(":")
    if not module_name or not function_name:
        raise ValueError(
            f"unknown reward {name_or_path!r}: use one of {', '.join(REWARDS)} or 'module:function'"
        )
    try:
        fn = getattr(importlib.import_module(module_name), function_name)
    except (ImportError, AttributeError) as error:
        raise ValueError(f"cannot load reward {name_or_path!r}: {error}") from error
    if not callable(fn):
        raise ValueError(f"reward {name_or_path!r} is not callable")
    return fn


def eval_score_fn(task: str) -> RewardFn:
    """The benchmark's evaluation score for ``task``."""
    return REWARDS[EVAL_SCORES[task_family(task)]]


@dataclass(frozen=True)
class RewardSet:
    """The named reward components of a task; a candidate's reward is their sum."""

    functions: Mapping[str, RewardFn]

    @classmethod
    def for_task(cls, task: str, names: Sequence[str] | None = None) -> "RewardSet":
        """The rewards ``names`` (default: the benchmark's training rewards of the task's family)."""
        names = TRAINING_REWARDS[task_family(task)] if names is None else names
        if not names:
            raise ValueError(f"no rewards configured for task {task!r}")
        return cls({name: get_reward(name) for name in names})

    @property
    def range(self) -> tuple[float, float] | None:
        """Bounds of the total, or None when a component declares no range."""
        ranges = [reward_range(fn) for fn in self.functions.values()]
        if any(bounds is None for bounds in ranges):
            return None
        return sum(low for low, _ in ranges), sum(high for _, high in ranges)

    def components(self, completion: str, solution: str) -> dict[str, float]:
        return {name: float(fn(completion, solution)) for name, fn in self.functions.items()}

    def total(self, completion: str, solution: str) -> float:
        return sum(self.components(completion, solution).values())
