"""The transformers rollout engine: groups, seeds, stopping, log-probs equal to the learner's, weight sync."""

from __future__ import annotations

import copy

import pytest
import torch
from fakes.prompts import image_prompts

from ekipl.models import load_policy
from ekipl.rollout.base import SamplingParams
from ekipl.rollout.hf import HFEngine, filter_logits, sample_next_tokens




@pytest.fixture(scope="module")
def prompts(processor):
    return image_prompts(processor, 3, seed=11)


def teacher_forced_logprobs(model, prompt, completion_ids, temperature):
    """The learner's view, in plain torch: log_softmax(logits / T) of the whole sequence at the sampled tokens."""
    ids = torch.tensor([prompt.input_ids + completion_ids])
    with torch.no_grad():
        logits = (
            model(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                mm_token_type_ids=(ids == model.config.image_token_id).int(),
                **prompt.mm_inputs,
            )
            .logits[0]
            .double()
        )
    predicted = logits[len(prompt.input_ids) - 1 : -1] / temperature
    return predicted.log_softmax(-1).gather(-1, torch.tensor(completion_ids)[:, None]).squeeze(-1)


def test_groups_have_the_right_shape_and_stats(policy, processor, prompts):
    engine = HFEngine(policy, processor)
    sampling = SamplingParams(temperature=1.0, top_p=0.9, top_k=50, max_new_tokens=12)
    seeds = [[10 * i + j for j in range(4)] for i in range(len(prompts))]
    groups = engine.generate(prompts, 4, sampling, seeds)
    assert [len(group) for group in groups] == [4, 4, 4]
    for group in groups:
        for completion in group:
            assert len(completion.token_ids) == len(completion.logprobs) >= 1
            assert all(lp <= 0 for lp in completion.logprobs)
            if completion.finish_reason == "length":
                assert len(completion.token_ids) == 12
                assert not set(completion.token_ids) & set(engine.stop_token_ids)
            else:
                assert completion.finish_reason == "stop" and completion.token_ids[-1] in engine.stop_token_ids
    stats = engine.last_stats
    total_prompt = sum(len(p.input_ids) for p in prompts)
    assert (stats.prompts, stats.samples, stats.prompt_tokens) == (3, 12, 4 * total_prompt)
    assert stats.cached_prompt_tokens == 3 * total_prompt  # one prefill per group
    assert stats.completion_tokens == sum(len(c.token_ids) for g in groups for c in g)


def test_seeds_reproduce_samples_whatever_the_batch(policy, processor, prompts):
    engine = HFEngine(policy, processor)
    sampling = SamplingParams(temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=10)
    seeds = [[101, 102, 103], [201, 202, 203], [301, 302, 303]]
    first = engine.generate(prompts, 3, sampling, seeds)
    again = engine.generate(prompts, 3, sampling, seeds)
    assert [[c.token_ids for c in g] for g in first] == [[c.token_ids for c in g] for g in again]
    # Samples of a group differ from one another (distinct seeds), and another seed gives another sample.
    assert len({tuple(c.token_ids) for c in first[0]}) == 3
    other = engine.generate(prompts[:1], 3, sampling, [[104, 105, 106]])
    assert [c.token_ids for c in other[0]] != [c.token_ids for c in first[0]]
    # A sample depends on its prompt and seed only: alone, or batched one prompt at a time, it is the same.
    alone = engine.generate(prompts[2:], 1, sampling, [[302]])
    assert alone[0][0].token_ids == first[2][1].token_ids
    one_at_a_time = HFEngine(policy, processor, max_batch_size=3).generate(prompts, 3, sampling, seeds)
    assert [[c.token_ids for c in g] for g in one_at_a_time] == [[c.token_ids for c in g] for g in first]


@pytest.mark.parametrize("temperature", [1.0, 0.6, 1.7])
def test_logprobs_equal_the_teacher_forced_logprobs(policy, processor, prompts, temperature):
    engine = HFEngine(policy, processor)
    sampling = SamplingParams(temperature=temperature, top_p=1.0, top_k=0, max_new_tokens=16)
    groups = engine.generate(prompts, 2, sampling, [[1, 2], [3, 4], [5, 6]])
    for prompt, group in zip(prompts, groups):
        for completion in group:
            expected = teacher_forced_logprobs(policy, prompt, completion.token_ids, temperature)
            got = torch.tensor(completion.logprobs, dtype=torch.float64)
            assert torch.allclose(got, expected, atol=2e-5), (got - expected).abs().max()


def test_top_k_one_is_greedy_and_greedy_ignores_seeds(policy, processor, prompts):
    engine = HFEngine(policy, processor)
    greedy = engine.generate(prompts, 2, SamplingParams(temperature=0.0, max_new_tokens=8), [[1, 2], [3, 4], [5, 6]])
    top1 = engine.generate(
        prompts, 2, SamplingParams(temperature=1.3, top_k=1, max_new_tokens=8), [[7, 8], [9, 10], [11, 12]]
    )
    for greedy_group, top1_group in zip(greedy, top1):
        assert (
            greedy_group[0].token_ids == greedy_group[1].token_ids == top1_group[0].token_ids == top1_group[1].token_ids
        )
    # Temperature 0 reports log-probs of the unscaled distribution; the greedy token is its most likely.
    expected = teacher_forced_logprobs(policy, prompts[0], greedy[0][0].token_ids, 1.0)
    assert torch.allclose(torch.tensor(greedy[0][0].logprobs, dtype=torch.float64), expected, atol=2e-5)


def test_generation_stops_at_a_stop_token(policy, processor, prompts):
    probe = HFEngine(policy, processor).generate(
        prompts, 1, SamplingParams(temperature=0.0, max_new_tokens=4), [[0]] * 3
    )
    stop = probe[1][0].token_ids[2]  # the third greedy token of the second prompt
    engine = HFEngine(policy, processor, stop_token_ids=[stop])
    stopped = engine.generate(prompts, 1, SamplingParams(temperature=0.0, max_new_tokens=4), [[0]] * 3)
    assert stopped[1][0].token_ids == probe[1][0].token_ids[: probe[1][0].token_ids.index(stop) + 1]
    assert stopped[1][0].finish_reason == "stop"
    for before, after in zip(probe, stopped):  # finished rows leave the batch without disturbing the others
        cut = before[0].token_ids.index(stop) + 1 if stop in before[0].token_ids else None
        assert after[0].token_ids == before[0].token_ids[:cut]


def test_vision_placeholders_are_never_sampled_and_suppression_keeps_the_logprobs(policy, processor, prompts):
    engine = HFEngine(policy, processor)
    config = policy.config
    vision_ids = {
        config.image_token_id,
        config.video_token_id,
        config.vision_start_token_id,
        config.vision_end_token_id,
    }
    assert set(engine.suppress_token_ids) == vision_ids
    greedy = engine.generate(prompts, 1, SamplingParams(temperature=0.0, max_new_tokens=6), [[0]] * 3)
    banned = greedy[0][0].token_ids[0]
    steered = HFEngine(policy, processor, suppress_token_ids=[banned])
    sampling = SamplingParams(temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=6)
    groups = steered.generate(prompts, 4, sampling, [[1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 12]])
    for prompt, group in zip(prompts, groups):
        for completion in group:
            assert banned not in completion.token_ids
            expected = teacher_forced_logprobs(policy, prompt, completion.token_ids, 1.0)
            assert torch.allclose(torch.tensor(completion.logprobs, dtype=torch.float64), expected, atol=2e-5)


def test_bad_seed_lists_are_refused(policy, processor, prompts):
    engine = HFEngine(policy, processor)
    with pytest.raises(ValueError, match="one list of n=2"):
        engine.generate(prompts, 2, SamplingParams(), [[1, 2]])
    with pytest.raises(ValueError, match="must differ"):
        engine.generate(prompts[:1], 2, SamplingParams(), [[5, 5]])


def test_update_weights_copies_the_learners_weights(tiny_model_dir, policy, processor, prompts):
    rollout_model = load_policy(tiny_model_dir)
    learner = copy.deepcopy(policy)
    with torch.no_grad():
        for parameter in learner.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    engine = HFEngine(rollout_model, processor)
    sampling = SamplingParams(temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=6)
    stats = engine.update_weights(learner.named_parameters())
    assert stats.bytes == sum(p.numel() * p.element_size() for p in learner.parameters()) and stats.buckets == 1
    for (name, theirs), (_, ours) in zip(learner.named_parameters(), rollout_model.named_parameters()):
        assert torch.equal(theirs, ours), name
    after = engine.generate(prompts[:1], 1, sampling, [[3]])[0][0]
    got = torch.tensor(after.logprobs, dtype=torch.float64)
    assert torch.allclose(got, teacher_forced_logprobs(learner, prompts[0], after.token_ids, 1.0), atol=2e-5)
    assert not torch.allclose(got, teacher_forced_logprobs(policy, prompts[0], after.token_ids, 1.0), atol=1e-3)
    # The tied LM head may come under its own name too; a name the model lacks is refused by name.
    engine.update_weights([("lm_head.weight", learner.get_output_embeddings().weight)])
    with pytest.raises(KeyError, match="model.no_such.weight"):
        engine.update_weights([("model.no_such.weight", torch.zeros(1))])


def test_shared_engine_syncs_nothing(policy, processor):
    engine = HFEngine.from_shared(policy, processor)
    consumed = []

    def named():
        for item in policy.named_parameters():
            consumed.append(item[0])
            yield item

    stats = engine.update_weights(named())
    assert (stats.bytes, stats.buckets) == (0, 0) and consumed == []
    was_training = policy.training
    policy.train()
    engine.generate(image_prompts(processor, 1, seed=5), 1, SamplingParams(max_new_tokens=2), [[1]])
    assert policy.training  # generate switches to eval and back
    policy.train(was_training)


def test_filter_logits_keeps_the_top_k_and_the_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05]]))
    assert torch.isfinite(filter_logits(logits, top_k=2, top_p=1.0)).tolist() == [[True, True, False, False, False]]
    # Nucleus 0.6: tokens whose predecessors hold less than 0.6 stay (0.5 -> keep 0.2; 0.7 -> drop the rest).
    assert torch.isfinite(filter_logits(logits, top_k=0, top_p=0.6)).tolist() == [[True, True, False, False, False]]
    assert torch.isfinite(filter_logits(logits, top_k=0, top_p=0.1)).tolist() == [[True, False, False, False, False]]
    shuffled = logits[:, [3, 0, 4, 2, 1]]  # order does not matter
    assert torch.isfinite(filter_logits(shuffled, top_k=0, top_p=0.6)).tolist() == [[False, True, False, False, True]]


def test_sampling_draws_from_the_filtered_distribution():
    probs = torch.tensor([0.4, 0.3, 0.2, 0.1])
    rows = 4000
    logits = probs.log().expand(rows, -1).clone()
    generators = [torch.Generator().manual_seed(seed) for seed in range(rows)]
    tokens, logprobs = sample_next_tokens(logits, SamplingParams(temperature=1.0, top_p=0.75, top_k=0), generators)
    counts = torch.bincount(tokens, minlength=4).double() / rows
    # top_p 0.75 keeps the first three tokens, renormalised: 4/9, 3/9, 2/9.
    assert counts[3] == 0
    assert torch.allclose(counts[:3], torch.tensor([4, 3, 2], dtype=torch.float64) / 9, atol=0.03)
    # Log-probs are of the full distribution at the temperature, not the renormalised one.
    assert torch.allclose(logprobs, probs.log()[tokens], atol=1e-6)
    suppressed, _ = sample_next_tokens(
        logits[:500], SamplingParams(temperature=1.0), generators[:500], torch.tensor([0])
    )
    assert 0 not in suppressed.tolist() and len(set(suppressed.tolist())) == 3
