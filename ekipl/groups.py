"""Group assembly: pool policy and expert candidates, select the group, compute advantages, pack.

The paper's rule is ``topg``: of all candidates for a prompt (the policy's ``n_policy`` samples and the
experts' answers), the G with the highest reward form the group, whose z-scored rewards are the
advantages. ``all`` keeps every candidate; ``replace`` swaps ``replace_k`` policy samples for expert
answers (LUFFY's fixed mix).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

from .step_stats import StepStats


@dataclass(frozen=True)
class GroupConfig:
    """How groups are formed and scored.

    size: G, the group size (Reason-RFT: 8). With ``select: all`` it is ignored.
    select: "topg" (the G best by reward; the paper), "all", or "replace" (replace_k policy samples
        swapped for expert answers, as LUFFY does).
    tie_break: "policy" (among equal rewards prefer policy samples) or "random".
    min_policy: with topg, at least this many policy samples stay in every group.
    replace_k: with replace, how many expert answers replace policy samples.
    advantage: "zscore" ((r - mean) / (std + eps), the benchmark's) or "mean" (r - mean, LUFFY's).
    stats_from: "group" (mean/std over the selected group) or "policy" (over its policy samples only, as
        LUFFY does). As in LUFFY, a single policy sample gives mean 0 and std 1, and policy samples that all
        score the same give std 1: when the policy always fails (the sparse-reward case experts exist for),
        an expert answer's advantage is ``r - mean``, not ``(r - mean) / eps``. A group without policy
        samples (topg kept only experts) uses the group's statistics.
    eps: the eps of the z-score (Reason-RFT: 1e-4).
    """

    size: int = 8
    select: str = "topg"
    tie_break: str = "policy"
    min_policy: int = 0
    replace_k: int = 1
    advantage: str = "zscore"
    stats_from: str = "group"
    eps: float = 1e-4

    def __post_init__(self) -> None:
        choices = {"select": ("topg", "all", "replace"), "tie_break": ("policy", "random"),
                   "advantage": ("zscore", "mean"), "stats_from": ("group", "policy")}
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise ValueError(f"group.{key}={getattr(self, key)!r} is invalid: expected one of {allowed}")
        if self.size < 1:
            raise ValueError(f"group.size={self.size} is invalid: expected >= 1")
        if not 0 <= self.min_policy <= self.size:
            raise ValueError(f"group.min_policy={self.min_policy} is invalid: expected 0..group.size")
        if self.replace_k < 0:
            raise ValueError(f"group.replace_k={self.replace_k} is invalid: expected >= 0")


@dataclass
class Candidate:
    """One answer to a prompt, from the policy (source 0) or from expert ``source`` > 0.

    ``origins`` tags every completion token (a prefix-guided sample mixes an expert prefix with the
    policy's continuation); ``behavior_logprobs`` are the generator's own log-probs where known.
    """

    token_ids: list[int]
    source: int
    reward: float
    origins: Optional[list[int]] = None
    behavior_logprobs: Optional[list[float]] = None
    reward_parts: dict[str, float] = field(default_factory=dict)
    truncated: bool = False  # stopped at max_new_tokens, not at EOS

    def __post_init__(self) -> None:
        if self.origins is None:
            self.origins = [self.source] * len(self.token_ids)
        if len(self.origins) != len(self.token_ids):
            raise ValueError(f"origins has {len(self.origins)} entries for {len(self.token_ids)} tokens")

    @property
    def from_expert(self) -> bool:
        return self.source > 0

    @property
    def guided(self) -> bool:
        """A policy sample that continues an expert's prefix (LUFFY's prefix guidance): two origins in one."""
        return self.source == 0 and any(o > 0 for o in self.origins)


@dataclass
class Group:
    """The selected candidates of one prompt and their advantages."""

    prompt_index: int
    members: list[Candidate]
    advantages: list[float]

    @property
    def zero_variance(self) -> bool:
        rewards = [c.reward for c in self.members]
        return len(rewards) > 0 and max(rewards) == min(rewards)


def select_group(candidates: Sequence[Candidate], cfg: GroupConfig, rng: random.Random) -> list[Candidate]:
    """The members of one group, chosen from the pooled candidates by ``cfg.select``."""
    if cfg.select == "all":
        return list(candidates)
    policy = [c for c in candidates if not c.from_expert]
    experts = [c for c in candidates if c.from_expert]
    if cfg.select == "replace":
        swapped = experts[: min(cfg.replace_k, len(experts), len(policy))]
        return policy[: max(len(policy) - len(swapped), 0)] + swapped

    def rank_key(c: Candidate):
        tie = rng.random() if cfg.tie_break == "random" else (0 if not c.from_expert else 1)
        return (-c.reward, tie)

    kept_policy = sorted(policy, key=rank_key)[: cfg.min_policy]
    rest = sorted((c for c in candidates if not any(c is k for k in kept_policy)), key=rank_key)
    return kept_policy + rest[: max(cfg.size - len(kept_policy), 0)]


def advantages_of(members: Sequence[Candidate], cfg: GroupConfig) -> list[float]:
    """Group-relative advantages: z-score or mean-centred rewards, statistics from group or policy."""
    rewards = torch.tensor([c.reward for c in members], dtype=torch.float64)
    policy = torch.tensor([c.reward for c in members if not c.from_expert], dtype=torch.float64)
    if cfg.stats_from == "policy" and policy.numel() == 1:
        mean, std = 0.0, 1.0  # one sample is no baseline (LUFFY)
    elif cfg.stats_from == "policy" and policy.numel() > 1:
        # Equal policy rewards would leave the experts' non-zero centred rewards divided by eps alone; compared
        # exactly, since the std of equal floats can come out a rounding error above 0.
        mean, std = policy.mean().item(), policy.std().item() if policy.max() > policy.min() else 1.0
    else:
        # Over the whole group a zero std comes with zero centred rewards: eps alone is harmless.
        mean, std = rewards.mean().item(), rewards.std().item() if rewards.numel() > 1 else 0.0
    centred = rewards - mean
    if cfg.advantage == "zscore":
        centred = centred / (std + cfg.eps)
    return centred.tolist()


def assemble_groups(
    pooled: Sequence[Sequence[Candidate]], cfg: GroupConfig, rng: random.Random
) -> list[Group]:
    """One group per prompt from its pooled candidates."""
    groups = []
    for prompt_index, candidates in enumerate(pooled):
        members = select_group(candidates, cfg, rng)
        groups.append(Group(prompt_index, members, advantages_of(members, cfg) if members else []))
    return groups


def record_group_metrics(groups: Sequence[Group], stats: StepStats, expert_names: Sequence[str]) -> None:
    """Zero-variance groups, the paper's action-source ratio (share of selected answers from experts), the
    share of expert tokens and of each expert's answers among the selected."""
    members = [c for g in groups for c in g.members]
    zero_variance = sum(g.zero_variance for g in groups)
    stats.total("groups/zero_variance", zero_variance)
    stats.ratio("groups/zero_variance_frac", zero_variance, len(groups))
    stats.ratio("groups/action_source_ratio", sum(c.from_expert for c in members), len(members))
    stats.ratio("groups/expert_token_frac", sum(sum(1 for o in c.origins if o > 0) for c in members),
                sum(len(c.origins) for c in members))
    stats.ratio("groups/size_mean", len(members), len(groups))
    for source, name in enumerate(expert_names, start=1):
        stats.ratio(f"groups/selected_share/{name}", sum(c.source == source for c in members), len(members))
