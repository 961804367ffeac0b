"""The experience maker: one step's prompts -> policy rollout -> expert infusion -> rewards -> groups -> sequences.

It needs a rollout engine, the expert pool and the rewards, never DeepSpeed, so a fake engine drives it in
tests. The learner only lends it a context that makes the policy's weights whole for generation (ZeRO-3).
"""

from __future__ import annotations

import contextlib
import hashlib
import random
from dataclasses import dataclass, replace
from typing import Callable, ContextManager, Optional, Sequence

from ekipl.config import TrainConfig
from ekipl.data import BadRecordError, Prompt, Record, decode_completion, encode_prompt
from ekipl.experts.pool import ExpertPool
from ekipl.experts.prefix import guided_completion, prefixed_prompts
from ekipl.groups import Candidate, Group, assemble_groups, record_group_metrics
from ekipl.metrics import PhaseTimer
from ekipl.packing import TrainSequence
from ekipl.rewards import RewardSet
from ekipl.rollout.base import RolloutEngine, SamplingParams
from ekipl.sampler import PromptSampler
from ekipl.step_stats import StepStats


def sample_seed(*parts: object) -> int:
    """A distinct 31-bit seed per (run seed, step, prompt, sample): no collisions inside a group."""
    digest = hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFFFFFF


@dataclass
class Experience:
    """One step's scored candidates (per prompt), the selected groups and the sequences to train on."""

    records: list[Record]
    policy: list[list[Candidate]]
    experts: list[list[Candidate]]
    groups: list[Group]
    sequences: list[TrainSequence]


class ExperienceMaker:
    """Makes each step's :class:`Experience` on this rank (its share of the step's prompts)."""

    def __init__(
        self,
        cfg: TrainConfig,
        *,
        records: Sequence[Record],
        sampler: PromptSampler,
        processor,
        engine: RolloutEngine,
        experts: ExpertPool,
        rewards: RewardSet,
        rank: int = 0,
        world: int = 1,
        generation_context: Callable[[], ContextManager] = contextlib.nullcontext,
    ) -> None:
        self.cfg, self.records, self.sampler = cfg, records, sampler
        self.processor, self.tokenizer = processor, processor.tokenizer
        self.engine, self.experts, self.rewards = engine, experts, rewards
        self.rank, self.world = rank, world
        self.generation_context = generation_context
        self.sampling = SamplingParams(cfg.rollout.temperature, cfg.rollout.top_p, cfg.rollout.top_k,
                                       cfg.rollout.max_new_tokens)
        self.skipped_rows = 0  # records that failed to encode at sampling time (data.skip_bad_rows)
        self._prompt_cache: dict[str, Prompt] = {}

    def make(self, step: int, timer: PhaseTimer) -> Experience:
        """Prompts -> policy answers -> rewards -> expert infusion -> groups -> the sequences to train on."""
        with timer.phase("prompts"):
            records, prompts = self.next_prompts()
        with timer.phase("experts_submit"):  # always-infused experts answer while the policy samples
            pending = self.experts.submit(records, prompts, step=step) if self.experts.infuse_always else None
        with timer.phase("rollout"):
            policy_answers = self.policy_rollout(prompts, self.plain_samples, step)
        with timer.phase("rewards"):
            policy = [[self.score(c.token_ids, r, source=0, behavior=c.logprobs, truncated=c.finish_reason == "length")
                       for c in group]
                      for group, r in zip(policy_answers, records)]
        with timer.phase("experts"):
            experts = self.infuse(records, prompts, policy, pending, step)
        with timer.phase("groups"):
            pooled = [p + e for p, e in zip(policy, experts)]
            rng = random.Random(sample_seed(self.cfg.run.seed, step, self.rank))
            groups = assemble_groups(pooled, self.cfg.group, rng)
            sequences = [TrainSequence(prompts[g.prompt_index], c.token_ids, c.origins, a, c.behavior_logprobs)
                         for g in groups for c, a in zip(g.members, g.advantages)]
        return Experience(records, policy, experts, groups, sequences)

    def infuse(self, records, prompts, policy: list[list[Candidate]], pending, step: int) -> list[list[Candidate]]:
        """Expert infusion: the experts' scored answers per prompt, and (prefix guidance) policy samples that
        continue an expert's prefix, appended to ``policy``."""
        if pending is None and self.experts.enabled:  # infuse_when: unsolved asks only now
            solved = [[c.reward for c in group] for group in policy]
            pending = self.experts.submit_unsolved(records, prompts, solved, step=step)
        answers = self.experts.collect(pending) if pending is not None else [[] for _ in records]
        experts = [[self.score_expert(a, r) for a in per_prompt] for per_prompt, r in zip(answers, records)]
        if self.cfg.experts.prefix_ratio > 0:
            for index, candidate in self.guided_rollout(prompts, answers, records, step):
                policy[index].append(candidate)
        return experts

    def next_prompts(self) -> tuple[list[Record], list[Prompt]]:
        """This rank's share of the step's prompts, encoded once and cached by record id.

        A record whose image fails to decode now (it passed the load-time check) is skipped and
        counted under ``data.skip_bad_rows``; otherwise it stops the run with the file and row.
        """
        indices = self.sampler.next_batch(self.cfg.data.prompts_per_step)
        records, prompts = [], []
        for index in indices[self.rank :: self.world]:
            record = self.records[index]
            try:
                prompts.append(self.encode(record))
            except BadRecordError:
                if not self.cfg.data.skip_bad_rows:
                    raise
                self.skipped_rows += 1
                continue
            records.append(record)
        return records, prompts

    def encode(self, record: Record) -> Prompt:
        if record.id not in self._prompt_cache:
            self._prompt_cache[record.id] = encode_prompt(
                self.processor, record, max_pixels=self.cfg.data.max_pixels, max_prompt_len=self.cfg.data.max_prompt_len
            )
        return self._prompt_cache[record.id]

    @property
    def plain_samples(self) -> int:
        """Policy samples per prompt; with prefix guidance, ``prefix_samples`` of them start from an expert prefix."""
        guided = self.cfg.experts.prefix_samples if self.cfg.experts.prefix_ratio > 0 and self.experts.enabled else 0
        return self.cfg.rollout.n_policy - guided

    def policy_rollout(self, prompts: Sequence[Prompt], n: int, step: int, tag: str = "",
                       sampling: Optional[SamplingParams] = None):
        seeds = [[sample_seed(self.cfg.run.seed, step, p.uid, tag, j) for j in range(n)] for p in prompts]
        with self.generation_context():
            return self.engine.generate(prompts, n, sampling or self.sampling, seeds)

    def guided_rollout(self, prompts, answers, records, step: int) -> list[tuple[int, Candidate]]:
        """LUFFY's prefix guidance: the policy continues the first part of expert answers (mixed origins)."""
        prefixed = prefixed_prompts(prompts, answers, prefix_ratio=self.cfg.experts.prefix_ratio,
                                    samples_per_prompt=self.cfg.experts.prefix_samples,
                                    max_new_tokens=self.cfg.rollout.max_new_tokens)
        if not prefixed:
            return []
        # prefix + continuation stay within rollout.max_new_tokens: one call with the largest budget,
        # and guided_completion cuts each continuation to its own
        sampling = replace(self.sampling, max_new_tokens=max(p.continuation_budget for p in prefixed))
        continuations = self.policy_rollout([p.prompt for p in prefixed], 1, step, tag="guided", sampling=sampling)
        guided = []
        for item, (continuation,) in zip(prefixed, continuations):
            joined = guided_completion(item, continuation)
            behavior = joined.behavior_logprobs or [float("nan")] * len(joined.prefix_ids) + joined.continuation_logprobs
            guided.append((item.prompt_index, self.score(joined.token_ids, records[item.prompt_index], source=0,
                                                         behavior=behavior, origins=joined.origins,
                                                         truncated=joined.continuation.finish_reason == "length")))
        return guided

    def score(self, token_ids, record: Record, *, source: int, behavior=None, origins=None, truncated=False) -> Candidate:
        text = decode_completion(self.tokenizer, token_ids)
        parts = self.rewards.components(text, record.solution)
        return Candidate(list(token_ids), source, sum(parts.values()), origins, behavior, parts, truncated)

    def score_expert(self, answer, record: Record) -> Candidate:
        candidate = self.score(answer.token_ids, record, source=answer.expert_id, behavior=answer.logprobs,
                               origins=answer.origins)
        answer.reward = candidate.reward  # the pool's per-expert metrics and prefix choice read it
        return candidate

    def stats(self, batch: Experience) -> StepStats:
        """Rewards, lengths, groups and experts of the step, over every rank (reduced by the caller).

        The policy's own samples are reported apart from prefix-guided ones, which start from an
        expert's prefix and would inflate ``reward/mean`` and ``response_length``.
        """
        stats = StepStats()
        own = [c for group in batch.policy for c in group if not c.guided]
        guided = [c for group in batch.policy for c in group if c.guided]
        infused = [c for group in batch.experts for c in group]
        stats.mean("reward/mean", [c.reward for c in own], std=True)
        for name in self.rewards.functions:
            stats.mean(f"reward/{name}", [c.reward_parts[name] for c in own])
        if "format" in self.rewards.functions:
            stats.mean("reward/format_rate", [float(c.reward_parts["format"] > 0) for c in own])
        stats.mean("response_length", [len(c.token_ids) for c in own])
        stats.mean("rollout/truncated_frac", [float(c.truncated) for c in own])
        stats.mean("reward/expert_mean", [c.reward for c in infused])
        stats.total("reward/expert_answers", len(infused))
        if self.cfg.experts.prefix_ratio > 0:
            stats.mean("guided/reward_mean", [c.reward for c in guided])
            stats.mean("guided/response_length", [len(c.token_ids) for c in guided])
            stats.total("guided/samples", len(guided))
        record_group_metrics(batch.groups, stats, [e.name for e in self.cfg.experts.experts])
        for key, value in self.experts.step_metrics().items():
            # the pool's counts add up over ranks; its latencies, rewards and fractions are per-rank means
            per_rank_mean = key.endswith(("latency_s", "reward_mean", "_frac"))
            (stats.rank_mean if per_rank_mean else stats.total)(key, value)
        return stats
