"""The experience maker without DeepSpeed: a scripted engine, the oracle expert, real rewards and groups."""

from __future__ import annotations

import random

import pytest

from ekipl.config import load_config
from ekipl.data import load_records
from ekipl.data.synthetic import write_synthetic_dataset
from ekipl.experience import ExperienceMaker
from ekipl.experts.pool import ExpertPool
from ekipl.metrics import PhaseTimer
from ekipl.rewards import RewardSet
from ekipl.rollout.base import Completion
from ekipl.sampler import PromptSampler

WRONG, FORMAT_ONLY = "no tags here", "<think>guess</think> <answer>99</answer>"


class ScriptedPolicy:
    """Answers every prompt with the same texts (sample j gets text j), records what it was asked."""

    def __init__(self, tokenizer, texts):
        self.tokenizer, self.texts, self.calls = tokenizer, texts, []

    def generate(self, prompts, n, sampling, seeds):
        self.calls.append((len(prompts), n, sampling.max_new_tokens, seeds))
        stop = self.tokenizer.convert_tokens_to_ids("<|im_end|>")
        encode = lambda text: self.tokenizer.encode(text, add_special_tokens=False)[: sampling.max_new_tokens]  # noqa: E731
        return [[Completion(encode(self.texts[j]) + [stop], [-0.5] * (len(encode(self.texts[j])) + 1), "stop")
                 for j in range(n)] for _ in prompts]


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    folder = tmp_path_factory.mktemp("synthetic")
    write_synthetic_dataset(folder, n_train=8, n_test=2, seed=3)
    return list(load_records(folder / "train.jsonl", task="synthetic", image_root=folder))


def maker(processor, records, engine, rank=0, world=1, **overrides):
    cfg = load_config(None, {"data.prompts_per_step": 4, "data.max_pixels": 12544, "rollout.n_policy": 2,
                             "rollout.max_new_tokens": 64, "experts.experts": [{"name": "oracle", "kind": "oracle", "k": 1}],
                             "group.size": 3, **overrides})
    experts = ExpertPool(cfg.experts, processor, seed=0, max_answer_tokens=64)
    return ExperienceMaker(cfg, records=records, sampler=PromptSampler(len(records), 0), processor=processor,
                           engine=engine, experts=experts, rewards=RewardSet.for_task("synthetic", None), rank=rank,
                           world=world)


def test_a_step_pools_policy_and_expert_answers_into_scored_groups(processor, records):
    engine = ScriptedPolicy(processor.tokenizer, [WRONG, FORMAT_ONLY])
    make = maker(processor, records, engine)
    batch = make.make(step=0, timer=PhaseTimer())
    make.experts.close()
    assert len(batch.records) == 4 and engine.calls[0][:3] == (4, 2, 64)
    assert [[c.reward for c in group] for group in batch.policy] == [[0.0, 1.0]] * 4  # format only, wrong count
    assert all(len(per_prompt) == 1 and per_prompt[0].reward == 2.0 for per_prompt in batch.experts)
    # top-G keeps the oracle's right answer and both policy samples; z-scored advantages sum to 0
    for group in batch.groups:
        assert sorted(c.source for c in group.members) == [0, 0, 1]
        assert sum(group.advantages) == pytest.approx(0.0, abs=1e-6)
    assert len(batch.sequences) == 12 and sum(any(o > 0 for o in s.origins) for s in batch.sequences) == 4
    stats = make.stats(batch).reduce()
    assert stats["reward/mean"] == 0.5 and stats["groups/action_source_ratio"] == pytest.approx(1 / 3)
    assert stats["groups/selected_share/oracle"] == pytest.approx(1 / 3) and stats["reward/expert_answers"] == 4.0


def test_ranks_share_the_prompts_and_seeds_differ_per_sample(processor, records):
    seen = []
    for rank in (0, 1):
        engine = ScriptedPolicy(processor.tokenizer, [WRONG, FORMAT_ONLY])
        make = maker(processor, records, engine, rank=rank, world=2, **{"experts.experts": []})
        batch = make.make(step=5, timer=PhaseTimer())
        seen.append({r.id for r in batch.records})
        seeds = [seed for group in engine.calls[0][3] for seed in group]
        assert len(seeds) == len(set(seeds)) == 4
    assert len(seen[0]) == len(seen[1]) == 2 and not seen[0] & seen[1]


def test_a_record_that_no_longer_encodes_is_skipped_and_counted(processor, records, tmp_path):
    import shutil
    from dataclasses import replace

    gone = tmp_path / "gone.png"
    shutil.copy(records[0].images[0], gone)
    broken = [replace(r, images=(str(gone),)) for r in records]
    gone.unlink()
    engine = ScriptedPolicy(processor.tokenizer, [WRONG, FORMAT_ONLY])
    make = maker(processor, broken[:1] + records[1:], engine, **{"data.skip_bad_rows": True, "experts.experts": []})
    random.seed(0)
    batches = [make.make(step=step, timer=PhaseTimer()) for step in range(2)]  # 8 prompts: every record once
    assert make.skipped_rows == 1 and sum(len(b.records) for b in batches) == 7
