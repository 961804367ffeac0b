"""The OpenAI-compatible expert and the pool's failure handling, against a loopback stand-in server."""

from __future__ import annotations

import json
import logging
import secrets
import time
from pathlib import Path

import pytest
from openai_standin import OpenAIStandIn, closed_port_url
from PIL import Image

from ekipl.data.records import Record
from ekipl.experts.base import ExpertRequest
from ekipl.experts.cache_expert import CacheExpert
from ekipl.experts.config import ExpertConfig, ExpertPoolConfig
from ekipl.experts.generate import main as generate_main
from ekipl.experts.pool import ExpertPool
from ekipl.models import load_processor

KEY_ENV = "EKIPL_TEST_EXPERT_KEY"


@pytest.fixture(scope="module")
def processor(tiny_model_dir):
    return load_processor(tiny_model_dir)


@pytest.fixture
def api_key(monkeypatch):
    key = "sk-test-" + secrets.token_hex(16)
    monkeypatch.setenv(KEY_ENV, key)
    return key


def make_records(tmp_path: Path, problems: list[str]) -> list[Record]:
    records = []
    for index, problem in enumerate(problems):
        image = tmp_path / f"img{index}.png"
        Image.new("RGB", (28, 28), tuple(secrets.randbelow(256) for _ in range(3))).save(image)
        records.append(
            Record(id=f"r{index}", task="clevr-math", images=(str(image),), problem=problem,
                   solution="<answer>3</answer>")
        )
    return records


def openai_expert(name: str, base_url: str, **overrides) -> ExpertConfig:
    values = dict(name=name, kind="openai", model="standin-model", base_url=base_url, api_key_env=KEY_ENV, k=2)
    values.update(overrides)
    return ExpertConfig(**values)


def test_answers_arrive_retokenised_and_the_key_stays_secret(tmp_path, processor, api_key, caplog):
    caplog.set_level(logging.DEBUG)
    cache_dir = tmp_path / "cache"
    records = make_records(tmp_path, ["How many cubes?", "How many spheres?", "How many cylinders?"])
    with OpenAIStandIn() as server:
        answers_by_marker = {"cubes": "<think>Two cubes.</think>\n<answer>2</answer>",
                             "spheres": "<think>Five spheres.</think>\n<answer>5</answer>"}
        for marker, text in answers_by_marker.items():
            server.script(marker, ["ok"], answer=text)
        config = ExpertPoolConfig(experts=(openai_expert("gpt", server.base_url),), cache_dir=str(cache_dir))
        with ExpertPool(config, processor) as pool:
            answers = pool.collect(pool.submit(records))
            metrics = pool.step_metrics()

    tokenizer = processor.tokenizer
    end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>")
    expected = [answers_by_marker["cubes"], answers_by_marker["spheres"], server.default_answer]
    for per_prompt, text in zip(answers, expected):
        assert [a.sample_index for a in per_prompt] == [0, 1]
        for answer in per_prompt:
            assert answer.text == text and answer.expert_id == 1 and not answer.from_cache
            assert answer.token_ids[-1] == end_of_turn
            assert tokenizer.decode(answer.token_ids[:-1], skip_special_tokens=False) == text
            assert answer.origins == [1] * len(answer.token_ids)
    assert metrics["experts/gpt/requested"] == 6 and metrics["experts/gpt/received"] == 6
    assert metrics["experts/gpt/tokens"] == sum(len(a.token_ids) for p in answers for a in p)

    # The request carried the images as data URLs and the key as a bearer token, and nothing else kept it.
    headers, body = server.requests[0]
    assert {name.lower(): value for name, value in headers.items()}["authorization"] == f"Bearer {api_key}"
    content = body["messages"][0]["content"]
    assert content[0]["image_url"]["url"].startswith("data:image/png;base64,")
    assert body["model"] == "standin-model" and body["max_tokens"] == 512
    assert api_key not in caplog.text
    written = list(cache_dir.rglob("*"))
    assert written and all(api_key not in path.read_text() for path in written if path.is_file())


def test_failures_are_counted_and_the_step_keeps_its_deadline(tmp_path, processor, api_key):
    markers = ["flaky", "garbled", "hollow", "sleepy", "refused", "throttled", "fine"]
    records = make_records(tmp_path, [f"Question {marker}?" for marker in markers])
    timeout_s = 1.5
    with OpenAIStandIn() as server:
        server.script("flaky", ["429", "500", "ok"])
        server.script("garbled", ["malformed"])
        server.script("hollow", ["no_choices"])
        server.script("sleepy", ["sleep:30"])
        server.script("refused", ["400"])
        server.script("throttled", ["429"])
        config = ExpertPoolConfig(
            experts=(openai_expert("api", server.base_url, k=1), openai_expert("down", closed_port_url(), k=1)),
            expert_timeout_s=timeout_s,
        )
        pool = ExpertPool(config, processor)
        started = time.monotonic()
        answers = pool.collect(pool.submit(records))
        waited = time.monotonic() - started
        pool.close()
        closed_after = time.monotonic() - started

    assert timeout_s - 0.1 < waited < timeout_s + 0.5, waited  # "sleepy" keeps the step waiting, no longer
    assert closed_after < timeout_s + 1.5, closed_after  # and its worker gave up at the deadline too
    got = {markers[i]: [a.expert for a in per_prompt] for i, per_prompt in enumerate(answers)}
    assert got == {"flaky": ["api"], "garbled": [], "hollow": [], "sleepy": [], "refused": [], "throttled": [],
                   "fine": ["api"]}
    metrics = pool.step_metrics()
    api = {key.split("/")[-1]: value for key, value in metrics.items() if key.startswith("experts/api/")}
    assert api["requested"] == 7 and api["received"] == 2
    assert api["dropped"] == 2  # malformed JSON, no choices
    assert api["timed_out"] == 1  # sleepy
    assert api["failed"] == 2  # 400 (not retried), 429 until the deadline
    assert server.hits["flaky"] == 3 and server.hits["refused"] == 1 and server.hits["throttled"] > 2
    down = {key.split("/")[-1]: value for key, value in metrics.items() if key.startswith("experts/down/")}
    # refused connections fail fast; on a loaded machine the last retries may meet the deadline instead
    assert down["requested"] == 7 and down["received"] == 0 and down["failed"] + down["timed_out"] == 7
    assert down["failed"] >= 1


def test_cached_answers_are_not_requested_twice(tmp_path, processor, api_key):
    records = make_records(tmp_path, ["How many red cubes?", "How many blue spheres?"])
    cache_dir = tmp_path / "cache"
    with OpenAIStandIn() as server:
        config = ExpertPoolConfig(experts=(openai_expert("gpt", server.base_url, k=3),), cache_dir=str(cache_dir))
        with ExpertPool(config, processor) as pool:
            first = pool.collect(pool.submit(records))
        hits_after_first = sum(server.hits.values())
        # A crash mid-append leaves a torn last line: the next run reads past it and appends after it.
        with (cache_dir / "gpt.jsonl").open("a") as handle:
            handle.write('{"key": "torn')
        with ExpertPool(config, processor) as pool:
            second = pool.collect(pool.submit(records))
            metrics = pool.step_metrics()
            assert pool.caches[0].unreadable_lines == 1
        assert sum(server.hits.values()) == hits_after_first == 6
    assert metrics["experts/gpt/from_cache"] == metrics["experts/gpt/received"] == 6
    assert [[(a.text, a.token_ids) for a in p] for p in first] == [[(a.text, a.token_ids) for a in p] for p in second]
    assert all(a.from_cache for p in second for a in p)


def test_generate_writes_resumably_and_the_cache_expert_serves_it(tmp_path, api_key):
    records = make_records(tmp_path, [f"How many objects in scene {i}?" for i in range(5)])
    data = tmp_path / "data.jsonl"
    data.write_text("".join(
        json.dumps({"id": r.id, "image": Path(r.images[0]).name, "problem": r.problem, "solution": r.solution}) + "\n"
        for r in records
    ))
    out = tmp_path / "answers.jsonl"
    with OpenAIStandIn() as server:
        server.script("scene 3", ["500"])  # fails every time: left for a rerun
        config_path = tmp_path / "gen.yaml"
        config_path.write_text(json.dumps({
            "data": {"path": str(data), "task": "clevr-math"},
            "experts": {
                "experts": [
                    {"name": "gpt", "kind": "openai", "model": "m", "base_url": server.base_url,
                     "api_key_env": KEY_ENV, "k": 2},
                    {"name": "oracle", "kind": "oracle"},  # offline: never asked by generate
                ],
            },
        }))
        args = ["--config", str(config_path), "--out", str(out), "--timeout-s", "2"]
        assert generate_main(args + ["--batch-size", "2"]) == 0
        lines = [json.loads(line) for line in out.read_text().splitlines()]
        assert sorted(row["id"] for row in lines) == ["r0", "r1", "r2", "r4"]
        assert all(row["expert"] == "gpt" and len(row["answers"]) == 2 for row in lines)
        assert api_key not in out.read_text()

        hits = sum(server.hits.values())
        server.script("scene 3", ["ok"])
        with out.open("a") as handle:
            handle.write('{"id": "r9", "answ')  # torn by a crash
        assert generate_main(args) == 0
        assert sum(server.hits.values()) == hits + 2  # only r3's two answers were asked for

    expert = CacheExpert(ExpertConfig(name="replay", kind="cache", path=str(out), k=2))
    assert expert.unreadable_lines == 1
    assert sorted(expert.answers) == ["r0", "r1", "r2", "r3", "r4"]
    replies = expert.answer(ExpertRequest(records[3]), [0, 1, 2], time.monotonic() + 1)
    assert [r.sample_index for r in replies] == [0, 1] and all(r.from_cache for r in replies)
    assert replies[0].text == server.default_answer


def test_a_dripping_reply_is_cut_at_the_deadline_and_starves_nothing(tmp_path, processor, api_key):
    # One byte every 0.2 s keeps every read well inside the 0.6 s per-read timeout: only a total deadline
    # on each attempt ends it. The server drips for at most 8 s, bounding the test if that deadline is missing.
    records = make_records(tmp_path, ["Question dripping?", "Question fine?"])
    timeout_s = 1.5
    with OpenAIStandIn() as server:
        server.script("dripping", ["drip:8"])
        expert = openai_expert("slow", server.base_url, k=1, max_in_flight=1, request_timeout_s=0.6)
        pool = ExpertPool(ExpertPoolConfig(experts=(expert,), expert_timeout_s=timeout_s), processor)
        first = pool.collect(pool.submit(records[:1]))
        first_metrics = pool.step_metrics()
        started = time.monotonic()
        second = pool.collect(pool.submit(records[1:]))  # the expert's only worker must be free again
        second_waited = time.monotonic() - started
        pool.close()
        closed_after = time.monotonic() - started

    assert first == [[]] and first_metrics["experts/slow/timed_out"] == 1
    assert server.hits["dripping"] >= 2  # each attempt ended at request_timeout_s, then it was retried
    assert [a.text for a in second[0]] == [server.default_answer] and second_waited < 1.2, second_waited
    assert closed_after < second_waited + 1.0, closed_after


def test_truncated_answers_join_the_step_but_are_never_cached(tmp_path, processor, api_key):
    records = make_records(tmp_path, ["How many cut short?", "How many whole?"])
    cache_dir = tmp_path / "cache"
    with OpenAIStandIn() as server:
        server.script("cut short", ["length"])
        config = ExpertPoolConfig(experts=(openai_expert("gpt", server.base_url, k=2),), cache_dir=str(cache_dir))
        for run in range(2):
            with ExpertPool(config, processor) as pool:
                answers = pool.collect(pool.submit(records))
            assert [[a.finish_reason for a in p] for p in answers] == [["length"] * 2, ["stop"] * 2]
            assert [a.from_cache for p in answers for a in p] == [False, False] + [run == 1] * 2
        assert server.hits["cut short"] == 4  # asked again by the second run
    rows = [json.loads(line) for line in (cache_dir / "gpt.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and {row["finish_reason"] for row in rows} == {"stop"}


def test_a_deleted_image_costs_its_answers_not_the_step(tmp_path, processor, api_key, caplog):
    records = make_records(tmp_path, ["How many here?", "How many gone?"])
    with OpenAIStandIn() as server:
        config = ExpertPoolConfig(experts=(openai_expert("gpt", server.base_url, k=2),), cache_dir=str(tmp_path / "c"))
        with ExpertPool(config, processor) as pool:
            Path(records[1].images[0]).unlink()  # after the records were loaded
            answers = pool.collect(pool.submit(records))
            metrics = pool.step_metrics()
    assert [len(per_prompt) for per_prompt in answers] == [2, 0]
    assert (metrics["experts/gpt/received"], metrics["experts/gpt/dropped"]) == (2, 2)
    assert records[1].images[0] in caplog.text
