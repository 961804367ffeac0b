"""The synthetic counting task: determinism, the record format, rendering, and the oracle expert."""

import math
import random
import re
from collections import Counter

import pytest
from PIL import Image

from ekipl.data import SYNTHETIC_TASK, load_records
from ekipl.data.synthetic import (
    ANSWER_RANGE,
    BACKGROUND,
    COLORS,
    GRID,
    QUESTION_MIX,
    SIZES,
    Scene,
    chance_baselines,
    guessed_answer,
    oracle_answer,
    render_scene,
    scene_answer,
    synthetic_row,
    tokenizer_corpus,
    write_synthetic_dataset,
    write_synthetic_split,
)
from ekipl.rewards import RewardSet


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_synthetic_dataset(tmp_path_factory.mktemp("synthetic"), n_train=120, n_test=40, seed=11)


def test_same_seed_same_bytes_other_seed_other_data(dataset, tmp_path):
    again = write_synthetic_dataset(tmp_path / "again", n_train=120, n_test=40, seed=11)
    assert again.train.read_bytes() == dataset.train.read_bytes()
    assert again.test.read_bytes() == dataset.test.read_bytes()
    for index in (0, 57, 119):
        name = f"images/train-{index:06d}.png"
        assert (again.image_root / name).read_bytes() == (dataset.image_root / name).read_bytes()
    other = write_synthetic_dataset(tmp_path / "other", n_train=120, n_test=0, seed=12)
    assert other.train.read_bytes() != dataset.train.read_bytes()


def test_the_reason_rft_loader_reads_both_splits(dataset):
    train = load_records(dataset.train, task=SYNTHETIC_TASK, image_root=dataset.image_root)
    test = load_records(dataset.test, task=SYNTHETIC_TASK, image_root=dataset.image_root)
    assert len(train) == 120 and len(test) == 40 and not train.skipped
    assert {record.id for record in train}.isdisjoint(record.id for record in test)
    record = train[0]
    with Image.open(record.images[0]) as image:
        assert image.size == (112, 112)
    assert re.fullmatch(r"<answer>\d</answer>", record.solution)
    # The question kinds of CLEVR-Math all occur: plain counting, one and two subtractions.
    kinds = {record.problem.count("Subtract all") for record in train}
    assert kinds == {0, 1, 2}


def _independent_answer(scene_json):
    """Count the objects no subtracted group describes (a second implementation of the task's rule)."""
    def described(obj, group):
        return all(obj[key] == value for key, value in group.items())

    return sum(not any(described(obj, group) for group in scene_json["subtract"]) for obj in scene_json["objects"])


def test_questions_and_solutions_agree_with_the_scene(dataset):
    for record in load_records(dataset.train, task=SYNTHETIC_TASK, image_root=dataset.image_root):
        scene = record.extra["scene"]
        assert record.gold_answer == str(_independent_answer(scene))
        for group in scene["subtract"]:
            attribute = group.get("color") or group.get("size")
            phrase = f"Subtract all {attribute + ' ' if attribute else ''}{group['shape']}s."
            assert phrase in record.problem


def test_rendering_draws_each_object_in_its_colour_and_shape(dataset):
    for record in load_records(dataset.test, task=SYNTHETIC_TASK, image_root=dataset.image_root):
        scene = Scene.from_json(record.extra["scene"])
        image = Image.open(record.images[0]).convert("RGB")
        cell = image.width / GRID
        occupied = {(obj.row, obj.col) for obj in scene.objects}
        for obj in scene.objects:
            cx, cy = (obj.col + 0.5) * cell, (obj.row + 0.5) * cell
            radius = SIZES[obj.size] * cell
            assert image.getpixel((int(cx), int(cy))) == COLORS[obj.color]
            # Near the corner of the bounding square only a cube is filled; beside the centre, at 0.95 of the
            # radius, a cylinder (narrower than tall) shows the background.
            corner = image.getpixel((int(cx + 0.85 * radius), int(cy + 0.85 * radius)))
            side = image.getpixel((int(cx + 0.95 * radius), int(cy)))
            assert (corner == COLORS[obj.color]) == (obj.shape == "cube")
            assert (side == BACKGROUND) == (obj.shape == "cylinder")
        for row in range(GRID):
            for col in range(GRID):
                if (row, col) not in occupied:
                    assert image.getpixel((int((col + 0.5) * cell), int((row + 0.5) * cell))) == BACKGROUND


def test_a_perfect_oracle_earns_full_reward(dataset):
    rewards = RewardSet.for_task(SYNTHETIC_TASK)
    for split in (dataset.train, dataset.test):
        for record in load_records(split, task=SYNTHETIC_TASK, image_root=dataset.image_root):
            answer = oracle_answer(record)
            assert rewards.components(answer, record.solution) == {"format": 1.0, "accuracy": 1.0}


def test_an_always_wrong_oracle_is_off_by_one_and_self_consistent(dataset):
    rng = random.Random(random.randrange(2**32))
    for record in load_records(dataset.train, task=SYNTHETIC_TASK, image_root=dataset.image_root):
        answer = oracle_answer(record, error_rate=1.0, rng=rng)
        rewards = RewardSet.for_task(SYNTHETIC_TASK).components(answer, record.solution)
        assert rewards == {"format": 1.0, "accuracy": 0.0}
        final = int(re.search(r"<answer>(\d+)</answer>", answer).group(1))
        assert abs(final - int(record.gold_answer)) == 1
        # Every arithmetic step the oracle writes is right, even when a count is wrong.
        for left, minus, result in re.findall(r"(\d+) - (\d+) = (\d+)", answer):
            assert int(left) - int(minus) == int(result) >= 0
        assert re.findall(r"= (\d+) objects?\.", answer)[-1:] in ([], [str(final)])


def test_error_rate_sets_the_share_of_wrong_answers(dataset):
    records = load_records(dataset.train, task=SYNTHETIC_TASK, image_root=dataset.image_root).records
    rng = random.Random(random.randrange(2**32))
    wrong = sum(
        RewardSet.for_task(SYNTHETIC_TASK).components(oracle_answer(r, error_rate=0.3, rng=rng), r.solution)["accuracy"]
        == 0.0
        for r in records * 5
    )
    assert 0.22 < wrong / 600 < 0.38  # ±4.5 standard deviations of a binomial(600, 0.3)


def test_oracle_refuses_what_it_cannot_do(dataset):
    record = load_records(dataset.test, task=SYNTHETIC_TASK, image_root=dataset.image_root)[0]
    with pytest.raises(ValueError, match="pass rng"):
        oracle_answer(record, error_rate=0.5)
    with pytest.raises(ValueError, match="error_rate"):
        oracle_answer(record, error_rate=1.5, rng=random.Random(0))
    stripped = type(record)(id="x", task="clevr-math", images=record.images, problem="q", solution="1")
    with pytest.raises(ValueError, match="no 'scene' field"):
        oracle_answer(stripped)
    assert oracle_answer(record.extra["scene"]) == oracle_answer(record)


def test_render_scene_is_deterministic_and_sized():
    scene = Scene.from_json(
        {"objects": [{"shape": "sphere", "color": "blue", "size": "large", "row": 1, "col": 2}], "subtract": []}
    )
    first, second = render_scene(scene, 64), render_scene(scene, 64)
    assert first.size == (64, 64) and first.tobytes() == second.tobytes()
    assert oracle_answer(scene) == "<think>There is 1 object in the image.</think>\n<answer>1</answer>"


def test_tokenizer_corpus_covers_a_small_closed_vocabulary():
    corpus = tokenizer_corpus()
    words = {word for text in corpus for word in re.findall(r"[A-Za-z]+", text)}
    assert len(words) < 80
    assert {"Subtract", "cubes", "cylinder", "purple", "small", "leaves", "think", "answer"} <= words
    assert any(text.endswith("final answer (number) in <answer> </answer> tags.") for text in corpus)
    assert any(text.startswith("<think>There are") and text.endswith("</answer>") for text in corpus)
    assert tokenizer_corpus() == corpus


def test_answers_are_balanced_so_the_majority_class_is_near_chance():
    scenes = [synthetic_row("train", index, seed=3)[1] for index in range(1200)]
    answers = Counter(scene_answer(scene) for scene in scenes)
    possible = range(ANSWER_RANGE[0], ANSWER_RANGE[1] + 1)
    assert set(answers) == set(possible)
    expected, sigma = 1200 / len(possible), math.sqrt(1200 * (1 / len(possible)) * (1 - 1 / len(possible)))
    assert all(abs(count - expected) < 4.5 * sigma for count in answers.values()), answers
    kinds = Counter(len(scene.subtract) for scene in scenes)
    total_weight = sum(QUESTION_MIX.values())
    for subtractions, weight in QUESTION_MIX.items():
        share = weight / total_weight
        assert abs(kinds[subtractions] - 1200 * share) < 4.5 * math.sqrt(1200 * share * (1 - share)), kinds


def test_chance_baselines_by_hand():
    baselines = chance_baselines(["1", "2", "2", "3", "9"], (1, 4), ks=(1, 2))
    assert baselines["majority"] == pytest.approx(40.0)  # "2", 2 of 5
    assert baselines["random"] == pytest.approx(100 * (4 / 5) / 4)  # "9" is out of range: never guessed
    assert baselines["random_pass@1"] == pytest.approx(baselines["random"])
    assert baselines["random_pass@2"] == pytest.approx(100 * (4 / 5) * (1 - (3 / 4) ** 2))
    assert baselines["majority_pass@2"] == pytest.approx(40.0)
    with pytest.raises(ValueError, match="no answers"):
        chance_baselines([])


def test_chance_baselines_match_simulated_guessers(dataset):
    gold = [record.gold_answer for record in load_records(dataset.test, task=SYNTHETIC_TASK, image_root=dataset.image_root)]
    baselines = chance_baselines(gold, ks=(1, 4))
    rng = random.Random(0)
    trials = 4000
    guess = lambda: str(rng.randint(*ANSWER_RANGE))  # noqa: E731
    hits = sum(guess() == gold[t % len(gold)] for t in range(trials)) / trials
    hits_of_four = sum(any(guess() == gold[t % len(gold)] for _ in range(4)) for t in range(trials)) / trials
    assert hits * 100 == pytest.approx(baselines["random"], abs=3.0)
    assert hits_of_four * 100 == pytest.approx(baselines["random_pass@4"], abs=4.0)
    most_common = Counter(gold).most_common(1)[0][0]
    assert baselines["majority"] == pytest.approx(100 * sum(g == most_common for g in gold) / len(gold))


def test_guessed_answers_have_the_format_consistent_arithmetic_and_no_knowledge(dataset):
    rewards = RewardSet.for_task(SYNTHETIC_TASK)
    records = load_records(dataset.train, task=SYNTHETIC_TASK, image_root=dataset.image_root).records
    rng = random.Random(1)
    right = 0
    for record in records * 5:
        answer = guessed_answer(record, rng)
        parts = rewards.components(answer, record.solution)
        assert parts["format"] == 1.0
        right += parts["accuracy"]
        for left, minus, result in re.findall(r"(\d+) - (\d+) = (\d+)", answer):
            assert int(left) - int(minus) == int(result) >= 0
    assert right / (5 * len(records)) < 0.3  # blind: about 1 in 6 for plain counts, fewer after subtractions


def test_a_named_split_has_its_own_rows(tmp_path, dataset):
    path = write_synthetic_split(tmp_path, "warmstart", 4, seed=11)
    rows = load_records(path, task=SYNTHETIC_TASK, image_root=tmp_path).records
    assert [r.id for r in rows] == [f"synthetic-warmstart-{i:06d}" for i in range(4)]
    train = load_records(dataset.train, task=SYNTHETIC_TASK, image_root=dataset.image_root).records
    assert [r.extra["scene"] for r in rows] != [r.extra["scene"] for r in train[:4]]
