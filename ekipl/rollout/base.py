"""The rollout-engine protocol shared by the trainer (policy sampling) and the expert pool.

An engine turns prompts (token ids with their images) into groups of sampled completions, each with the
engine's own log-probs of the sampled tokens, and takes new weights after every update.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Protocol, Sequence

import torch

from ekipl.data.prompts import Prompt  # the protocol's input; defined with the data that makes it


@dataclass(frozen=True)
class SamplingParams:
    """Sampling settings; defaults follow Reason-RFT's RL setup (top_p 0.9, top_k 50, 512 new tokens)."""

    temperature: float = 1.0
    top_p: float = 0.9
    top_k: int = 50  # 0 disables top-k
    max_new_tokens: int = 512


@dataclass
class Completion:
    """One sampled answer: its token ids, the engine's log-prob of each, and why it stopped."""

    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str  # "stop" (EOS or a stop token) or "length"


@dataclass
class SyncStats:
    """What one weight sync cost."""

    bytes: int
    buckets: int
    seconds: float


@dataclass
class GenerateStats:
    """What one ``generate`` call did: tokens in and out, how many prompt tokens came from a prefix cache."""

    prompts: int
    samples: int
    prompt_tokens: int  # prompt tokens over all samples, as if each sample were prefilled on its own
    cached_prompt_tokens: int  # of those, the ones served from a cache instead of being prefilled
    completion_tokens: int
    seconds: float

    @property
    def completion_tokens_per_second(self) -> float:
        return self.completion_tokens / self.seconds if self.seconds > 0 else 0.0

    @property
    def prefix_hit_rate(self) -> float:
        return self.cached_prompt_tokens / self.prompt_tokens if self.prompt_tokens else 0.0


class RolloutEngine(Protocol):
    """What the trainer and the expert pool need from a generator."""

    last_stats: GenerateStats | None  # the most recent ``generate`` call's counts and time

    def generate(
        self,
        prompts: Sequence[Prompt],
        n: int,
        sampling: SamplingParams,
        seeds: Sequence[Sequence[int]],
    ) -> list[list[Completion]]:
        """Sample ``n`` completions per prompt; ``seeds[i][j]`` seeds sample ``j`` of prompt ``i``.

        Returns one list of ``n`` completions per prompt, in prompt order.
        """
        ...

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> SyncStats:
        """Load new policy weights (transformers parameter names) and drop any cached prefixes."""
        ...

    def release_memory(self) -> None:
        """Free the engine's accelerator memory (KV cache, weights) before the learner runs."""
        ...

    def resume_memory(self) -> None:
        """Take back the memory released by :meth:`release_memory`."""
        ...

    def shutdown(self) -> None:
        ...


def check_generate_args(prompts: Sequence[Prompt], n: int, seeds: Sequence[Sequence[int]]) -> None:
    """Raise unless ``seeds`` holds one list of ``n`` distinct seeds per prompt (the contract of ``generate``)."""
    if n < 1:
        raise ValueError(f"n={n}: each prompt needs at least one sample")
    if len(seeds) != len(prompts) or any(len(group) != n for group in seeds):
        shape = [len(group) for group in seeds]
        raise ValueError(
            f"seeds must hold one list of n={n} seeds per prompt ({len(prompts)} prompts); got lengths {shape}"
        )
    for group in seeds:
        if len(set(group)) != len(group):
            raise ValueError(f"seeds within a group must differ, or its samples repeat each other: got {list(group)}")
