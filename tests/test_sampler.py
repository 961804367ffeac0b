from ekipl.sampler import PromptSampler


def test_epochs_are_permutations_and_resume_is_exact():
    sampler = PromptSampler(10, seed=3)
    first = sampler.next_batch(4) + sampler.next_batch(4) + sampler.next_batch(2)
    assert sorted(first) == list(range(10))
    crossing = sampler.next_batch(7)  # epoch 1
    state = sampler.state_dict()
    expected = sampler.next_batch(9)  # crosses into epoch 2
    resumed = PromptSampler(10, seed=3)
    resumed.load_state_dict(state)
    assert resumed.next_batch(9) == expected
    assert len(set(crossing)) == 7
