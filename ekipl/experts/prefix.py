"""Prefix guidance (LUFFY's variant): some policy samples start from the first part of an expert answer.

For a prompt with expert answers, :func:`prefixed_prompts` turns ``samples_per_prompt`` policy sample slots
into prompts whose assistant turn already holds the first ``prefix_ratio`` of an expert answer's tokens
(the best-rewarded answers first); the rollout engine continues them like any prompt, and
:func:`guided_completion` joins prefix and continuation into one sequence whose tokens carry their origins:
the expert's id on the prefix, 0 (the policy) on the continuation.

Under a completion-length cap (``max_new_tokens``) the prefix counts against it: each prefixed prompt carries
the ``continuation_budget`` left to the policy, an answer whose prefix alone fills the cap is not used, and
:func:`guided_completion` cuts a continuation that overran its budget, so that one engine call with the largest
budget serves prompts whose budgets differ (a sample cut after ``b`` tokens is distributed as one capped at ``b``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

from ekipl.experts.base import ExpertAnswer
from ekipl.data import Prompt
from ekipl.rollout.base import Completion


@dataclass
class PrefixedPrompt:
    """A policy prompt followed by an expert prefix, for the rollout engine; ``prompt_index`` is the
    position of the original prompt in the step's batch; ``continuation_budget`` the new tokens left to the
    policy under the cap (None without one)."""

    prompt: Prompt
    prompt_index: int
    expert_id: int
    prefix_ids: list[int]
    prefix_logprobs: Optional[list[float]]
    continuation_budget: Optional[int] = None


@dataclass
class GuidedCompletion:
    """An expert prefix and the policy's continuation, as one completion of the original prompt.

    ``behavior_logprobs`` holds the generators' own log-probs of every token (the expert's on the prefix,
    the engine's on the continuation), or None when the expert's are unknown; ``continuation_logprobs``
    always holds the engine's.
    """

    prompt_index: int
    expert_id: int
    prefix_ids: list[int]
    continuation: Completion
    prefix_logprobs: Optional[list[float]]

    @property
    def token_ids(self) -> list[int]:
        return self.prefix_ids + list(self.continuation.token_ids)

    @property
    def origins(self) -> list[int]:
        return [self.expert_id] * len(self.prefix_ids) + [0] * len(self.continuation.token_ids)

    @property
    def continuation_logprobs(self) -> list[float]:
        return list(self.continuation.logprobs)

    @property
    def behavior_logprobs(self) -> Optional[list[float]]:
        if self.prefix_logprobs is None:
            return None
        return self.prefix_logprobs + self.continuation_logprobs

    @property
    def finish_reason(self) -> str:
        return self.continuation.finish_reason


def prefix_length(answer_tokens: int, prefix_ratio: float) -> int:
    """How many leading tokens of an answer to force: ``floor(ratio * tokens)``, at least one, and never the
    last token (the answer's end of turn), so the policy always has something to write; 0 if it cannot."""
    if answer_tokens < 2 or prefix_ratio <= 0:
        return 0
    return min(max(1, math.floor(prefix_ratio * answer_tokens)), answer_tokens - 1)


def prefixed_prompts(
    prompts: Sequence[Prompt],
    answers: Sequence[Sequence[ExpertAnswer]],
    *,
    prefix_ratio: float,
    samples_per_prompt: int,
    max_new_tokens: Optional[int] = None,
) -> list[PrefixedPrompt]:
    """Up to ``samples_per_prompt`` prefixed prompts per prompt that has usable expert answers (answers with
    policy token ids whose prefix leaves the policy at least one of the ``max_new_tokens``), taken best reward
    first (answers without a reward last), cycling if there are fewer answers than slots. ``answers[i]`` are the
    expert answers to ``prompts[i]``."""
    if len(answers) != len(prompts):
        raise ValueError(f"got expert answers for {len(answers)} prompts, but {len(prompts)} prompts")
    if max_new_tokens is not None and max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} is invalid: expected >= 1")
    cap = max_new_tokens if max_new_tokens is not None else float("inf")
    prefixed: list[PrefixedPrompt] = []
    for prompt_index, (prompt, candidates) in enumerate(zip(prompts, answers)):
        usable = [a for a in candidates if a.token_ids and 0 < prefix_length(len(a.token_ids), prefix_ratio) < cap]
        usable.sort(key=lambda a: (a.reward is None, -(a.reward or 0.0)))
        for slot in range(samples_per_prompt if usable else 0):
            answer = usable[slot % len(usable)]
            length = prefix_length(len(answer.token_ids), prefix_ratio)
            prefix_ids = list(answer.token_ids[:length])
            prefixed.append(
                PrefixedPrompt(
                    prompt=Prompt(
                        uid=f"{prompt.uid}#prefix{slot}",
                        input_ids=list(prompt.input_ids) + prefix_ids,
                        images=prompt.images,
                        mm_inputs=prompt.mm_inputs,
                    ),
                    prompt_index=prompt_index,
                    expert_id=answer.expert_id,
                    prefix_ids=prefix_ids,
                    prefix_logprobs=list(answer.logprobs[:length]) if answer.logprobs is not None else None,
                    continuation_budget=max_new_tokens - length if max_new_tokens is not None else None,
                )
            )
    return prefixed


def guided_completion(prefixed: PrefixedPrompt, continuation: Completion) -> GuidedCompletion:
    """Join the prefix of ``prefixed`` with the engine's continuation of its prompt, cut to its budget."""
    budget = prefixed.continuation_budget
    if budget is not None and len(continuation.token_ids) > budget:
        continuation = Completion(list(continuation.token_ids[:budget]), list(continuation.logprobs[:budget]), "length")
    return GuidedCompletion(
        prompt_index=prefixed.prompt_index,
        expert_id=prefixed.expert_id,
        prefix_ids=list(prefixed.prefix_ids),
        continuation=continuation,
        prefix_logprobs=prefixed.prefix_logprobs,
    )
