"""The answer cache, the crash-tolerant JSONL files, and re-tokenisation into the policy's tokenizer."""

from __future__ import annotations

import dataclasses
import random

import pytest

from ekipl.data.synthetic import oracle_answer, random_scene
from ekipl.experts.base import ExpertReply, MalformedReplyError
from ekipl.experts.cache import AnswerCache, answer_key
from ekipl.experts.config import ExpertConfig
from ekipl.experts.jsonl import JsonlAppender, read_jsonl
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
        finish_reason=rng.choice(["stop", "length"]),
        latency_s=rng.random(),
    )


def test_cache_round_trip_and_keys(tmp_path):
    rng = random.Random()
    expert = expert_config()
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
