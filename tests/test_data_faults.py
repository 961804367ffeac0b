"""Data faults that used to pass the load-time checks: duplicate record ids and over-long prompts."""

import json
import random

import numpy as np
import pytest
from PIL import Image

from ekipl.data import BadRecordError, Record, check_prompt_lengths, encode_prompt, load_records, prompt_lengths


@pytest.fixture
def image_dir(tmp_path):
    rng = np.random.default_rng(random.randrange(2**32))
    folder = tmp_path / "img"
    folder.mkdir()
    for name, (width, height) in {"a.png": (96, 64), "b.png": (130, 90), "c.jpg": (300, 500)}.items():
        pixels = rng.integers(1, 255, size=(height, width, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / name)
    return folder


def counting_row(**overrides):
    row = {"id": "q1", "image": "a.png", "problem": "How many balls?", "solution": "<answer>3</answer>"}
    row.update(overrides)
    return row


def write_rows(path, rows):
    if path.suffix == ".json":
        path.write_text(json.dumps(rows))
    else:
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.mark.parametrize("first_id, second_id", [("dup", "dup"), (7, "7")], ids=["same", "equal-as-strings"])
@pytest.mark.parametrize("suffix, row_name", [(".jsonl", "{path}:{n}"), (".json", "{path}[{i}]")])
def test_a_duplicate_id_names_the_file_both_rows_and_the_id(tmp_path, image_dir, first_id, second_id, suffix, row_name):
    rows = [counting_row(id="a"), counting_row(id=first_id), counting_row(id="b", image="b.png"),
            counting_row(id=second_id, image="b.png", solution="<answer>5</answer>")]
    path = write_rows(tmp_path / f"rows{suffix}", rows)
    first = row_name.format(path=path, n=2, i=1)
    second = row_name.format(path=path, n=4, i=3)
    with pytest.raises(BadRecordError) as raised:
        load_records(path, task="clevr-math", image_root=image_dir)
    message = str(raised.value)
    assert message.startswith(f"{second}: ")
    assert first in message and f"id {second_id!r}" in message and "unique" in message


def test_a_duplicate_id_is_skipped_and_counted_keeping_the_first_row(tmp_path, image_dir):
    rows = [counting_row(id="dup"), counting_row(id="x"),
            counting_row(id="dup", image="b.png", solution="<answer>5</answer>"), counting_row(id=7), counting_row(id="7")]
    path = write_rows(tmp_path / "rows.jsonl", rows)
    loaded = load_records(path, task="clevr-math", image_root=image_dir, skip_bad_rows=True)
    assert [record.id for record in loaded] == ["dup", "x", "7"]
    assert loaded[0].gold_answer == "3" and loaded[0].source == f"{path}:1"
    assert [bad.source for bad in loaded.skipped] == [f"{path}:3", f"{path}:5"]
    assert f"{path}:1" in loaded.skipped[0].reason and f"{path}:4" in loaded.skipped[1].reason


def test_a_skipped_bad_row_does_not_claim_its_id(tmp_path, image_dir):
    path = write_rows(tmp_path / "rows.jsonl", [counting_row(id="q", image="nowhere.png"), counting_row(id="q")])
    loaded = load_records(path, task="clevr-math", image_root=image_dir, skip_bad_rows=True)
    assert [record.source for record in loaded] == [f"{path}:2"]
    assert "missing or unreadable" in loaded.skipped[0].reason


def make_record(image_dir, name, *, problem="How many balls?", images=("a.png",), task="clevr-math"):
    return Record(id=name, task=task, images=tuple(str(image_dir / image) for image in images), problem=problem,
                  solution="<answer>3</answer>", source=f"data.jsonl:{name}")


def test_an_over_long_prompt_is_a_bad_record_saying_what_to_do(processor, image_dir):
    record = make_record(image_dir, "long-1", images=("c.jpg",))
    length = len(encode_prompt(processor, record, max_pixels=10_000, max_prompt_len=4096).input_ids)
    with pytest.raises(BadRecordError) as raised:
        encode_prompt(processor, record, max_pixels=10_000, max_prompt_len=length - 1)
    message = str(raised.value)
    assert message.startswith("data.jsonl:long-1: ")
    for part in ("'long-1'", f"{length} tokens", f"max_prompt_len={length - 1}", "raise data.max_prompt_len",
                 "data.max_pixels"):
        assert part in message
    assert isinstance(raised.value, ValueError)  # callers that caught ValueError still do


def test_prompt_lengths_equal_the_encoded_lengths_without_decoding_images(processor, image_dir):
    records = [
        make_record(image_dir, "small"),
        make_record(image_dir, "tall", images=("c.jpg",), problem="Subtract all red cubes. How many objects are left?"),
        make_record(image_dir, "geo", task="geometry3k", images=("b.png",), problem="Find x. " * 40),
        make_record(image_dir, "pair", task="trance", images=("a.png", "c.jpg"), problem="Objects: [('0', 'cube')]"),
    ]
    for max_pixels in (28 * 28 * 4, 12_544, 100_000):
        expected = [len(encode_prompt(processor, r, max_pixels=max_pixels, max_prompt_len=10**6).input_ids)
                    for r in records]
        assert prompt_lengths(processor, records, max_pixels=max_pixels) == expected


def test_check_prompt_lengths_rejects_or_skips_over_long_records(processor, image_dir):
    records = [make_record(image_dir, "short"), make_record(image_dir, "long", problem="How many balls? " * 50),
               make_record(image_dir, "short2", images=("b.png",))]
    lengths = prompt_lengths(processor, records, max_pixels=12_544)
    limit = max(lengths[0], lengths[2])
    assert lengths[1] > limit

    kept = check_prompt_lengths(processor, records, max_pixels=12_544, max_prompt_len=max(lengths))
    assert list(kept) == records and kept.skipped == []
    with pytest.raises(BadRecordError, match=rf"^data.jsonl:long: .*'long' has {lengths[1]} tokens.*"
                                             rf"max_prompt_len={limit}"):
        check_prompt_lengths(processor, records, max_pixels=12_544, max_prompt_len=limit)
    kept = check_prompt_lengths(processor, records, max_pixels=12_544, max_prompt_len=limit, skip_bad_rows=True)
    assert [record.id for record in kept] == ["short", "short2"]
    assert [bad.source for bad in kept.skipped] == ["data.jsonl:long"]
    with pytest.raises(BadRecordError, match="no record fits"):
        check_prompt_lengths(processor, records, max_pixels=12_544, max_prompt_len=3, skip_bad_rows=True)


def test_check_prompt_lengths_names_an_image_gone_since_loading(processor, image_dir):
    record = make_record(image_dir, "gone", images=("b.png",))
    (image_dir / "b.png").unlink()
    with pytest.raises(BadRecordError, match="^data.jsonl:gone: .*b.png"):
        check_prompt_lengths(processor, [record], max_pixels=12_544, max_prompt_len=4096)
