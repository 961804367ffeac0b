"""Group assembly: selection rules, advantages, metrics and packing."""

import random
import statistics

import pytest
import torch

from ekipl.groups import Candidate, GroupConfig, advantages_of, assemble_groups, record_group_metrics, select_group
from ekipl.packing import TrainSequence, pack_sequences
from ekipl.data import Prompt
from ekipl.step_stats import StepStats


def cand(reward, source=0, n=3):
    return Candidate(token_ids=list(range(10, 10 + n)), source=source, reward=reward)


def test_topg_keeps_the_best_and_prefers_policy_on_ties():
    pool = [cand(0.0), cand(1.0), cand(2.0, source=1), cand(1.0, source=2), cand(0.5)]
    chosen = select_group(pool, GroupConfig(size=3), random.Random(0))
    assert [c.reward for c in chosen] == [2.0, 1.0, 1.0]
    assert [c.source for c in chosen] == [1, 0, 2]  # among the 1.0s, the policy's comes first


def test_topg_min_policy_keeps_policy_samples_even_when_worse():
    pool = [cand(0.0), cand(0.1), cand(2.0, source=1), cand(2.0, source=1), cand(2.0, source=2)]
    chosen = select_group(pool, GroupConfig(size=3, min_policy=1), random.Random(0))
    assert sum(not c.from_expert for c in chosen) == 1
    assert max(c.reward for c in chosen if not c.from_expert) == 0.1


def test_all_and_replace():
    pool = [cand(0.0), cand(1.0), cand(0.2), cand(2.0, source=1), cand(1.5, source=2)]
    assert len(select_group(pool, GroupConfig(select="all"), random.Random(0))) == 5
    chosen = select_group(pool, GroupConfig(select="replace", replace_k=1), random.Random(0))
    assert len(chosen) == 3 and sum(c.from_expert for c in chosen) == 1


def test_zscore_advantages_match_the_benchmark_formula():
    rewards = [random.Random(1).random() * 2 for _ in range(8)]
    members = [cand(r) for r in rewards]
    adv = advantages_of(members, GroupConfig(eps=1e-4))
    mean, std = statistics.mean(rewards), statistics.stdev(rewards)
    assert adv == pytest.approx([(r - mean) / (std + 1e-4) for r in rewards])
    mean_only = advantages_of(members, GroupConfig(advantage="mean"))
    assert mean_only == pytest.approx([r - mean for r in rewards])


def test_policy_statistics_and_zero_variance_groups():
    members = [cand(1.0), cand(0.0), cand(2.0, source=1)]
    adv = advantages_of(members, GroupConfig(advantage="mean", stats_from="policy"))
    assert adv == pytest.approx([0.5, -0.5, 1.5])
    groups = assemble_groups([[cand(1.0), cand(1.0)], members], GroupConfig(size=3), random.Random(0))
    stats = StepStats()
    record_group_metrics(groups, stats, expert_names=["gpt", "gemini"])
    metrics = stats.reduce()
    assert metrics["groups/zero_variance"] == 1.0 and metrics["groups/zero_variance_frac"] == 0.5
    assert metrics["groups/action_source_ratio"] == pytest.approx(1 / 5)
    assert metrics["groups/selected_share/gpt"] == pytest.approx(1 / 5) and metrics["groups/selected_share/gemini"] == 0.0
    assert groups[0].advantages == [0.0, 0.0]


def test_policy_statistics_never_divide_by_eps_alone():
    """The sparse-reward case experts exist for: every policy sample fails, one expert answer succeeds."""
    cfg = GroupConfig(stats_from="policy", eps=1e-4)
    failing = [cand(0.0) for _ in range(7)] + [cand(2.0, source=1)]
    assert advantages_of(failing, cfg) == pytest.approx([0.0] * 7 + [2.0 / (1 + 1e-4)])
    # A single policy sample: mean 0, std 1 (LUFFY), in both advantage modes.
    single = [cand(0.5), cand(2.0, source=1), cand(1.0, source=2)]
    assert advantages_of(single, cfg) == pytest.approx([r / (1 + 1e-4) for r in (0.5, 2.0, 1.0)])
    assert advantages_of(single, GroupConfig(stats_from="policy", advantage="mean")) == pytest.approx([0.5, 2.0, 1.0])
    # Equal rewards whose float std is a rounding error above zero count as equal.
    equal = [cand(0.1) for _ in range(3)] + [cand(1.1, source=1)]
    assert advantages_of(equal, cfg)[-1] == pytest.approx(1.0 / (1 + 1e-4))
    # Policy samples that differ: the usual z-score over them.
    mixed = [cand(0.0), cand(1.0), cand(2.0, source=1)]
    std = statistics.stdev([0.0, 1.0])
    assert advantages_of(mixed, cfg) == pytest.approx([(r - 0.5) / (std + 1e-4) for r in (0.0, 1.0, 2.0)])
    # No policy sample in the group: the group's own statistics; all equal gives zeros.
    experts = [cand(2.0, source=1), cand(0.0, source=2)]
    scale = 1 / (statistics.stdev([2.0, 0.0]) + 1e-4)
    assert advantages_of(experts, cfg) == pytest.approx([scale, -scale])
    assert advantages_of([cand(1.0, source=1), cand(1.0, source=2)], cfg) == [0.0, 0.0]
    assert advantages_of([cand(1.0, source=1)], cfg) == [0.0]


def test_invalid_group_config_names_the_key():
    with pytest.raises(ValueError, match="group.select"):
        GroupConfig(select="best")


def test_micro_batch_packs_completions_and_their_hidden_positions():
    prompts = [Prompt("a", [1, 2, 3]), Prompt("b", [4, 5])]
    seqs = [
        TrainSequence(prompts[0], [7, 8], origins=[0, 0], advantage=0.5),
        TrainSequence(prompts[1], [9, 10, 11], origins=[2, 2, 0], advantage=-1.0, behavior_logprobs=[-1.0, -2.0, -3.0]),
    ]
    batch = pack_sequences(seqs, pad_id=0, device=torch.device("cpu"))
    mb = batch.micro_batch()
    assert mb.input_ids.tolist() == [[1, 2, 3, 7, 8], [4, 5, 9, 10, 11]]
    assert mb.attention_mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 1]]
    assert mb.cu_seqlens.tolist() == [0, 2, 5]
    assert mb.targets.tolist() == [7, 8, 9, 10, 11]
    # the hidden state at position p-1 predicts token p; flat index = row * width + position
    assert mb.hidden_index.tolist() == [2, 3, 5 + 1, 5 + 2, 5 + 3]
    assert mb.input_ids.view(-1)[mb.hidden_index + 1].tolist() == mb.targets.tolist()
    assert mb.origin.tolist() == [0, 0, 2, 2, 0]
    # the first sequence has no behaviour log-probs: a mask says so, with no NaN in the values
    assert batch.behavior_mask.tolist() == [False, False, True, True, True]
    assert mb.behavior_logprobs.tolist() == [0.0, 0.0, -1.0, -2.0, -3.0]
