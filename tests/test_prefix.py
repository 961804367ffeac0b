"""Prefix guidance under the completion-length cap: prefix and continuation together stay within it."""

from ekipl.experts.base import ExpertAnswer
from ekipl.experts.prefix import guided_completion, prefixed_prompts
from ekipl.data import Prompt
from ekipl.rollout.base import Completion


def answer(uid, length, reward, expert_id=1):
    return ExpertAnswer(uid=uid, expert="e", expert_id=expert_id, sample_index=0, text="t",
                        token_ids=list(range(100, 100 + length)), reward=reward)


def continuation(length, finish="stop"):
    return Completion(list(range(length)), [-0.5] * length, finish)


def test_continuation_budget_is_the_cap_less_the_prefix():
    prompts = [Prompt("a", [1, 2]), Prompt("b", [3])]
    # Prefix 0.5: 10 tokens give a 5-token prefix (budget 3 of 8); 16 give 8, which fills the cap: not used.
    answers = [[answer("a", 16, 2.0, expert_id=2), answer("a", 10, 1.0)], [answer("b", 16, 2.0)]]
    items = prefixed_prompts(prompts, answers, prefix_ratio=0.5, samples_per_prompt=2, max_new_tokens=8)
    assert [(p.prompt_index, len(p.prefix_ids), p.continuation_budget) for p in items] == [(0, 5, 3), (0, 5, 3)]
    assert all(p.expert_id == 1 for p in items)

    # The engine ran with a larger max_new_tokens (one call for every budget): what exceeds the budget is cut.
    long = guided_completion(items[0], continuation(6))
    assert len(long.token_ids) == 8 and long.continuation.token_ids == [0, 1, 2]
    assert long.finish_reason == "length" and long.continuation_logprobs == [-0.5] * 3
    assert long.origins == [1] * 5 + [0] * 3
    short = guided_completion(items[0], continuation(2))
    assert len(short.token_ids) == 7 and short.finish_reason == "stop"
    exact = guided_completion(items[0], continuation(3))
    assert exact.continuation.token_ids == [0, 1, 2] and exact.finish_reason == "stop"


def test_without_a_cap_nothing_is_budgeted():
    (item,) = prefixed_prompts([Prompt("a", [1])], [[answer("a", 16, 1.0)]], prefix_ratio=0.5, samples_per_prompt=1)
    assert item.continuation_budget is None
    assert len(guided_completion(item, continuation(20)).token_ids) == 8 + 20
