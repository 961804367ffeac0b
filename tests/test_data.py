"""Record loading (good and bad rows), the benchmark's prompts, and prompt encoding through a Qwen-VL processor."""

import json
import random

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from PIL import Image

from ekipl.data import BadRecordError, Record, decode_completion, encode_prompt, load_records, prompt_text
from ekipl.data.prompts import TRANCE_FUNCTIONS, build_messages, fit_image_size
from ekipl.models import load_processor


def random_image(path, width, height, rng):
    pixels = rng.integers(1, 255, size=(height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path.name


@pytest.fixture(scope="module")
def processor(tiny_model_dir):
    return load_processor(tiny_model_dir)


@pytest.fixture
def image_dir(tmp_path):
    rng = np.random.default_rng(random.randrange(2**32))
    folder = tmp_path / "img"
    folder.mkdir()
    for name, (width, height) in {"a.png": (96, 64), "b.png": (130, 90), "c.jpg": (300, 500)}.items():
        random_image(folder / name, width, height, rng)
    (folder / "broken.png").write_bytes(b"\x89PNG not really")
    return folder


def counting_row(**overrides):
    row = {"id": "q1", "image": "a.png", "problem": "How many balls?", "solution": "<answer>3</answer>"}
    row.update(overrides)
    return row


def write_jsonl(path, rows):
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


def test_load_jsonl_and_json_list(tmp_path, image_dir):
    rows = [
        counting_row(),
        counting_row(id=7, image=["b.png"], level=2),
        {"id": "geomath-1", "image": "c.jpg", "problem": "Find x.", "solution": "<answer>2.5</answer>", "answer": 2.5},
    ]
    jsonl = write_jsonl(tmp_path / "data.jsonl", rows)
    as_list = tmp_path / "data.json"
    as_list.write_text(json.dumps(rows, indent=2))
    for path in (jsonl, as_list):
        loaded = load_records(path, task="clevr-math", image_root=image_dir)
        assert len(loaded) == 3 and loaded.skipped == []
        first, second, third = loaded
        assert first == Record(
            id="q1", task="clevr-math", images=(str(image_dir / "a.png"),), problem="How many balls?",
            solution="<answer>3</answer>", source=first.source,
        )
        assert first.gold_answer == "3"
        assert second.id == "7" and second.images == (str(image_dir / "b.png"),) and second.extra == {"level": 2}
        assert third.answer == "2.5" and third.gold_answer == "2.5"
    assert load_records(jsonl, task="clevr-math", image_root=image_dir)[1].source == f"{jsonl}:2"
    assert load_records(as_list, task="clevr-math", image_root=image_dir)[1].source == f"{as_list}[1]"


def test_images_resolve_against_the_data_folder_by_default(image_dir):
    path = write_jsonl(image_dir / "rows.jsonl", [counting_row(image="b.png")])
    assert load_records(path, task="super-clevr").records[0].images == (str(image_dir / "b.png"),)


BAD_ROWS = [
    ("missing image", counting_row(image="nowhere.png"), "missing or unreadable"),
    ("unreadable image", counting_row(image="broken.png"), "missing or unreadable"),
    ("missing field", {"id": "q", "image": "a.png", "solution": "3"}, "missing field"),
    ("problem not a string", counting_row(problem=42), "'problem' must be a non-empty string"),
    ("image not a path", counting_row(image=3), "'image' must be a path"),
    ("empty image list", counting_row(image=[]), "'image' must be a path"),
    ("id is a list", counting_row(id=[1]), "'id' must be"),
    ("empty tagged answer", counting_row(solution="<answer>  </answer>"), "reference answer is empty"),
    ("empty answer field", counting_row(answer=""), "reference answer is empty"),
    ("answer a dict", counting_row(answer={"x": 1}), "'answer' must be"),
    ("two images for counting", counting_row(image=["a.png", "b.png"]), "takes 1 image"),
    ("not an object", [1, 2], "expected a JSON object"),
    ("broken JSON", '{"id": "q", "image": ', "not valid JSON"),
]


@pytest.mark.parametrize("label, bad_row, message", BAD_ROWS, ids=[label for label, _, _ in BAD_ROWS])
def test_a_bad_row_names_file_and_row_or_is_skipped_and_counted(tmp_path, image_dir, label, bad_row, message):
    path = write_jsonl(tmp_path / "rows.jsonl", [counting_row(id="good1"), bad_row, counting_row(id="good2")])
    with pytest.raises(BadRecordError, match=message) as raised:
        load_records(path, task="clevr-math", image_root=image_dir)
    assert str(raised.value).startswith(f"{path}:2: ")

    loaded = load_records(path, task="clevr-math", image_root=image_dir, skip_bad_rows=True)
    assert [record.id for record in loaded] == ["good1", "good2"]
    assert len(loaded.skipped) == 1 and loaded.skipped[0].source == f"{path}:2"
    assert message in loaded.skipped[0].reason


def test_trance_needs_two_images_and_a_file_of_only_bad_rows_fails(tmp_path, image_dir):
    path = write_jsonl(tmp_path / "t.jsonl", [counting_row(solution="<answer>change_size(1, small)</answer>")])
    with pytest.raises(BadRecordError, match="takes 2 image"):
        load_records(path, task="trance", image_root=image_dir)
    with pytest.raises(BadRecordError, match="no usable records"):
        load_records(path, task="trance", image_root=image_dir, skip_bad_rows=True)
    with pytest.raises(ValueError, match="unknown task"):
        load_records(path, task="clevr", image_root=image_dir)


def record(task, problem, solution, images=("a.png",), answer=None):
    return Record(id="r", task=task, images=tuple(images), problem=problem, solution=solution, answer=answer)


def test_instruction_texts_follow_the_benchmark():
    question = "Subtract all red cubes. How many objects are left?"
    assert prompt_text(record("clevr-math", question, "<answer>2</answer>")) == (
        f"{question} Output the thinking process in <think> </think> and final answer (number) in "
        "<answer> </answer> tags."
    )
    choice = prompt_text(record("geomath", "Find the angle. A. 30 B. 60", "<answer>B</answer>", answer="B"))
    assert choice.startswith("Find the angle. A. 30 B. 60 ") and "A, B, C or D" in choice
    non_choice = prompt_text(record("geometry3k", "Find x.", "<answer>2.5</answer>", answer="2.5"))
    assert non_choice == (
        "Find x. Output the thinking process in <think> </think> and final answer (float number or int number) "
        "in <answer> </answer> tags."
    )
    # GeoMath training rows that already carry the instruction are used as they are.
    assert prompt_text(record("geomath", non_choice, "<answer>2.5</answer>")) == non_choice

    trance = prompt_text(record("trance-left", "Objects: [('0', 'cube', 'small', 'red', 'metal')]",
                                "<answer>change_color(0, blue)</answer>", images=("a.png", "b.png")))
    for function, values in TRANCE_FUNCTIONS.items():
        assert function in trance and all(f"'{value}'" in trance for value in values)
    assert trance.endswith(
        "Objects: [('0', 'cube', 'small', 'red', 'metal')] Output the thinking process in <think> </think> and "
        "final answer (the sequence of functions only) in <answer> </answer> tags."
    )
    assert "1 to 4" in trance


def test_messages_put_images_before_the_text_and_have_no_system_turn():
    messages = build_messages(record("trance", "q", "change_size(1, small)", images=("a.png", "b.png")))
    assert [m["role"] for m in messages] == ["user"]
    assert [part["type"] for part in messages[0]["content"]] == ["image", "image", "text"]


@settings(max_examples=300, deadline=None)
@given(
    height=st.integers(1, 3000), width=st.integers(1, 3000),
    max_pixels=st.integers(28 * 28 * 4, 1_000_000), factor=st.sampled_from([28, 32]),
)
# fits max_pixels, but rounding to the grid (42 -> 56) overshoots it: the width was upscaled to 644
@example(height=42, width=609, max_pixels=28603, factor=28)
def test_fit_image_size_bounds_and_aligns(height, width, max_pixels, factor):
    min_pixels = factor * factor
    new_height, new_width = fit_image_size(height, width, factor=factor, min_pixels=min_pixels, max_pixels=max_pixels)
    assert new_height % factor == 0 and new_width % factor == 0
    assert min_pixels <= new_height * new_width <= max_pixels
    if height * width <= max_pixels and min(height, width) >= factor:
        # no upscaling beyond rounding to the grid
        assert new_height <= height + factor / 2 and new_width <= width + factor / 2


def test_encode_prompt_matches_the_processor_and_bounds_images(processor, image_dir):
    big = record("clevr-math", "How many balls?", "<answer>3</answer>", images=(str(image_dir / "c.jpg"),))
    factor = processor.image_processor.patch_size * processor.image_processor.merge_size
    for max_pixels in (28 * 28 * 4, 6000, 10_000):
        prompt = encode_prompt(processor, big, max_pixels=max_pixels, max_prompt_len=4096)
        (image,) = prompt.images
        assert image.width * image.height <= max_pixels
        assert image.width % factor == 0 and image.height % factor == 0
        grid = prompt.mm_inputs["image_grid_thw"]
        assert grid.tolist() == [[1, image.height // 14, image.width // 14]]
        assert prompt.mm_inputs["pixel_values"].shape[0] == grid.prod().item()
        assert prompt.input_ids.count(processor.image_token_id) == grid.prod().item() // 4
        assert set(prompt.mm_inputs) == {"pixel_values", "image_grid_thw"}
    text = processor.tokenizer.decode(prompt.input_ids)
    assert text.startswith("<|im_start|>user\n<|vision_start|><|image_pad|>")
    assert text.endswith(f"<|vision_end|>{prompt_text(big)}<|im_end|>\n<|im_start|>assistant\n")
    assert prompt.uid == "r"
    again = encode_prompt(processor, big, max_pixels=10_000, max_prompt_len=4096)
    assert again.input_ids == prompt.input_ids
    assert (again.mm_inputs["pixel_values"] == prompt.mm_inputs["pixel_values"]).all()


def test_encode_prompt_two_images_and_never_truncates(processor, image_dir):
    trance = record("trance", "Objects: [('0', 'cube', 'small', 'red', 'metal')]", "change_size(0, large)",
                    images=(str(image_dir / "a.png"), str(image_dir / "b.png")))
    prompt = encode_prompt(processor, trance, max_pixels=12_544, max_prompt_len=4096)
    assert len(prompt.images) == 2 and prompt.mm_inputs["image_grid_thw"].shape == (2, 3)
    image_tokens = sum(grid.prod().item() // 4 for grid in prompt.mm_inputs["image_grid_thw"])
    assert prompt.input_ids.count(processor.image_token_id) == image_tokens
    with pytest.raises(BadRecordError, match=f"{len(prompt.input_ids)} tokens .* never truncated"):
        encode_prompt(processor, trance, max_pixels=12_544, max_prompt_len=len(prompt.input_ids) - 1)
    assert len(encode_prompt(processor, trance, max_pixels=12_544, max_prompt_len=len(prompt.input_ids)).input_ids) \
        == len(prompt.input_ids)


def test_an_image_broken_after_loading_is_a_bad_record(processor, image_dir, tmp_path):
    path = write_jsonl(tmp_path / "rows.jsonl", [counting_row(image="b.png")])
    loaded = load_records(path, task="clevr-math", image_root=image_dir)
    (image_dir / "b.png").write_bytes((image_dir / "b.png").read_bytes()[:200])  # truncated on disk
    with pytest.raises(BadRecordError, match=f"{path}:1: cannot decode an image"):
        encode_prompt(processor, loaded[0], max_pixels=12_544, max_prompt_len=4096)


def test_decode_completion_drops_the_stop_token_and_keeps_tags(processor):
    tokenizer = processor.tokenizer
    text = "<think>two plus one</think>\n<answer>3</answer>"
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert decode_completion(tokenizer, ids + [tokenizer.convert_tokens_to_ids("<|im_end|>")]) == text
    assert decode_completion(tokenizer, ids) == text
