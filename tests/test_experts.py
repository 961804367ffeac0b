"""The expert pool with local experts: the oracle, SGLang-style engines, unsolved-only infusion, failures,
prefix guidance, configs."""

from __future__ import annotations

import math
import random
import time

import pytest

from ekipl.config_loader import ConfigError, from_dict
from ekipl.data.answers import extract_answer
from ekipl.data.prompts import encode_prompt
from ekipl.data.records import load_records
from ekipl.data.synthetic import write_synthetic_dataset
from ekipl.data.tasks import SYNTHETIC_TASK
from ekipl.experts.base import ExpertAnswer, ExpertReply
from ekipl.experts.config import ExpertConfig, ExpertPoolConfig
from ekipl.experts.oracle_expert import OracleExpert
from ekipl.experts.pool import ExpertPool
from ekipl.experts.prefix import guided_completion, prefix_length, prefixed_prompts
from ekipl.experts.sglang_expert import SGLangExpert
from ekipl.rewards import accuracy_reward
from ekipl.data import Prompt
from ekipl.rollout.base import Completion, SamplingParams
from ekipl.rollout.hf import HFEngine




@pytest.fixture(scope="module")
def records(tmp_path_factory):
    folder = tmp_path_factory.mktemp("synthetic")
    dataset = write_synthetic_dataset(folder, n_train=6, n_test=1, seed=random.randrange(10_000))
    return list(load_records(dataset.train, task=SYNTHETIC_TASK, image_root=dataset.image_root))


@pytest.fixture(scope="module")
def prompts(processor, records):
    return [encode_prompt(processor, r, max_pixels=112 * 112, max_prompt_len=4096) for r in records]


def oracle(name: str, **overrides) -> ExpertConfig:
    return ExpertConfig(name=name, kind="oracle", **overrides)


def reward(answer: ExpertAnswer, record) -> float:
    return accuracy_reward(answer.text, record.solution)


class RecordingExpert:
    """Wraps an expert, remembering every call."""

    def __init__(self, inner):
        self.inner, self.config, self.shares_prefix = inner, inner.config, inner.shares_prefix
        self.calls: list[tuple[str, list[int]]] = []

    def answer(self, request, sample_indices, deadline):
        self.calls.append((request.uid, list(sample_indices)))
        return self.inner.answer(request, sample_indices, deadline)

    def close(self):
        self.inner.close()


class ScriptedExpert:
    """Replies with whatever ``behave(sample_index)`` returns, or raises what it raises."""

    shares_prefix = False

    def __init__(self, config, behave):
        self.config, self.behave = config, behave

    def answer(self, request, sample_indices, deadline):
        return [reply for reply in (self.behave(index) for index in sample_indices) if reply is not None]

    def close(self):
        pass


class RecordingEngine:
    """A rollout engine that remembers each generate call's prompts, n and seeds."""

    def __init__(self, inner):
        self.inner = inner
        self.calls = []
        self.shut_down = False

    def generate(self, prompts, n, sampling, seeds):
        self.calls.append((list(prompts), n, [list(group) for group in seeds]))
        return self.inner.generate(prompts, n, sampling, seeds)

    def shutdown(self):
        self.shut_down = True


def test_oracle_experts_answer_synthetic_records(processor, records, prompts):
    config = ExpertPoolConfig(experts=(oracle("exact", k=2), oracle("sloppy", k=3, error_rate=1.0)))
    with ExpertPool(config, processor, seed=random.randrange(1000), reward_fn=reward) as pool:
        answers = pool.collect(pool.submit(records, prompts, step=3))
        metrics = pool.step_metrics()
        again = pool.collect(pool.submit(records, prompts, step=3))
    for record, per_prompt in zip(records, answers):
        gold = int(record.gold_answer)
        assert [(a.expert_id, a.sample_index) for a in per_prompt] == [(1, 0), (1, 1), (2, 0), (2, 1), (2, 2)]
        for answer in per_prompt:
            predicted = int(extract_answer(answer.text))
            assert predicted == gold if answer.expert == "exact" else abs(predicted - gold) == 1
            assert answer.reward == (1.0 if answer.expert == "exact" else 0.0)
            assert processor.tokenizer.decode(answer.token_ids[:-1], skip_special_tokens=False) == answer.text
    assert metrics["experts/exact/reward_mean"] == 1.0 and metrics["experts/sloppy/reward_mean"] == 0.0
    assert metrics["experts/exact/received"] == 2 * len(records)
    assert metrics["experts/sloppy/received"] == 3 * len(records)
    assert metrics["experts/prompts_asked_frac"] == 1.0
    assert [[a.text for a in p] for p in answers] == [[a.text for a in p] for p in again]  # seeded per sample


def test_unsolved_infusion_asks_only_for_unsolved_prompts(processor, records, prompts):
    rng = random.Random()
    config = ExpertPoolConfig(experts=(oracle("oracle", k=2),), infuse_when="unsolved", reward_threshold=2.0)
    expert = RecordingExpert(OracleExpert(config.experts[0]))
    policy_rewards = [[rng.choice([0.0, 1.0, 2.0]) for _ in range(4)] for _ in records]
    policy_rewards[0] = [2.0, 0.0, 1.0, 0.0]  # solved once is solved
    policy_rewards[1] = [1.0, 1.0, 0.0, 1.0]  # right answer, bad format: not solved
    unsolved = [max(rewards) < 2.0 for rewards in policy_rewards]
    with ExpertPool(config, processor, experts=[expert]) as pool:
        assert pool.enabled and not pool.infuse_always
        answers = pool.collect(pool.submit_unsolved(records, prompts, policy_rewards))
        metrics = pool.step_metrics()
    asked = [r.id for r, needed in zip(records, unsolved) if needed]
    assert sorted(uid for uid, _ in expert.calls) == sorted(asked)
    assert [len(per_prompt) for per_prompt in answers] == [2 if needed else 0 for needed in unsolved]
    assert metrics["experts/oracle/requested"] == 2 * len(asked)
    assert metrics["experts/prompts_asked_frac"] == pytest.approx(len(asked) / len(records))


def test_a_failing_expert_never_fails_the_step(processor, records, prompts):
    def broken(index):
        raise RuntimeError("engine crashed")

    def patchy(index):
        if index == 0:
            return ExpertReply(index, "   ")  # empty
        if index == 1:
            return ExpertReply(index, "<answer>1</answer><|im_end|> and more")  # holds the end of turn
        if index == 2:
            return None  # never given
        return ExpertReply(index, "<think>So.</think> <answer>7</answer>", latency_s=0.25)

    config = ExpertPoolConfig(experts=(oracle("broken", k=2), oracle("patchy", k=4), oracle("fine", k=1)))
    experts = [ScriptedExpert(config.experts[0], broken), ScriptedExpert(config.experts[1], patchy),
               OracleExpert(config.experts[2])]
    with ExpertPool(config, processor, experts=experts) as pool:
        answers = pool.collect(pool.submit(records[:2], prompts[:2]))
        metrics = pool.step_metrics()
    assert [[(a.expert, a.sample_index) for a in p] for p in answers] == [[("patchy", 3), ("fine", 0)]] * 2
    assert metrics["experts/broken/failed"] == 4 and metrics["experts/broken/received"] == 0
    assert (metrics["experts/patchy/dropped"], metrics["experts/patchy/received"]) == (6, 2)
    assert metrics["experts/patchy/latency_s"] == pytest.approx(0.25)
    assert metrics["experts/fine/received"] == 2 and metrics["experts/fine/failed"] == 0
    assert pool.state_dict()["totals"]["patchy"]["dropped"] == 6


def test_collect_returns_by_the_deadline_while_an_expert_hangs(processor, records, prompts):
    released = []

    def hanging(index):
        deadline = time.monotonic() + 3.0
        while time.monotonic() < deadline and not released:
            time.sleep(0.01)
        return ExpertReply(index, "<answer>late</answer>")

    config = ExpertPoolConfig(experts=(oracle("hang", k=1, max_in_flight=1), oracle("fine")), expert_timeout_s=0.4)
    experts = [ScriptedExpert(config.experts[0], hanging), OracleExpert(config.experts[1])]
    pool = ExpertPool(config, processor, experts=experts)
    started = time.monotonic()
    answers = pool.collect(pool.submit(records[:3], prompts[:3]))
    assert time.monotonic() - started < 0.9
    released.append(True)
    pool.close()
    assert [[a.expert for a in p] for p in answers] == [["fine"]] * 3
    assert pool.step_metrics()["experts/hang/timed_out"] == 3  # one running, two queued behind max_in_flight=1


def test_sglang_expert_samples_a_group_per_prompt_and_keeps_logprobs(
    tiny_model_dir, policy, processor, records, prompts
):
    sampling = SamplingParams(temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=6)
    shared = ExpertConfig(name="twin", kind="sglang", model=str(tiny_model_dir), k=3, same_tokenizer=True,
                          sampling=sampling, max_pixels=112 * 112)
    foreign = ExpertConfig(name="other", kind="sglang", model=str(tiny_model_dir), k=2, sampling=sampling,
                           max_pixels=112 * 112)
    twin_engine = RecordingEngine(HFEngine(policy, processor))
    other_engine = RecordingEngine(HFEngine(policy, processor))
    experts = [SGLangExpert(shared, twin_engine, processor, thread_safe=False),
               SGLangExpert(foreign, other_engine, processor, thread_safe=False)]
    config = ExpertPoolConfig(experts=(shared, foreign))
    with ExpertPool(config, processor, experts=experts) as pool:
        answers = pool.collect(pool.submit(records[:3], prompts[:3], step=1))
        metrics = pool.step_metrics()
    assert twin_engine.shut_down and other_engine.shut_down

    # One call per prompt with the whole group, the policy's own prompt, distinct seeds.
    assert len(twin_engine.calls) == 3
    for (sent, n, seeds), prompt in zip(sorted(twin_engine.calls, key=lambda c: c[0][0].uid), prompts[:3]):
        assert sent == [prompt] and n == 3 and len(set(seeds[0])) == 3
    stop_ids = set(twin_engine.inner.stop_token_ids)
    for per_prompt in answers:
        twins = [a for a in per_prompt if a.expert == "twin"]
        assert [a.sample_index for a in twins] == [0, 1, 2] and all(a.expert_id == 1 for a in twins)
        for answer in twins:
            assert 1 <= len(answer.token_ids) <= 6 and len(answer.logprobs) == len(answer.token_ids)
            assert all(lp <= 0 for lp in answer.logprobs)
            assert (answer.token_ids[-1] in stop_ids) == (answer.finish_reason == "stop")
    # The other expert encoded the prompt with its own processor; its texts were re-tokenised (or dropped).
    assert all(sent[0].input_ids == p.input_ids for (sent, _, _), p in zip(
        sorted(other_engine.calls, key=lambda c: c[0][0].uid), prompts[:3]))
    others = [a for p in answers for a in p if a.expert == "other"]
    assert all(a.logprobs is None and a.token_ids[-1] == processor.tokenizer.eos_token_id for a in others)
    assert metrics["experts/other/received"] + metrics["experts/other/dropped"] == 6
    assert metrics["experts/twin/tokens"] == sum(len(a.token_ids) for p in answers for a in p if a.expert == "twin")


def test_prefix_guidance_tags_prefix_and_continuation(policy, processor, records, prompts):
    rng = random.Random()
    config = ExpertPoolConfig(experts=(oracle("a", k=2), oracle("b", k=1, error_rate=1.0)), prefix_ratio=0.4)
    with ExpertPool(config, processor) as pool:
        answers = pool.collect(pool.submit(records[:3], prompts[:3]))
    for per_prompt in answers:
        for answer in per_prompt:
            answer.reward = rng.random()
    answers[2] = []  # no expert answered this prompt: it keeps all its plain policy samples

    prefixed = prefixed_prompts(prompts[:3], answers, prefix_ratio=config.prefix_ratio, samples_per_prompt=4)
    assert [p.prompt_index for p in prefixed] == [0] * 4 + [1] * 4
    for item in prefixed:
        ranked = sorted(answers[item.prompt_index], key=lambda a: -a.reward)
        source = ranked[[p for p in prefixed if p.prompt_index == item.prompt_index].index(item) % len(ranked)]
        length = math.floor(0.4 * len(source.token_ids))
        assert item.expert_id == source.expert_id and item.prefix_ids == source.token_ids[:length]
        assert item.prompt.input_ids == prompts[item.prompt_index].input_ids + item.prefix_ids
        assert item.prompt.mm_inputs is prompts[item.prompt_index].mm_inputs and item.prefix_logprobs is None

    engine = HFEngine(policy, processor)
    sampling = SamplingParams(temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=5)
    continuations = engine.generate([p.prompt for p in prefixed], 1, sampling, [[i] for i in range(len(prefixed))])
    for item, (continuation,) in zip(prefixed, continuations):
        guided = guided_completion(item, continuation)
        assert guided.token_ids == item.prefix_ids + continuation.token_ids
        assert guided.origins == [item.expert_id] * len(item.prefix_ids) + [0] * len(continuation.token_ids)
        assert guided.behavior_logprobs is None and guided.continuation_logprobs == continuation.logprobs


def test_prefix_keeps_expert_logprobs_and_never_the_end_of_turn():
    rng = random.Random()
    tokens = [rng.randrange(100) for _ in range(rng.randint(5, 30))]
    answer = ExpertAnswer(uid="u", expert="twin", expert_id=2, sample_index=0, text="t", token_ids=tokens,
                          logprobs=[-rng.random() for _ in tokens])
    one_token = ExpertAnswer(uid="v", expert="twin", expert_id=2, sample_index=0, text="t", token_ids=[5])
    prompts = [Prompt(uid="u", input_ids=[1, 2, 3]), Prompt(uid="v", input_ids=[4])]
    (item,) = prefixed_prompts(prompts, [[answer], [one_token]], prefix_ratio=0.5, samples_per_prompt=1)
    continuation = Completion(token_ids=[7, 8], logprobs=[-0.5, -0.25], finish_reason="stop")
    guided = guided_completion(item, continuation)
    assert guided.behavior_logprobs == answer.logprobs[: len(item.prefix_ids)] + [-0.5, -0.25]
    assert prefix_length(10, 0.01) == 1 and prefix_length(10, 0.99) == 9 and prefix_length(1, 0.5) == 0


def test_configs_are_checked():
    config = from_dict(ExpertPoolConfig, {
        "experts": [{"name": "gpt", "kind": "openai", "model": "gpt-4o", "base_url": "https://api.openai.com/v1",
                     "api_key_env": "OPENAI_API_KEY", "sampling": {"temperature": 0.7}},
                    {"name": "oracle", "kind": "oracle", "k": 2}],
        "infuse_when": "unsolved",
    })
    assert [e.name for e in config.experts] == ["gpt", "oracle"] and config.expert_id("oracle") == 2
    assert config.experts[0].sampling.temperature == 0.7 and config.experts[0].is_online
    bad = [
        ({"experts": [{"name": "x", "kind": "gemini"}]}, "kind"),
        ({"experts": [{"name": "x", "kind": "openai", "model": "m"}]}, "base_url"),
        ({"experts": [{"name": "x", "kind": "sglang"}]}, "model"),
        ({"experts": [{"name": "x", "kind": "cache"}]}, "path"),
        ({"experts": [{"name": "x", "kind": "oracle"}, {"name": "x", "kind": "oracle"}]}, "duplicate"),
        ({"experts": [{"name": "x", "kind": "oracle", "k": 0}]}, "k=0"),
        ({"infuse_when": "sometimes"}, "infuse_when"),
        ({"prefix_ratio": 1.0}, "prefix_ratio"),
        ({"experts": [{"name": "x", "kind": "oracle", "temperature": 1.0}]}, "temperature"),
    ]
    for data, fragment in bad:
        with pytest.raises(ConfigError, match=fragment):
            from_dict(ExpertPoolConfig, data)


def test_an_api_key_in_api_key_env_is_refused_without_echoing_it():
    rng = random.Random()
    alphabet = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
    token = "".join(rng.choice(alphabet) for _ in range(37)) + "q7Z"
    secrets = ["sk-proj-" + token, "sk_" + token, "AIzaSy" + token[:33], token, "Bearer " + token, "key=" + token[:20]]
    for secret in secrets:
        data = {"experts": [{"name": "oracle", "kind": "oracle"},
                            {"name": "gpt", "kind": "openai", "model": "gpt-4o", "base_url": "https://x/v1",
                             "api_key_env": secret}]}
        with pytest.raises(ConfigError, match=r"experts\.experts\[1\].*api_key_env") as caught:
            from_dict(ExpertPoolConfig, data, "experts.")
        chain = [caught.value, caught.value.__cause__, caught.value.__context__]
        assert not any(secret in str(error) or secret in repr(error) for error in chain if error is not None)
        assert not any(part in str(caught.value) for part in (token[:8], token[-8:]))
    for name in ("OPENAI_API_KEY", "gemini_key", "AZURE_OPENAI_API_KEY_2", "_KEY", "OPENAI_KEY_PROJECT2024ALPHA"):
        assert ExpertConfig(name="gpt", kind="openai", model="m", base_url="https://x/v1", api_key_env=name)
