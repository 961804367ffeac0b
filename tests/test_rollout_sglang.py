"""The SGLang engines against stand-ins: a local server speaking SGLang's HTTP API (backed by the HF engine)
and a recording engine with ``sglang.Engine``'s methods."""

from __future__ import annotations

import base64
import importlib.util
import pickle
import socket
import time

import pytest
import torch
from fakes.prompts import chat_prompt, image_prompts
from fakes.sglang import FakeSGLangServer, HFBackedGenerate, RecordingEngine
from PIL import Image

from ekipl.models import load_policy
from ekipl.data import Prompt
from ekipl.rollout.base import SamplingParams
from ekipl.rollout.hf import HFEngine
from ekipl.rollout.sglang import (
    SGLangEngine,
    SGLangError,
    SGLangHTTPEngine,
    SGLangLaunchArgs,
    SGLangResponseError,
    SGLangTimeoutError,
    SGLangUnavailableError,
    make_sglang_engine,
    model_token_ids,
)
from ekipl.rollout.sglang_api import (
    collapse_image_placeholders,
    parse_generate_outputs,
    resample_seed,
    sampling_params_dict,
)
from ekipl.rollout.weight_sync import buckets_of, tensor_bytes, transformers_to_sglang_name

SAMPLING = SamplingParams(temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=8)




@pytest.fixture(scope="module")
def prompts(processor):
    return image_prompts(processor, 2, seed=21)


@pytest.fixture(scope="module")
def token_ids(tiny_model_dir):
    return model_token_ids(tiny_model_dir)


@pytest.fixture
def server(policy, processor):
    with FakeSGLangServer(HFBackedGenerate(policy, processor)) as running:
        yield running


@pytest.fixture
def recording(policy, processor):
    return RecordingEngine(HFBackedGenerate(policy, processor))


def http_client(url, token_ids, **kwargs):
    options = dict(timeout_s=30.0, connect_timeout_s=2.0, max_retries=2, backoff_s=0.01)
    return SGLangHTTPEngine(url, **token_ids, **{**options, **kwargs})


def token_lists(groups):
    return [[c.token_ids for c in group] for group in groups]


def vision_ids(config) -> set[int]:
    return {config.image_token_id, config.video_token_id, config.vision_start_token_id, config.vision_end_token_id}


def hf_continuation(policy, processor, prompt, head, seed, max_new_tokens, sampling=SAMPLING):
    """The HF engine's sample of ``prompt`` continued after the completion tokens ``head``."""
    resumed = Prompt(prompt.uid, prompt.input_ids + head, prompt.images, prompt.mm_inputs)
    budget = SamplingParams(sampling.temperature, sampling.top_p, sampling.top_k, max_new_tokens)
    return HFEngine(policy, processor).generate([resumed], 1, budget, [[seed]])[0][0]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# ---- HTTP client -------------------------------------------------------------------------------------------


def test_http_generate_samples_what_the_hf_engine_samples(server, token_ids, policy, processor, prompts):
    """Same seeds, same samples and log-probs: images, placeholders, seeds and order all survive the wire."""
    seeds = [[11, 12, 13], [21, 22, 23]]
    groups = http_client(server.url, token_ids).generate(prompts, 3, SAMPLING, seeds)
    reference = HFEngine(policy, processor).generate(prompts, 3, SAMPLING, seeds)
    assert token_lists(groups) == token_lists(reference)
    for group, ref_group in zip(groups, reference):
        for completion, ref in zip(group, ref_group):
            assert completion.finish_reason == ref.finish_reason
            assert torch.allclose(torch.tensor(completion.logprobs), torch.tensor(ref.logprobs), atol=1e-5)
    # The wire carries one placeholder per image, a data URL per image, a distinct seed per sample.
    path, body = server.requests[-1]
    assert path == "/generate" and len(body["input_ids"]) == 6
    assert body["input_ids"][0] == collapse_image_placeholders(prompts[0].input_ids, token_ids["image_token_id"])
    assert body["input_ids"][0].count(token_ids["image_token_id"]) == 1
    assert all(images[0].startswith("data:image/png;base64,") for images in body["image_data"])
    assert [p["sampling_seed"] for p in body["sampling_params"]] == [11, 12, 13, 21, 22, 23]
    assert body["return_logprob"] is True and body["sampling_params"][0]["top_k"] == -1


def test_groups_are_prefilled_once_so_every_sample_hits_the_prefix_cache(server, token_ids, prompts):
    client = http_client(server.url, token_ids)
    client.generate(prompts, 4, SAMPLING, [[1, 2, 3, 4], [5, 6, 7, 8]])
    warm, samples = server.requests[:2]  # any further request redraws a sampled vision token
    assert [p["max_new_tokens"] for p in warm[1]["sampling_params"]] == [0, 0]
    assert len(samples[1]["input_ids"]) == 8
    stats = client.last_stats
    assert stats.samples == 8 and stats.prompt_tokens > 0
    assert stats.cached_prompt_tokens == stats.prompt_tokens  # every sample found its prompt cached

    client.flush_cache()
    unwarmed = http_client(server.url, token_ids, prefill_groups=False)
    unwarmed.generate(prompts, 4, SAMPLING, [[1, 2, 3, 4], [5, 6, 7, 8]])
    assert unwarmed.last_stats.prefix_hit_rate == pytest.approx(3 / 4)  # the first of each group prefills


def test_http_retries_a_server_error_then_succeeds(server, token_ids, prompts):
    server.faults = ["500", "drop"]
    groups = http_client(server.url, token_ids).generate(prompts[:1], 1, SAMPLING, [[9]])
    assert len(groups[0][0].token_ids) > 0
    assert server.paths() == ["/generate"] * 3


def test_http_gives_up_after_bounded_retries(server, token_ids, prompts):
    server.faults = ["500"] * 10
    start = time.perf_counter()
    with pytest.raises(SGLangResponseError, match="failed 3 times.*HTTP 500"):
        http_client(server.url, token_ids, max_retries=2, backoff_s=0.05).generate(prompts[:1], 1, SAMPLING, [[9]])
    assert len(server.requests) == 3
    assert time.perf_counter() - start >= 0.05 + 0.1  # backoff doubles: 0.05 then 0.1


def test_http_slow_reply_times_out_without_a_retry(server, token_ids, prompts):
    server.faults = [("slow", 1.5)]
    start = time.perf_counter()
    with pytest.raises(SGLangTimeoutError, match="timeout_s=0.3"):
        http_client(server.url, token_ids, timeout_s=0.3).generate(prompts[:1], 1, SAMPLING, [[9]])
    assert time.perf_counter() - start < 1.4 and len(server.requests) == 1


def test_http_malformed_answers_are_reported(server, token_ids, prompts):
    client = http_client(server.url, token_ids)
    server.faults = ["malformed"]
    with pytest.raises(SGLangResponseError, match="not JSON"):
        client.generate(prompts[:1], 1, SAMPLING, [[9]])
    server.faults = ["400"]
    with pytest.raises(SGLangResponseError, match="refused the request: HTTP 400"):
        client.generate(prompts[:1], 1, SAMPLING, [[9]])
    assert len(server.requests) == 2  # neither was retried


def test_http_without_a_server_says_how_to_start_one(token_ids, prompts):
    client = http_client(f"http://127.0.0.1:{free_port()}", token_ids, max_retries=1)
    with pytest.raises(SGLangUnavailableError, match="no SGLang server answered.*sglang.launch_server"):
        client.generate(prompts[:1], 1, SAMPLING, [[9]])


def test_http_weight_sync_in_buckets_with_memory_in_order(server, token_ids, policy):
    def serializer(bucket):
        return base64.b64encode(pickle.dumps([(name, tensor.clone()) for name, tensor in bucket])).decode()

    client = http_client(server.url, token_ids, serializer=serializer, tp_size=2, bucket_bytes=256 * 1024)
    client.release_memory()
    stats = client.update_weights(policy.named_parameters())
    paths = server.paths()
    assert paths[0] == "/release_memory_occupation" and paths[1] == "/resume_memory_occupation"
    assert paths[-1] == "/resume_memory_occupation" and set(paths[2:-1]) == {"/update_weights_from_tensor"}
    assert server.requests[0][1]["tags"] == ["kv_cache", "weights", "cuda_graph"]
    assert server.requests[1][1]["tags"] == ["weights"]
    assert server.requests[-1][1]["tags"] == ["kv_cache", "cuda_graph"]
    updates = [body for path, body in server.requests if path == "/update_weights_from_tensor"]
    assert stats.buckets == len(updates) > 1
    assert [body["flush_cache"] for body in updates] == [False] * (len(updates) - 1) + [True]
    received = [
        item for body in updates for item in pickle.loads(base64.b64decode(body["serialized_named_tensors"][0]))
    ]
    assert all(len(body["serialized_named_tensors"]) == 2 for body in updates)  # one payload per TP rank
    expected = [(transformers_to_sglang_name(name), tensor) for name, tensor in policy.named_parameters()]
    assert [name for name, _ in received] == [name for name, _ in expected]
    assert all(torch.equal(got, want) for (_, got), (_, want) in zip(received, expected))
    assert stats.bytes == sum(tensor_bytes(t) for _, t in expected)


# ---- in-process engine -------------------------------------------------------------------------------------


def test_engine_generate_matches_hf_and_sends_seeds_and_images(recording, token_ids, policy, processor, prompts):
    engine = SGLangEngine(recording, **token_ids)
    seeds = [[51, 52, 53], [61, 62, 63]]  # seeds whose samples draw no vision token (those are redrawn, see below)
    groups = engine.generate(prompts, 3, SAMPLING, seeds)
    assert token_lists(groups) == token_lists(HFEngine(policy, processor).generate(prompts, 3, SAMPLING, seeds))
    (_, warm), (_, samples) = recording.calls
    assert [p["max_new_tokens"] for p in warm["sampling_params"]] == [0, 0]
    group_seeds = [[p["sampling_seed"] for p in samples["sampling_params"][i * 3 : (i + 1) * 3]] for i in range(2)]
    assert group_seeds == seeds and all(len(set(g)) == 3 for g in group_seeds)
    assert all(isinstance(images[0], Image.Image) for images in samples["image_data"])  # PIL as is, in-process
    assert samples["input_ids"][0::3] == warm["input_ids"]
    assert engine.last_stats.prefix_hit_rate == 1.0


def test_engine_mixes_prompts_with_and_without_images(recording, token_ids, policy, processor, prompts):
    text_only = chat_prompt(processor, "t", "How many objects are there?", [])
    mixed = [prompts[0], text_only]
    engine = SGLangEngine(recording, **token_ids, prefill_groups=False)
    # Seeds whose samples draw no vision token: a redrawn one would differ from the HF engine's suppression.
    groups = engine.generate(mixed, 2, SAMPLING, [[1, 2], [4, 5]])
    assert token_lists(groups) == token_lists(
        HFEngine(policy, processor).generate(mixed, 2, SAMPLING, [[1, 2], [4, 5]])
    )
    assert recording.calls[0][1]["image_data"][2:] == [None, None]


@pytest.mark.parametrize("transport", ["engine", "http"])
def test_sampled_vision_tokens_never_reach_the_trainer(transport, policy, processor, prompts, token_ids):
    """SGLang samples from the whole vocabulary: a vision placeholder it emits is cut, and the sample continues
    from there with a fresh seed, every log-prob still the full-vocabulary one (what the learner recomputes)."""
    config = policy.config
    assert set(token_ids["suppress_token_ids"]) == vision_ids(config)
    backend = HFBackedGenerate(policy, processor)
    backend.forced = {
        12: (3, config.image_token_id),
        resample_seed(12, 1): (1, config.video_token_id),  # the first resample draws one again
        21: (0, config.vision_start_token_id),
    }
    (emitted,) = backend.generate(
        [collapse_image_placeholders(prompts[0].input_ids, config.image_token_id)],
        [sampling_params_dict(SAMPLING, token_ids["stop_token_ids"], 12)],
        image_data=[prompts[0].images],
    )
    assert emitted["output_ids"][3] == config.image_token_id  # the stand-in does emit one
    seeds = [[11, 12], [21, 22]]
    if transport == "http":
        with FakeSGLangServer(backend) as server:
            groups = http_client(server.url, token_ids).generate(prompts, 2, SAMPLING, seeds)
            requests = [body for _, body in server.requests]
    else:
        recording = RecordingEngine(backend)
        groups = SGLangEngine(recording, **token_ids).generate(prompts, 2, SAMPLING, seeds)
        requests = [kwargs for _, kwargs in recording.calls]

    reference = HFEngine(policy, processor).generate(prompts, 2, SAMPLING, seeds)
    for group in groups:
        for completion in group:
            assert not vision_ids(config) & set(completion.token_ids) and len(completion.token_ids) <= 8
    for i, j in ((0, 0), (1, 1)):  # untouched samples
        assert groups[i][j].token_ids == reference[i][j].token_ids
        assert groups[i][j].logprobs == pytest.approx(reference[i][j].logprobs, abs=1e-5)
    # Seed 12: cut at 3, resumed with resample_seed(12, 1), which drew a placeholder at 1; cut, resumed again.
    head = reference[0][1].token_ids[:3]
    first = hf_continuation(policy, processor, prompts[0], head, resample_seed(12, 1), 5)
    head_logprobs = reference[0][1].logprobs[:3] + first.logprobs[:1]
    head = head + first.token_ids[:1]
    tail = hf_continuation(policy, processor, prompts[0], head, resample_seed(12, 2), 4)
    assert groups[0][1].token_ids == head + tail.token_ids
    assert groups[0][1].logprobs == pytest.approx(head_logprobs + tail.logprobs, abs=1e-5)
    assert groups[0][1].finish_reason == tail.finish_reason
    # Seed 21: a placeholder first, so the whole sample is redrawn.
    redrawn = hf_continuation(policy, processor, prompts[1], [], resample_seed(21, 1), 8)
    assert groups[1][0].token_ids == redrawn.token_ids
    assert groups[1][0].logprobs == pytest.approx(redrawn.logprobs, abs=1e-5)
    # Warm-up, samples, then one resample request per round, each continuing from the kept tokens.
    assert len(requests) == 4
    assert requests[2]["input_ids"][0] == requests[1]["input_ids"][1] + reference[0][1].token_ids[:3]
    assert [p["max_new_tokens"] for p in requests[2]["sampling_params"]] == [5, 8]
    assert [p["max_new_tokens"] for p in requests[3]["sampling_params"]] == [4]


def test_vision_token_resampling_gives_up_by_cutting_the_sample(recording, policy, processor, prompts, token_ids):
    config = policy.config
    recording.backend.forced = {12: (3, config.image_token_id), resample_seed(12, 1): (1, config.image_token_id)}
    engine = SGLangEngine(recording, **token_ids, prefill_groups=False, max_resamples=1)
    (group,) = engine.generate(prompts[:1], 2, SAMPLING, [[11, 12]])
    reference = HFEngine(policy, processor).generate(prompts[:1], 2, SAMPLING, [[11, 12]])[0]
    first = hf_continuation(policy, processor, prompts[0], reference[1].token_ids[:3], resample_seed(12, 1), 5)
    assert group[1].token_ids == reference[1].token_ids[:3] + first.token_ids[:1]  # ends before the second
    assert group[1].finish_reason == "length" and len(recording.calls) == 2
    # Greedy: another seed cannot change the argmax, so the sample is cut without a resample.
    greedy = SamplingParams(temperature=0.0, top_p=1.0, top_k=0, max_new_tokens=8)
    recording.backend.forced = {5: (2, config.vision_end_token_id)}
    recording.calls.clear()
    (group,) = engine.generate(prompts[:1], 1, greedy, [[5]])
    expected = HFEngine(policy, processor).generate(prompts[:1], 1, greedy, [[5]])[0][0]
    assert group[0].token_ids == expected.token_ids[:2] and group[0].finish_reason == "length"
    assert len(recording.calls) == 1


def test_engine_weight_sync_buckets_names_flush_and_memory_order(recording, token_ids, policy, prompts):
    bucket_bytes = 200 * 1024
    engine = SGLangEngine(recording, **token_ids, bucket_bytes=bucket_bytes)
    engine.release_memory()
    with pytest.raises(SGLangError, match="released"):
        engine.generate(prompts[:1], 1, SAMPLING, [[1]])
    stats = engine.update_weights(policy.named_parameters())
    names = recording.names()
    assert names[0] == "release_memory_occupation" and recording.calls[0][1]["tags"] == [
        "kv_cache",
        "weights",
        "cuda_graph",
    ]
    assert recording.calls[1] == ("resume_memory_occupation", {"tags": ["weights"]})
    assert recording.calls[-1] == ("resume_memory_occupation", {"tags": ["kv_cache", "cuda_graph"]})
    updates = [kwargs for name, kwargs in recording.calls if name == "update_weights_from_tensor"]
    assert names[2:-1] == ["update_weights_from_tensor"] * len(updates) and "flush_cache" not in names
    assert [u["flush_cache"] for u in updates] == [False] * (len(updates) - 1) + [True]
    assert all(u["load_format"] is None for u in updates)
    sizes = [sum(tensor_bytes(t) for _, t in u["named_tensors"]) for u in updates]
    for i, update in enumerate(updates):  # full buckets: under the limit unless one tensor, and greedy
        assert sizes[i] <= bucket_bytes or len(update["named_tensors"]) == 1
        if i + 1 < len(updates):
            assert sizes[i] + tensor_bytes(updates[i + 1]["named_tensors"][0][1]) > bucket_bytes
    sent = [name for u in updates for name, _ in u["named_tensors"]]
    assert sent == [transformers_to_sglang_name(name) for name, _ in policy.named_parameters()]
    assert any(name.startswith("visual.") for name in sent) and any(name.startswith("model.layers.") for name in sent)
    assert not any("language_model" in name or name.startswith("model.visual") for name in sent)
    assert (stats.bytes, stats.buckets) == (sum(sizes), len(updates))
    assert len(engine.generate(prompts[:1], 1, SAMPLING, [[1]])[0]) == 1  # memory is back
    engine.release_memory()
    engine.resume_memory()
    assert recording.calls[-2:] == [
        ("resume_memory_occupation", {"tags": ["weights"]}),
        ("resume_memory_occupation", {"tags": ["kv_cache", "cuda_graph"]}),
    ]


def test_engine_empty_sync_still_flushes_and_failures_raise(recording, token_ids):
    engine = SGLangEngine(recording, **token_ids)
    assert engine.update_weights([]).buckets == 0 and recording.names() == ["flush_cache"]
    recording.update_weights_from_tensor = lambda **kwargs: (False, "shape mismatch for model.norm.weight")
    with pytest.raises(SGLangError, match="shape mismatch"):
        engine.update_weights([("model.norm.weight", torch.ones(3))])


def test_engine_refuses_repeated_seeds_in_a_group(recording, token_ids, prompts):
    with pytest.raises(ValueError, match="must differ"):
        SGLangEngine(recording, **token_ids).generate(prompts[:1], 2, SAMPLING, [[7, 7]])
    assert recording.calls == []


def test_responses_that_are_not_sglangs_are_errors():
    good = {
        "meta_info": {
            "finish_reason": {"type": "stop", "matched": 2},
            "prompt_tokens": 5,
            "cached_tokens": 3,
            "output_token_logprobs": [[-0.5, 7, None], [-0.1, 2, None]],
        }
    }
    groups, prompt_tokens, cached = parse_generate_outputs([good], 1, 1)
    assert (groups[0][0].token_ids, groups[0][0].logprobs, groups[0][0].finish_reason) == ([7, 2], [-0.5, -0.1], "stop")
    assert (prompt_tokens, cached) == (5, 3)
    with pytest.raises(SGLangResponseError, match="output_token_logprobs"):
        parse_generate_outputs([{"meta_info": {"finish_reason": {"type": "length"}, "prompt_tokens": 1}}], 1, 1)
    with pytest.raises(SGLangResponseError, match="aborted"):
        parse_generate_outputs([{"meta_info": {**good["meta_info"], "finish_reason": {"type": "abort"}}}], 1, 1)
    with pytest.raises(SGLangResponseError, match="expected 2"):
        parse_generate_outputs([good], 1, 2)


@pytest.mark.skipif(importlib.util.find_spec("sglang") is not None, reason="sglang is installed here")
def test_launch_without_sglang_names_the_fix(tiny_model_dir):
    with pytest.raises(ImportError, match="pip install 'ekipl\\[sglang\\]'"):
        SGLangEngine.launch(SGLangLaunchArgs(model_path=str(tiny_model_dir)))


def test_trainer_config_makes_an_http_engine(tiny_model_dir, processor, token_ids):
    from ekipl.config import RolloutConfig

    rollout = RolloutConfig(engine="sglang-http", url="http://127.0.0.1:1", bucket_mb=64)
    engine = make_sglang_engine(rollout, model_path=tiny_model_dir, processor=processor)
    assert isinstance(engine, SGLangHTTPEngine) and engine.base_url == "http://127.0.0.1:1"
    assert engine.bucket_bytes == 64 * 1024 * 1024
    assert (engine.image_token_id, engine.stop_token_ids) == (token_ids["image_token_id"], token_ids["stop_token_ids"])
    assert engine.suppress_token_ids == frozenset(token_ids["suppress_token_ids"])
    with pytest.raises(ValueError, match="not an SGLang engine"):
        make_sglang_engine(RolloutConfig(engine="hf"), model_path=tiny_model_dir, processor=processor)


def test_launch_args_pass_through():
    args = SGLangLaunchArgs(model_path="m", extra_args={"context_length": 4096})
    kwargs = args.engine_kwargs()
    assert kwargs["enable_memory_saver"] is True and kwargs["context_length"] == 4096
    assert "enable_deterministic_inference" not in kwargs
    assert SGLangLaunchArgs(model_path="m", enable_deterministic_inference=True).engine_kwargs()[
        "enable_deterministic_inference"
    ]


# ---- weight-sync helpers -----------------------------------------------------------------------------------


def test_names_map_from_transformers_to_sglang():
    assert (
        transformers_to_sglang_name("model.language_model.layers.0.self_attn.q_proj.weight")
        == "model.layers.0.self_attn.q_proj.weight"
    )
    assert transformers_to_sglang_name("model.visual.blocks.0.attn.qkv.weight") == "visual.blocks.0.attn.qkv.weight"
    assert transformers_to_sglang_name("lm_head.weight") == "lm_head.weight"
    assert transformers_to_sglang_name("model.layers.3.mlp.up_proj.weight") == "model.layers.3.mlp.up_proj.weight"


def test_mapped_names_are_the_checkpoint_names_sglang_loads(tiny_model_dir, policy):
    """SGLang loads the checkpoint layout; transformers saves it, so the mapping must reproduce its keys."""
    from safetensors import safe_open

    with safe_open(tiny_model_dir / "model.safetensors", "pt") as checkpoint:
        saved = set(checkpoint.keys())
    mapped = {transformers_to_sglang_name(name) for name, _ in policy.named_parameters()}
    assert mapped == saved


def test_buckets_are_filled_greedily_and_lazily():
    generator = torch.Generator().manual_seed(0)
    sizes = torch.randint(1, 60, (40,), generator=generator).tolist() + [500]
    tensors = [(f"t{i}", torch.randn(size, generator=generator)) for i, size in enumerate(sizes)]
    pulled = []

    def lazily():
        for item in tensors:
            pulled.append(item[0])
            yield item

    buckets = buckets_of(lazily(), bucket_bytes=100 * 4)
    first = next(buckets)
    assert len(pulled) == len(first) + 1  # one tensor read past the first bucket, no more
    rest = list(buckets)
    everything = [first, *rest]
    assert [name for bucket in everything for name, _ in bucket] == [name for name, _ in tensors]
    assert everything[-1] == [tensors[-1]]  # the 2000-byte tensor travels alone
    for bucket, following in zip(everything, everything[1:]):
        filled = sum(tensor_bytes(t) for _, t in bucket)
        assert filled <= 400 and filled + tensor_bytes(following[0][1]) > 400
    with pytest.raises(ValueError, match="positive"):
        list(buckets_of(tensors, 0))


# ---- the real thing, where a GPU and sglang are present -------------------------------------------------------


@pytest.mark.skipif(
    not torch.cuda.is_available() or importlib.util.find_spec("sglang") is None, reason="needs CUDA and sglang"
)
def test_real_sglang_engine_samples_syncs_and_releases(tiny_model_dir, processor, prompts):
    learner = load_policy(tiny_model_dir, dtype=torch.bfloat16, device="cuda")
    engine = SGLangEngine.launch(SGLangLaunchArgs(model_path=str(tiny_model_dir), mem_fraction_static=0.3))
    try:
        sampling = SamplingParams(temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=16)
        groups = engine.generate(prompts, 4, sampling, [[1, 2, 3, 4], [5, 6, 7, 8]])
        assert engine.last_stats.prefix_hit_rate > 0.5
        cpu_model = load_policy(tiny_model_dir)
        for prompt, group in zip(prompts, groups):
            for completion in group:
                ids = torch.tensor([prompt.input_ids + completion.token_ids])
                with torch.no_grad():
                    logits = cpu_model(
                        input_ids=ids,
                        attention_mask=torch.ones_like(ids),
                        mm_token_type_ids=(ids == cpu_model.config.image_token_id).int(),
                        **prompt.mm_inputs,
                    ).logits[0, len(prompt.input_ids) - 1 : -1]
                expected = logits.log_softmax(-1).gather(-1, torch.tensor(completion.token_ids)[:, None]).squeeze(-1)
                assert (torch.tensor(completion.logprobs) - expected).abs().mean() < 0.05  # bf16 engine vs fp32
        with torch.no_grad():
            for parameter in learner.parameters():
                parameter.mul_(-1)  # a different policy, surely
        engine.release_memory()
        stats = engine.update_weights(learner.named_parameters())
        assert stats.bytes == sum(p.numel() * p.element_size() for p in learner.parameters()) and stats.buckets >= 1
        after = engine.generate(prompts, 4, sampling, [[1, 2, 3, 4], [5, 6, 7, 8]])
        assert token_lists(after) != token_lists(groups)
    finally:
        engine.shutdown()
