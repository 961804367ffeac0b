"""The expert pool: asks every configured expert for answers in the background, and hands over whatever
arrived by the step's deadline.

    pending = pool.submit(records, prompts, step=step)        # returns at once; experts work in threads
    ... the policy samples ...
    answers = pool.collect(pending)                           # per prompt, the answers that arrived in time

With ``infuse_when: unsolved`` the trainer scores the policy's samples first and calls
:meth:`ExpertPool.submit_unsolved`, which asks only for prompts no policy sample solved.

Each expert has its own thread pool of ``max_in_flight`` workers, so a slow expert never holds back
another, and its requests in flight stay bounded. Answers already in the on-disk cache are served without a
request; new ones are cached the moment they arrive, even after their step's deadline. A truncated answer
(``finish_reason: "length"``) joins its step like any other (its reward judges it; ``finish_reason`` travels
with it) but is never cached, so later steps ask for that sample again. A failing expert costs its answers,
never the step: every error is caught, counted and logged once per step; so is a prompt whose image can no
longer be read (deleted since loading) when its answers would be looked up in the cache.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass, field, fields
from typing import Callable, Optional, Sequence

from ekipl.data.records import Record
from ekipl.experts.base import (
    Expert,
    ExpertAnswer,
    ExpertReply,
    ExpertRequest,
    ExpertTimeoutError,
    MalformedReplyError,
    stable_seed,
)
from ekipl.experts.build import build_expert
from ekipl.experts.cache import AnswerCache
from ekipl.experts.config import ExpertPoolConfig
from ekipl.experts.retokenize import Retokenizer
from ekipl.data import Prompt

logger = logging.getLogger(__name__)

RewardFn = Callable[[ExpertAnswer, Record], float]


@dataclass
class ExpertStats:
    """One expert's tally for one step (answers, not requests: an expert asked for k answers counts k).

    requested: answers asked for. received: answers handed to the trainer. from_cache: of those, served
    from the answer cache. dropped: replies that came back unusable (malformed, empty, not re-tokenisable)
    or were not given, and answers not asked for because their prompt's image could not be read. failed:
    answers lost to errors (refused connections, HTTP errors, engine errors). timed_out: answers not there
    by the deadline. latency_s: summed over fresh answers. tokens: summed over received answers.
    """

    requested: int = 0
    received: int = 0
    from_cache: int = 0
    dropped: int = 0
    failed: int = 0
    timed_out: int = 0
    latency_s: float = 0.0
    tokens: int = 0

    def add(self, other: "ExpertStats") -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))


@dataclass
class _Call:
    expert_index: int
    request_index: int
    sample_indices: list[int]
    future: Future


@dataclass
class PendingAnswers:
    """What :meth:`ExpertPool.submit` started; pass it to :meth:`ExpertPool.collect`."""

    requests: list[ExpertRequest]
    asked: list[bool]
    deadline: float
    calls: list[_Call] = field(default_factory=list)
    cached: list[tuple[int, int, ExpertReply]] = field(default_factory=list)  # (expert, request, reply)
    unreadable: list[tuple[int, int, str]] = field(default_factory=list)  # (expert, answers lost, why)


class ExpertPool:
    """All configured experts, asked concurrently.

    ``processor``: the policy's processor or tokenizer; answers are re-tokenised into it (None: answers keep
    only their text, and an expert's own token ids if it shares the policy's tokenizer; for precomputing).
    ``seed``: the run's seed (with the step, it seeds experts that sample locally).
    ``max_answer_tokens``: answers longer than this in the policy's tokens are dropped.
    ``reward_fn(answer, record)``: when given, :meth:`collect` fills ``answer.reward``; the trainer may set
    rewards itself instead. Either way :meth:`step_metrics` reports each expert's mean reward.
    ``experts``: the expert objects, one per configured expert, in order (default: built from the config).
    """

    def __init__(
        self,
        config: ExpertPoolConfig,
        processor=None,
        *,
        seed: int = 0,
        max_answer_tokens: Optional[int] = None,
        reward_fn: Optional[RewardFn] = None,
        experts: Optional[Sequence[Expert]] = None,
    ):
        self.config = config
        self.seed = seed
        self.reward_fn = reward_fn
        self.retokenizer = Retokenizer(processor, max_tokens=max_answer_tokens) if processor is not None else None
        self.max_answer_tokens = max_answer_tokens
        if experts is not None and len(experts) != len(config.experts):
            raise ValueError(f"got {len(experts)} expert objects for {len(config.experts)} configured experts")
        self.experts: list[Expert] = list(experts) if experts is not None else [build_expert(c) for c in config.experts]
        self.caches: list[Optional[AnswerCache]] = [
            AnswerCache(config.cache_dir, c) if config.cache_dir and c.is_online else None for c in config.experts
        ]
        self._executors = [
            ThreadPoolExecutor(max_workers=c.max_in_flight, thread_name_prefix=f"ekipl-expert-{c.name}")
            for c in config.experts
        ]
        self.totals = {c.name: ExpertStats() for c in config.experts}
        self.last_stats: dict[str, ExpertStats] = {}
        self.last_answers: list[list[ExpertAnswer]] = []
        self.last_prompts = 0
        self.last_prompts_asked = 0
        self._closed = False

    # -- asking -----------------------------------------------------------------------------------------
    @property
    def enabled(self) -> bool:
        return bool(self.experts)

    @property
    def infuse_always(self) -> bool:
        """Whether experts are asked before the policy samples (``infuse_when: always``)."""
        return self.enabled and self.config.infuse_when == "always"

    def submit(
        self, records: Sequence[Record], prompts: Optional[Sequence[Prompt]] = None, *, step: int = 0
    ) -> PendingAnswers:
        """Ask every expert for ``k`` answers to every prompt; returns at once."""
        return self._submit(records, prompts, [True] * len(records), step)

    def submit_unsolved(
        self,
        records: Sequence[Record],
        prompts: Optional[Sequence[Prompt]],
        policy_rewards: Sequence[Sequence[float]],
        *,
        step: int = 0,
    ) -> PendingAnswers:
        """Ask only for the prompts where no policy sample reached ``reward_threshold``."""
        if len(policy_rewards) != len(records):
            raise ValueError(f"got policy rewards for {len(policy_rewards)} prompts, but {len(records)} records")
        threshold = self.config.reward_threshold
        asked = [not any(reward >= threshold for reward in rewards) for rewards in policy_rewards]
        return self._submit(records, prompts, asked, step)

    def _submit(self, records, prompts, asked: list[bool], step: int) -> PendingAnswers:
        if self._closed:
            raise RuntimeError("the expert pool was closed")
        if prompts is not None and len(prompts) != len(records):
            raise ValueError(f"got {len(prompts)} prompts for {len(records)} records")
        request_seed = stable_seed(self.seed, step)
        requests = [
            ExpertRequest(record, prompts[i] if prompts is not None else None, seed=request_seed)
            for i, record in enumerate(records)
        ]
        pending = PendingAnswers(requests, asked, deadline=time.monotonic() + self.config.expert_timeout_s)
        for expert_index, expert in enumerate(self.experts):
            cache = self.caches[expert_index]
            for request_index, request in enumerate(requests):
                if not asked[request_index]:
                    continue
                if cache is not None:
                    try:
                        prompt_hash = request.prompt_hash
                    except OSError as error:  # an image deleted or unreadable since the records were loaded
                        pending.unreadable.append((expert_index, expert.config.k, f"prompt {request.uid!r}: {error}"))
                        continue
                missing = []
                for sample_index in range(expert.config.k):
                    reply = cache.get(prompt_hash, sample_index) if cache is not None else None
                    if reply is None:
                        missing.append(sample_index)
                    else:
                        pending.cached.append((expert_index, request_index, reply))
                groups = [missing] if expert.shares_prefix else [[index] for index in missing]
                for indices in filter(None, groups):
                    future = self._executors[expert_index].submit(
                        self._ask, expert_index, request, indices, pending.deadline
                    )
                    pending.calls.append(_Call(expert_index, request_index, indices, future))
        return pending

    def _ask(self, expert_index: int, request: ExpertRequest, indices: list[int], deadline: float) -> list[ExpertReply]:
        """Runs in the expert's worker thread: the call, then the cache, so late answers are kept too."""
        replies = self.experts[expert_index].answer(request, indices, deadline)
        cache = self.caches[expert_index]
        if cache is not None:
            for reply in replies:
                if reply.sample_index in indices:
                    cache.put(request.prompt_hash, reply)
        return replies

    # -- collecting -------------------------------------------------------------------------------------
    def collect(self, pending: PendingAnswers, *, deadline: Optional[float] = None) -> list[list[ExpertAnswer]]:
        """The answers that arrived by ``deadline`` (default: the step's, ``expert_timeout_s`` after submit),
        one list per prompt in submission order, sorted by expert then sample. Never raises for an expert's
        failure; what is missing is counted in :meth:`step_metrics`."""
        deadline = pending.deadline if deadline is None else deadline
        wait_futures([call.future for call in pending.calls], timeout=max(0.0, deadline - time.monotonic()))
        stats = [ExpertStats() for _ in self.experts]
        errors: dict[int, str] = {}
        answers: list[list[ExpertAnswer]] = [[] for _ in pending.requests]
        for expert_index, expert in enumerate(self.experts):
            stats[expert_index].requested = expert.config.k * sum(pending.asked)

        def accept(expert_index: int, request_index: int, reply: ExpertReply) -> None:
            try:
                answer = self._to_answer(expert_index, pending.requests[request_index], reply)
            except MalformedReplyError as error:
                stats[expert_index].dropped += 1
                errors.setdefault(expert_index, str(error))
                return
            tally = stats[expert_index]
            tally.received += 1
            tally.from_cache += answer.from_cache
            tally.latency_s += 0.0 if answer.from_cache else answer.latency_s
            tally.tokens += len(answer.token_ids or ())
            answers[request_index].append(answer)

        for expert_index, lost, why in pending.unreadable:
            stats[expert_index].dropped += lost
            errors.setdefault(expert_index, why)
        for expert_index, request_index, reply in pending.cached:
            accept(expert_index, request_index, reply)
        for call in pending.calls:
            tally = stats[call.expert_index]
            wanted = len(call.sample_indices)
            if not call.future.done():
                call.future.cancel()  # a call still queued never starts; a running one ends by the deadline
                tally.timed_out += wanted
                continue
            try:
                replies = call.future.result()
            except ExpertTimeoutError as error:
                tally.timed_out += wanted
                errors.setdefault(call.expert_index, str(error))
                continue
            except MalformedReplyError as error:
                tally.dropped += wanted
                errors.setdefault(call.expert_index, str(error))
                continue
            except Exception as error:  # noqa: BLE001 - an expert's failure must never fail the step
                tally.failed += wanted
                errors.setdefault(call.expert_index, f"{type(error).__name__}: {error}")
                continue
            by_index = {reply.sample_index: reply for reply in replies if reply.sample_index in call.sample_indices}
            tally.dropped += wanted - len(by_index)
            for reply in by_index.values():
                accept(call.expert_index, call.request_index, reply)

        for per_prompt in answers:
            per_prompt.sort(key=lambda answer: (answer.expert_id, answer.sample_index))
        if self.reward_fn is not None:
            for request, per_prompt in zip(pending.requests, answers):
                for answer in per_prompt:
                    answer.reward = float(self.reward_fn(answer, request.record))
        self._log_losses(stats, errors)
        self.last_stats = {expert.config.name: tally for expert, tally in zip(self.experts, stats)}
        for name, tally in self.last_stats.items():
            self.totals[name].add(tally)
        self.last_answers = answers
        self.last_prompts = len(pending.requests)
        self.last_prompts_asked = sum(pending.asked)
        return answers

    def _to_answer(self, expert_index: int, request: ExpertRequest, reply: ExpertReply) -> ExpertAnswer:
        expert = self.experts[expert_index].config
        if not reply.text.strip():
            raise MalformedReplyError(f"expert {expert.name!r} returned an empty answer")
        logprobs = None
        if reply.token_ids is not None and expert.same_tokenizer:
            token_ids = [int(token) for token in reply.token_ids]
            if reply.logprobs is not None:
                if len(reply.logprobs) != len(token_ids):
                    raise MalformedReplyError(
                        f"expert {expert.name!r}: {len(reply.logprobs)} log-probs for {len(token_ids)} tokens"
                    )
                logprobs = [float(value) for value in reply.logprobs]
            if self.max_answer_tokens is not None and len(token_ids) > self.max_answer_tokens:
                raise MalformedReplyError(
                    f"expert {expert.name!r}: {len(token_ids)} tokens, over the cap of {self.max_answer_tokens}"
                )
        elif self.retokenizer is not None:
            token_ids = self.retokenizer.encode(reply.text)
        else:
            token_ids = None
        return ExpertAnswer(
            uid=request.uid,
            expert=expert.name,
            expert_id=expert_index + 1,
            sample_index=reply.sample_index,
            text=reply.text,
            token_ids=token_ids,
            logprobs=logprobs,
            finish_reason=reply.finish_reason,
            latency_s=reply.latency_s,
            from_cache=reply.from_cache,
        )

    def _log_losses(self, stats: list[ExpertStats], errors: dict[int, str]) -> None:
        for expert_index, tally in enumerate(stats):
            lost = tally.dropped + tally.failed + tally.timed_out
            if lost:
                logger.warning(
                    "expert %r: %d of %d answers lost this step (%d dropped, %d failed, %d timed out); first: %s",
                    self.experts[expert_index].config.name, lost, tally.requested, tally.dropped, tally.failed,
                    tally.timed_out, errors.get(expert_index, "not in time"),
                )

    # -- metrics, state, shutdown -----------------------------------------------------------------------
    def step_metrics(self) -> dict[str, float]:
        """The last collected step, flat: ``experts/<name>/<stat>`` per expert (mean latency per fresh
        answer; mean reward of the answers whose ``reward`` is set), and the share of prompts asked."""
        if not self.enabled:
            return {}
        metrics: dict[str, float] = {}
        for expert_index, expert in enumerate(self.experts):
            name = expert.config.name
            tally = self.last_stats.get(name, ExpertStats())
            prefix = f"experts/{name}/"
            for f in fields(tally):
                if f.name != "latency_s":
                    metrics[prefix + f.name] = float(getattr(tally, f.name))
            fresh = tally.received - tally.from_cache
            metrics[prefix + "latency_s"] = tally.latency_s / fresh if fresh else 0.0
            metrics[prefix + "received_total"] = float(self.totals[name].received)
            rewards = [
                answer.reward
                for per_prompt in self.last_answers
                for answer in per_prompt
                if answer.expert_id == expert_index + 1 and answer.reward is not None
            ]
            if rewards:
                metrics[prefix + "reward_mean"] = sum(rewards) / len(rewards)
        asked = self.last_prompts_asked / self.last_prompts if self.last_prompts else 0.0
        metrics["experts/prompts_asked_frac"] = asked
        return metrics

    def state_dict(self) -> dict:
        """The cumulative tallies (the answers themselves live in the on-disk cache)."""
        return {"totals": {name: vars(tally).copy() for name, tally in self.totals.items()}}

    def load_state_dict(self, state: dict) -> None:
        for name, values in state.get("totals", {}).items():
            if name in self.totals:
                self.totals[name] = ExpertStats(**values)

    def close(self) -> None:
        """Wait for calls still running (each ends by its deadline) so their answers reach the cache, then
        release the experts and the cache files."""
        if self._closed:
            return
        self._closed = True
        for executor in self._executors:
            executor.shutdown(wait=True, cancel_futures=True)
        for expert in self.experts:
            expert.close()
        for cache in self.caches:
            if cache is not None:
                cache.close()

    def __enter__(self) -> "ExpertPool":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
