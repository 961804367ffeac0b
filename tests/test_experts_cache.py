"""The answer cache, the crash-tolerant JSONL files, and re-tokenisation into the policy's tokenizer."""

from __future__ import annotations

import dataclasses
import json
import logging
import random

import pytest
from PIL import Image

from ekipl.data.records import Record
from ekipl.data.synthetic import oracle_answer, random_scene
from ekipl.experts.base import ExpertReply, ExpertRequest, MalformedReplyError
from ekipl.experts.cache import AnswerCache, answer_key
from ekipl.experts.config import ExpertConfig, ExpertPoolConfig
from ekipl.experts.jsonl import JsonlAppender, read_jsonl
from ekipl.experts.pool import ExpertPool
from ekipl.experts.retokenize import Retokenizer
from ekipl.models import load_processor
from ekipl.rollout.base import SamplingParams


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return load_processor(tiny_model_dir).tokenizer


def expert_config(**overrides) -> ExpertConfig:
    values = dict(name="gpt", kind="openai", model="gpt-4o", base_url="http://127.0.0.1:9/v1")
    values.update(overrides)
    return ExpertConfig(**values)


def random_reply(rng: random.Random, sample_index: int, *, with_tokens: bool) -> ExpertReply:
    text = f"<think>{rng.random()}</think> <answer>{rng.randint(0, 99)}</answer>\n\u00e9\u4e2d"
    tokens = [rng.randrange(1000) for _ in range(rng.randint(1, 9))] if with_tokens else None
    return ExpertReply(
        sample_index=sample_index,
        text=text,
        token_ids=tokens,
        logprobs=[-rng.random() for _ in tokens] if tokens else None,
        latency_s=rng.random(),
    )


def test_cache_round_trip_and_keys(tmp_path):
    rng = random.Random()
    expert = expert_config(same_tokenizer=True)  # token ids and log-probs are kept only then
    hashes = [f"{rng.getrandbits(128):032x}" for _ in range(3)]
    cache = AnswerCache(tmp_path, expert)
    written = {(h, i): random_reply(rng, i, with_tokens=i % 2 == 0) for h in hashes for i in range(3)}
    for (prompt_hash, _), reply in written.items():
        cache.put(prompt_hash, reply)
    cache.put(hashes[0], dataclasses.replace(written[hashes[0], 0], text="a second answer for a cached key"))
    cache.close()

    reopened = AnswerCache(tmp_path, expert)
    assert len(reopened) == len(written) and reopened.unreadable_lines == 0
    for (prompt_hash, index), reply in written.items():
        got = reopened.get(prompt_hash, index)
        assert got.from_cache and got.sample_index == index
        assert (got.text, got.token_ids, got.logprobs, got.finish_reason) == (
            reply.text, reply.token_ids, reply.logprobs, reply.finish_reason)
    assert reopened.get(hashes[0], 3) is None
    assert reopened.get(f"{rng.getrandbits(128):032x}", 0) is None
    reopened.close()

    # Every part of the key matters: another model, other sampling, another slot or prompt miss.
    key = answer_key(expert, hashes[0], 0)
    assert key != answer_key(dataclasses.replace(expert, model="gpt-4o-mini"), hashes[0], 0)
    assert key != answer_key(dataclasses.replace(expert, sampling=SamplingParams(temperature=0.7)), hashes[0], 0)
    assert key != answer_key(expert, hashes[0], 1) != answer_key(expert, hashes[1], 0)
    assert AnswerCache(tmp_path, dataclasses.replace(expert, model="other")).get(hashes[0], 0) is None


def test_torn_last_line_is_skipped_and_appends_stay_readable(tmp_path):
    rng = random.Random()
    path = tmp_path / "rows.jsonl"
    rows = [{"id": i, "value": rng.random(), "text": "ü\n\"quoted\""} for i in range(5)]
    appender = JsonlAppender(path)
    for row in rows:
        appender.append(row)
    appender.close()
    full = path.read_bytes()
    path.write_bytes(full[: len(full) - rng.randint(2, 10)])  # the last row cut mid-write

    read, bad = read_jsonl(path)
    assert read == rows[:-1] and bad == 1
    appender = JsonlAppender(path)
    appender.append(rows[-1])
    appender.close()
    read, bad = read_jsonl(path)
    assert read == rows and bad == 1  # the fragment stays alone on its line
    assert read_jsonl(tmp_path / "missing.jsonl") == ([], 0)


def test_retokenised_answers_are_what_the_template_gives(tokenizer):
    rng = random.Random()
    retokenizer = Retokenizer(tokenizer)
    end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert retokenizer.end_of_turn_ids == [end_of_turn]
    user = [{"role": "user", "content": "How many objects are there?"}]
    prompt_ids = tokenizer.apply_chat_template(user, tokenize=True, add_generation_prompt=True, return_dict=False)
    for _ in range(20):
        text = oracle_answer(random_scene(rng), error_rate=0.5, rng=rng)
        ids = retokenizer.encode(text)
        assert ids[-1] == end_of_turn
        assert tokenizer.decode(ids[:-1], skip_special_tokens=False) == text
        conversation = tokenizer.apply_chat_template(
            user + [{"role": "assistant", "content": text}], tokenize=True, return_dict=False
        )
        assert conversation[: len(prompt_ids) + len(ids)] == list(prompt_ids) + ids


def test_answers_that_cannot_be_the_policys_are_refused(tokenizer):
    retokenizer = Retokenizer(tokenizer, max_tokens=12)
    refused = {
        "e\u0301 combining accent": "round-trip",  # the tokenizer's NFC normaliser would change it
        "<answer>3</answer><|im_end|>more": "end-of-turn",
        "look <|image_pad|> here": "image",
        "  \n ": "empty",
        "<think>" + "count them all " * 10 + "</think>": "cap",
    }
    for text, reason in refused.items():
        with pytest.raises(MalformedReplyError, match=reason):
            retokenizer.encode(text)
    assert retokenizer.encode("<answer>4</answer>")[-1] == tokenizer.convert_tokens_to_ids("<|im_end|>")


class EchoExpert:
    """Answers every sample with a fresh text, counting the samples it was asked for."""

    shares_prefix = False

    def __init__(self, config):
        self.config, self.asked = config, []

    def answer(self, request, sample_indices, deadline):
        self.asked += [(request.uid, index) for index in sample_indices]
        return [ExpertReply(index, f"<answer>{request.uid}-{index}</answer>") for index in sample_indices]

    def close(self):
        pass


def make_records(tmp_path, count: int) -> list[Record]:
    records = []
    for index in range(count):
        image = tmp_path / f"img{index}.png"
        Image.new("RGB", (8, 8), (index * 40, 7, 99)).save(image)
        records.append(Record(id=f"r{index}", task="clevr-math", images=(str(image),), problem=f"Q{index}?",
                              solution="<answer>1</answer>"))
    return records


def test_unusable_answer_cache_rows_are_asked_again_with_one_warning(tmp_path, caplog):
    caplog.set_level(logging.WARNING)
    expert = expert_config(k=2)
    records = make_records(tmp_path, 3)
    hashes = [ExpertRequest(record).prompt_hash for record in records]
    bad = [{"text": None}, {"text": 42}, {}, {"text": "<answer>cut</answer>", "finish_reason": "length"}]
    rows = [{"key": answer_key(expert, hashes[0], 0), "text": "<answer>kept</answer>", "finish_reason": "stop"}]
    rows += [dict(extra, key=answer_key(expert, hashes[1 + i // 2], i % 2)) for i, extra in enumerate(bad)]
    cache_dir = tmp_path / "cache"
    cache_dir.mkdir()
    (cache_dir / "gpt.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))

    config = ExpertPoolConfig(experts=(expert,), cache_dir=str(cache_dir))
    echo = EchoExpert(expert)
    with ExpertPool(config, experts=[echo]) as pool:
        answers = pool.collect(pool.submit(records))
        metrics = pool.step_metrics()
    assert [[a.text for a in p] for p in answers] == [
        ["<answer>kept</answer>", "<answer>r0-1</answer>"]] + [[f"<answer>r{i}-{j}</answer>" for j in (0, 1)]
                                                              for i in (1, 2)]
    assert sorted(echo.asked) == [("r0", 1), ("r1", 0), ("r1", 1), ("r2", 0), ("r2", 1)]
    assert metrics["experts/gpt/received"] == 6 and metrics["experts/gpt/from_cache"] == 1
    assert pool.caches[0].unusable_rows == 3  # the truncated answer is skipped without a warning
    warnings = [r.getMessage() for r in caplog.records if "gpt.jsonl" in r.getMessage()]
    assert len(warnings) == 1 and "3 row(s)" in warnings[0]

    # The answers asked again were appended and serve the next run.
    with ExpertPool(config, experts=[EchoExpert(expert)]) as pool:
        pool.collect(pool.submit(records))
        assert pool.step_metrics()["experts/gpt/from_cache"] == 6 and pool.caches[0].unusable_rows == 3


def test_unusable_answers_of_a_cache_expert_are_dropped(tmp_path, caplog):
    caplog.set_level(logging.WARNING)
    records = make_records(tmp_path, 2)
    path = tmp_path / "answers.jsonl"
    lines = [
        {"id": "r0", "answers": [{"text": "<answer>1</answer>"}, {"text": None}, {"text": 3}, {}]},
        {"id": "r1", "answers": [{"text": "<answer>2</answer>", "token_ids": "oops"}, {"text": "<answer>5</answer>"}]},
    ]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    expert = ExpertConfig(name="replay", kind="cache", path=str(path), k=4)
    with ExpertPool(ExpertPoolConfig(experts=(expert,))) as pool:
        answers = pool.collect(pool.submit(records))
        metrics = pool.step_metrics()
    assert [[(a.sample_index, a.text) for a in p] for p in answers] == [
        [(0, "<answer>1</answer>")], [(0, "<answer>2</answer>"), (1, "<answer>5</answer>")]]
    assert (metrics["experts/replay/received"], metrics["experts/replay/dropped"]) == (3, 5)
    warnings = [r.getMessage() for r in caplog.records if str(path) in r.getMessage()]
    assert len(warnings) == 1 and "3 answer(s)" in warnings[0] and "'r0'" in warnings[0]

    # With the policy's tokenizer, token ids that are not a list of integers make the answer unusable too.
    same = dataclasses.replace(expert, same_tokenizer=True)
    with ExpertPool(ExpertPoolConfig(experts=(same,))) as pool:
        answers = pool.collect(pool.submit(records))
    assert [[a.sample_index for a in p] for p in answers] == [[0], [1]]


def test_truncated_answers_are_not_cached(tmp_path):
    cache = AnswerCache(tmp_path, expert_config())
    cache.put("h", ExpertReply(0, "<think>so far", finish_reason="length"))
    cache.put("h", ExpertReply(1, "<answer>2</answer>"))
    assert cache.get("h", 0) is None and cache.get("h", 1).text == "<answer>2</answer>"
    cache.close()
    assert len(read_jsonl(tmp_path / "gpt.jsonl")[0]) == 1
