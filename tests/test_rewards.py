"""Rewards and evaluation scores: hand-written cases (the benchmark's quirks included) and range properties."""

import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ekipl.rewards import (
    REWARDS,
    RewardSet,
    accuracy_eval_score,
    accuracy_reward,
    eval_score_fn,
    format_reward,
    get_reward,
    reward_range,
    trance_eval_score,
    trance_reward,
)


@pytest.mark.parametrize(
    "completion, expected",
    [
        ("<think>count them</think><answer>3</answer>", 1.0),
        ("<think>line one\nline two</think>\n\n<answer>\n3\n</answer>", 1.0),  # dot matches newline
        ("<think></think><answer></answer>", 1.0),
        (" <think>a</think><answer>3</answer>", 0.0),  # the whole completion must match
        ("<think>a</think><answer>3</answer> and more", 0.0),
        ("<think>a</think> so <answer>3</answer>", 0.0),  # only whitespace between the blocks
        ("<answer>3</answer>", 0.0),
        ("<answer>3</answer><think>a</think>", 0.0),
        ("<think>a<answer>3</answer>", 0.0),
        ("", 0.0),
    ],
)
def test_format_reward(completion, expected):
    assert format_reward(completion, "<answer>3</answer>") == expected


@pytest.mark.parametrize(
    "completion, solution, expected",
    [
        ("<think>x</think><answer>3</answer>", "<answer>3</answer>", 1.0),
        ("<answer> 3 </answer>", "<answer> 3 </answer>", 1.0),  # both sides stripped
        ("<answer>\n3\n</answer>", "3", 1.0),  # an answer over several lines is still tagged
        ("<answer>3.0</answer>", "<answer>3</answer>", 0.0),  # the benchmark's quirk: exact match with tags
        ("<answer>three</answer>", "3", 0.0),
        ("<think>it is 3</think><answer>4</answer>", "3", 0.0),  # a wrong tag is not rescued by the text
        ("<answer>3</answer><answer>4</answer>", "3", 1.0),  # the first tag counts
        ("<answer>B</answer>", "<answer>B</answer>", 1.0),
        ("<answer>b</answer>", "<answer>B</answer>", 0.0),
        ("3.0", "<answer>3</answer>", 1.0),  # no tag: math-verify equivalence
        ("The answer is \\frac{1}{2}", "0.5", 1.0),
        ("B", "<answer>B</answer>", 1.0),  # no tag: the whole stripped completion matches
        ("4", "3", 0.0),
        ("I do not know", "3", 0.0),
        ("", "3", 0.0),
    ],
)
def test_accuracy_reward(completion, solution, expected):
    assert accuracy_reward(completion, solution) == expected


@pytest.mark.parametrize(
    "completion, gold, expected",
    [
        ("<answer>3.0</answer>", "3", 1.0),  # evaluation accepts equivalent answers, unlike training
        ("<answer>1/2</answer>", "0.5", 1.0),
        ("<answer>\n2.5\n</answer>", "2.5", 1.0),
        ("<answer>B</answer>", "B", 1.0),
        ("<answer>C</answer>", "B", 0.0),
        ("<answer>4</answer>", "3", 0.0),
        ("so the count is 3", "3", 1.0),
        ("no idea", "3", 0.0),
    ],
)
def test_accuracy_eval_score(completion, gold, expected):
    assert accuracy_eval_score(completion, gold) == expected


GOLD_TWO = "<answer>change_color(1, red) change_size(2, small)</answer>"


@pytest.mark.parametrize(
    "completion, solution, expected",
    [
        ("<answer>change_color(1, red) change_size(2, small)</answer>", GOLD_TWO, 1.0),
        ("<answer>change_size(2, small)\nchange_color(1, red)</answer>", GOLD_TWO, 1.0),  # order is free
        ("<answer>change_color(1, 'red'), change_size(2,'small')</answer>", GOLD_TWO, 1.0),  # quotes allowed
        ("<answer>change_color(1, red) change_size(3, small)</answer>", GOLD_TWO, 0.5),
        ("<answer>change_color(1, red)</answer>", GOLD_TWO, 0.5),  # divided by max(#pred, #gold)
        ("<answer>change_color(1, red) change_size(2, small) change_shape(3, cube)</answer>", GOLD_TWO, 2 / 3),
        # repeated calls: 2 distinct of 4 calls halves the credit
        ("<answer>change_color(1, red) change_color(1, red) change_size(2, small) change_size(2, small)</answer>",
         GOLD_TWO, 0.5),
        ("<answer>change_color(1, red) change_color(1, red)</answer>", "change_color(1, red)", 0.5),
        ("<answer>I cannot tell</answer>", GOLD_TWO, 0.0),  # nothing parses
        ("", GOLD_TWO, 0.0),
        ("<think>change_color(1, red)</think><answer>none</answer>", GOLD_TWO, 0.0),  # only the answer counts
        ("change_color(1, red) change_size(2, small)", GOLD_TWO, 1.0),  # untagged: the whole completion
        ("<answer>change_color(1, red)</answer>", "no calls here", 0.0),
    ],
)
def test_trance_reward(completion, solution, expected):
    assert trance_reward(completion, solution) == pytest.approx(expected)


@pytest.mark.parametrize(
    "completion, solution, expected",
    [
        ("<answer>change_color(1, red)</answer>", "change_color(1, red)", 1.0),
        ("<answer>change_color(1, blue)</answer>", "change_color(1, red)", 0.5),  # function and object
        ("<answer>change_color(2, red)</answer>", "change_color(1, red)", 0.5),  # function and value
        ("<answer>change_color(2, blue)</answer>", "change_color(1, red)", 0.25),  # function only
        ("<answer>change_size(1, red)</answer>", "change_color(1, red)", 0.0),
        ("<answer>change_color(1, red) change_size(3, large)</answer>", GOLD_TWO, (1 + 0.25) / 2),
        ("<answer>change_color(1, red) change_color(1, red)</answer>", "change_color(1, red)", 1.0),  # no penalty
        ("<answer>change_color(1, red) change_shape(4, cube) change_size(2, large)</answer>", GOLD_TWO,
         (1 + 0.5) / 3),
        # a call is used once: the second prediction finds no gold call left to pair with
        ("<answer>change_color(1, blue) change_color(1, green)</answer>", "change_color(1, red)", 0.5 / 2),
        ("<answer>nothing to do</answer>", GOLD_TWO, 0.0),
    ],
)
def test_trance_eval_score(completion, solution, expected):
    assert trance_eval_score(completion, solution) == pytest.approx(expected)


def test_trance_eval_score_is_deterministic_under_competing_partial_matches():
    # Both predictions share (function, object) with the one gold call; which one pairs first decides
    # whether the other earns (function, value) credit from the second gold call. Sorted order decides.
    completion = "<answer>change_color(1, blue) change_color(1, red)</answer>"
    solution = "change_color(1, green) change_color(2, blue)"
    scores = {trance_eval_score(completion, solution) for _ in range(5)}
    assert scores == {(0.5 + 0.25) / 2}


def test_registry_names_module_paths_and_errors():
    assert get_reward("format") is format_reward
    assert get_reward("ekipl.rewards:trance_reward") is trance_reward
    assert get_reward(f"{__name__}:_length_bonus") is _length_bonus
    with pytest.raises(ValueError, match="format, accuracy"):
        get_reward("acuracy")
    with pytest.raises(ValueError, match="cannot load"):
        get_reward("no_such_module_here:fn")
    with pytest.raises(ValueError, match="cannot load"):
        get_reward("ekipl.rewards:no_such_reward")


def _length_bonus(completion: str, solution: str) -> float:
    return min(len(completion), 100) / 100


def test_reward_set_components_total_and_range():
    counting = RewardSet.for_task("clevr-math")
    completion = "<think>two and one</think><answer>3</answer>"
    assert counting.components(completion, "<answer>3</answer>") == {"format": 1.0, "accuracy": 1.0}
    assert counting.total("<answer>3</answer>", "<answer>3</answer>") == 1.0
    assert counting.range == (0.0, 2.0)

    spatial = RewardSet.for_task("trance-left")
    assert list(spatial.functions) == ["format", "trance"]
    assert spatial.total("<think>t</think><answer>change_color(1, red)</answer>", GOLD_TWO) == pytest.approx(1.5)

    custom = RewardSet.for_task("geomath", ["format", f"{__name__}:_length_bonus"])
    assert custom.range is None
    assert custom.components("abc", "A") == {"format": 0.0, f"{__name__}:_length_bonus": 0.03}
    with pytest.raises(ValueError, match="unknown task"):
        RewardSet.for_task("mnist")
    assert eval_score_fn("geometry3k") is accuracy_eval_score
    assert eval_score_fn("trance-right") is trance_eval_score


def test_equivalence_fallback_runs_off_the_main_thread():
    # math-verify's timeout uses SIGALRM, which only the main thread may set; the expert pool uses threads.
    results = []
    worker = threading.Thread(target=lambda: results.append(accuracy_reward("3.0", "3")))
    worker.start()
    worker.join()
    assert results == [1.0]


TAGGED_TEXT = st.builds(
    lambda think, answer, tail: f"<think>{think}</think><answer>{answer}</answer>{tail}",
    st.text(max_size=30), st.text(max_size=30), st.sampled_from(["", " ", "\n", "x"]),
)
CALL = st.tuples(
    st.sampled_from(["change_color", "change_size", "change_shape", "f"]),
    st.sampled_from(["0", "1", "2", "x"]),
    st.sampled_from(["red", "small", "cube", "left", "1"]),
)


def _write_calls(calls, quote=""):
    return " ".join(f"{f}({o}, {quote}{v}{quote})" for f, o, v in calls)


CALLS = st.builds(_write_calls, st.lists(CALL, max_size=6), st.sampled_from(["", "'"]))
ANY_TEXT = st.one_of(st.text(max_size=80), TAGGED_TEXT, CALLS, CALLS.map(lambda calls: f"<answer>{calls}</answer>"))


@pytest.mark.parametrize("name", sorted(REWARDS))
@settings(max_examples=150, deadline=None)
@given(completion=ANY_TEXT, solution=ANY_TEXT)
def test_every_reward_stays_in_its_range(name, completion, solution):
    fn = REWARDS[name]
    low, high = reward_range(fn)
    assert low <= fn(completion, solution) <= high


@settings(max_examples=150, deadline=None)
@given(gold=st.lists(CALL, min_size=1, max_size=4, unique=True), extra=st.lists(CALL, max_size=4, unique=True))
def test_trance_scores_of_the_gold_answer_with_extra_calls(gold, extra):
    # The gold calls earn full credit; distinct extra calls dilute it to |gold| / |gold ∪ extra|, and a
    # repeat of the whole answer halves the training reward but not the evaluation score.
    solution = f"<answer>{_write_calls(gold)}</answer>"
    assert trance_reward(f"<answer>{_write_calls(gold, quote=chr(39))}</answer>", solution) == pytest.approx(1.0)
    assert trance_eval_score(f"<answer>{_write_calls(gold)}</answer>", solution) == pytest.approx(1.0)
    union = set(gold) | set(extra)
    padded = f"<answer>{_write_calls(list(union))}</answer>"
    assert trance_reward(padded, solution) == pytest.approx(len(gold) / len(union))
    assert trance_eval_score(padded, solution) >= len(gold) / len(union) - 1e-12
    repeated = f"<answer>{_write_calls(gold + gold)}</answer>"
    assert trance_reward(repeated, solution) == pytest.approx(0.5)
    assert trance_eval_score(repeated, solution) == pytest.approx(1.0)
