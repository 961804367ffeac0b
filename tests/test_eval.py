"""The evaluator: the benchmark's scoring, subsets and pass@k, driven by a scripted engine."""

import itertools
import json
import random

import numpy as np
import pytest
from PIL import Image

from ekipl.data import BadRecordError, Record, encode_prompt
from ekipl.eval import EVAL_SAMPLING, evaluate, format_table, pass_at_k
from ekipl.rollout.base import Completion



@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(random.randrange(2**32))
    paths = []
    for index in range(2):
        path = folder / f"{index}.png"
        Image.fromarray(rng.integers(1, 255, size=(56 + 28 * index, 84, 3), dtype=np.uint8)).save(path)
        paths.append(str(path))
    return paths


class ScriptedEngine:
    """Answers each prompt with scripted texts (one per sample), tokenized like a model's output."""

    def __init__(self, tokenizer, script: dict[str, list[str]]):
        self.tokenizer = tokenizer
        self.script = script
        self.calls = []

    def generate(self, prompts, n, sampling, seeds):
        self.calls.append((prompts, n, sampling, seeds))
        stop = self.tokenizer.convert_tokens_to_ids("<|im_end|>")
        groups = []
        for prompt in prompts:
            texts = self.script[prompt.uid]
            groups.append([
                Completion(self.tokenizer.encode(text, add_special_tokens=False) + [stop],
                           [-random.random() for _ in range(len(text) + 1)], "stop")
                for text in texts[:n]
            ])
        return groups


def geomath_record(uid, gold, image):
    return Record(id=uid, task="geomath", images=(image,), problem=f"Question {uid}?",
                  solution=f"<answer>{gold}</answer>", answer=gold)


def test_benchmark_protocol_scores_and_subsets(processor, images, tmp_path):
    records = [
        geomath_record("c1", "A", images[0]),
        geomath_record("c2", "B", images[1]),
        geomath_record("c3", "D", images[0]),
        geomath_record("n1", "2.5", images[1]),
        geomath_record("n2", "7", images[0]),
    ]
    script = {
        "c1": ["<think>the first</think><answer>A</answer>"],
        "c2": ["<think>hmm</think><answer>C</answer>"],
        "c3": ["<think>last</think>\n<answer> D </answer>"],
        "n1": ["<think>half of five</think><answer>5/2</answer>"],  # equivalent: full credit at evaluation
        "n2": ["<think>guess</think><answer>8</answer>"],
    }
    engine = ScriptedEngine(processor.tokenizer, script)
    summary = evaluate(engine, records, processor, task="geomath", out_dir=tmp_path, batch_size=2, progress=False)

    assert summary["score"] == pytest.approx(60.0) and summary["pass@1"] == pytest.approx(60.0)
    assert summary["subsets"]["choice"] == {"n_records": 3, "score": pytest.approx(200 / 3),
                                            "pass@1": pytest.approx(200 / 3)}
    assert summary["subsets"]["non_choice"]["score"] == pytest.approx(50.0)
    assert summary["truncated_share"] == 0.0
    # The engine saw the protocol's sampling, the encoded prompts, one sample each and distinct seeds.
    assert [len(prompts) for prompts, *_ in engine.calls] == [2, 2, 1]
    for prompts, n, sampling, seeds in engine.calls:
        assert n == 1 and sampling == EVAL_SAMPLING
        assert sampling.temperature == 0.1 and sampling.top_p == 0.9 and sampling.top_k == 50
        assert sampling.max_new_tokens == 768
    all_seeds = [seed for *_, seeds in engine.calls for group in seeds for seed in group]
    assert len(set(all_seeds)) == len(records)
    first_prompt = engine.calls[0][0][0]
    assert first_prompt.input_ids == encode_prompt(processor, records[0], max_pixels=480_000,
                                                   max_prompt_len=4096).input_ids

    rows = [json.loads(line) for line in open(summary["predictions"])]
    assert [row["id"] for row in rows] == ["c1", "c2", "c3", "n1", "n2"]
    assert [row["scores"] for row in rows] == [[1.0], [0.0], [1.0], [1.0], [0.0]]
    assert rows[3]["completions"] == script["n1"] and rows[3]["subset"] == "non_choice"
    assert json.loads(open(summary["summary"]).read()) == summary
    table = format_table([summary])
    assert "geomath/choice" in table and "60.00" in table and "66.67" in table


def test_pass_at_k_over_samples(processor, images, tmp_path):
    records = [Record(id=f"q{i}", task="clevr-math", images=(images[i % 2],), problem="How many?",
                      solution=f"<answer>{i}</answer>") for i in range(3)]
    right = {f"q{i}": f"<think>t</think><answer>{i}</answer>" for i in range(3)}
    # q0: 4 of 4 samples right, q1: 1 of 4, q2: none.
    script = {
        "q0": [right["q0"]] * 4,
        "q1": ["<answer>9</answer>", right["q1"], "no answer", "<answer>7</answer>"],
        "q2": ["<answer>5</answer>"] * 4,
    }
    engine = ScriptedEngine(processor.tokenizer, script)
    summary = evaluate(engine, records, processor, task="clevr-math", out_dir=tmp_path, n=4, k_values=(1, 2, 4),
                       progress=False)
    assert summary["score"] == pytest.approx(100 * (1 + 0.25 + 0) / 3)
    assert summary["pass@1"] == pytest.approx(100 * (1 + 0.25 + 0) / 3)
    assert summary["pass@2"] == pytest.approx(100 * (1 + 0.5 + 0) / 3)
    assert summary["pass@4"] == pytest.approx(100 * 2 / 3)
    seeds = engine.calls[0][3]
    assert len({seed for group in seeds for seed in group}) == 12
    with pytest.raises(ValueError, match="pass@8"):
        evaluate(engine, records, processor, task="clevr-math", out_dir=tmp_path, n=4, k_values=(8,), progress=False)


def test_trance_gets_partial_credit(processor, images, tmp_path):
    record = Record(id="t", task="trance-right", images=tuple(images), problem="Objects: [('1', 'cube')]",
                    solution="<answer>change_color(1, red) change_size(2, small)</answer>")
    engine = ScriptedEngine(processor.tokenizer, {"t": ["<think>x</think><answer>change_color(1, blue)</answer>"]})
    summary = evaluate(engine, [record], processor, task="trance-right", out_dir=tmp_path, progress=False)
    assert summary["score"] == pytest.approx(100 * 0.5 / 2)
    assert summary["pass@1"] == 0.0 and summary["subsets"] == {}


def test_an_engine_that_loses_samples_is_an_error(processor, images, tmp_path):
    record = Record(id="q", task="clevr-math", images=(images[0],), problem="How many?", solution="3")
    engine = ScriptedEngine(processor.tokenizer, {"q": ["<answer>3</answer>"]})  # one text for n=2
    with pytest.raises(RuntimeError, match="returned"):
        evaluate(engine, [record], processor, task="clevr-math", out_dir=tmp_path, n=2, progress=False)


def test_a_test_image_gone_at_eval_is_skipped_and_counted_or_named(processor, images, tmp_path):
    gone = tmp_path / "gone.png"
    gone.write_bytes(open(images[0], "rb").read())
    records = [Record(id="ok", task="clevr-math", images=(images[1],), problem="How many?", solution="<answer>2</answer>"),
               Record(id="bad", task="clevr-math", images=(str(gone),), problem="How many?", solution="<answer>1</answer>")]
    gone.unlink()  # it passed the load-time check, then vanished
    engine = ScriptedEngine(processor.tokenizer, {"ok": ["<think>t</think><answer>2</answer>"]})
    with pytest.raises(BadRecordError, match="gone.png"):
        evaluate(engine, records, processor, task="clevr-math", out_dir=tmp_path, progress=False)
    summary = evaluate(engine, records, processor, task="clevr-math", out_dir=tmp_path, progress=False, skip_bad_rows=True)
    assert summary["skipped_ids"] == ["bad"] and summary["n_records"] == 1 and summary["score"] == 100.0
    with pytest.raises(BadRecordError, match="all 1 were skipped"):
        evaluate(engine, records[1:], processor, task="clevr-math", out_dir=tmp_path, progress=False, skip_bad_rows=True)


@pytest.mark.parametrize("n", range(1, 7))
def test_pass_at_k_is_the_chance_that_k_drawn_samples_hold_a_right_one(n):
    for correct in range(n + 1):
        outcomes = [True] * correct + [False] * (n - correct)
        for k in range(1, n + 1):
            draws = list(itertools.combinations(outcomes, k))
            assert pass_at_k(n, correct, k) == pytest.approx(sum(any(d) for d in draws) / len(draws))
    with pytest.raises(ValueError):
        pass_at_k(n, 0, n + 1)
