"""SGLang rollout engines: in-process (colocated with the learner on the same GPUs) and HTTP client.

Both speak SGLang's real API; ``sglang`` itself is imported only when an in-process engine is launched or the
HTTP engine serialises weights, so this module loads on machines without it.

Weight sync goes through ``update_weights_from_tensor`` in buckets (``bucket_bytes``, 512 MB by default), the
prefix cache flushed with the last bucket only, parameter names mapped from transformers' layout to
SGLang's. Over HTTP the tensors travel as CUDA IPC handles, so the server must run on the learner's machine.

Vision special tokens (image/video placeholders, vision start/end) are never handed back: SGLang samples from the
whole vocabulary, so a sample that draws one is cut before it and continued from there with a fresh seed (see
:meth:`SGLangEngineBase._redraw_suppressed`), the way the HF engine never samples them.

Memory (in-process, ``enable_memory_saver``): :meth:`release_memory` frees the KV cache, the weights and the
CUDA graphs before the learner runs; :meth:`update_weights` takes the weights back first, loads the new ones,
and only then retakes the KV cache, so the learner's memory and SGLang's KV cache never coexist with a second
copy of the weights.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import requests
import torch

from ekipl.models import eos_token_ids
from ekipl.rollout.base import (
    Completion,
    GenerateStats,
    Prompt,
    SamplingParams,
    SyncStats,
    check_generate_args,
)
from ekipl.rollout.sglang_api import (
    CUDA_GRAPH,
    KV_CACHE,
    WEIGHTS,
    SGLangError,
    SGLangResponseError,
    SGLangTimeoutError,
    SGLangUnavailableError,
    generate_requests,
    image_to_data_url,
    parse_generate_outputs,
    resample_seed,
)
from ekipl.rollout.weight_sync import (
    DEFAULT_BUCKET_BYTES,
    NamedTensor,
    buckets_of,
    tensor_bytes,
    transformers_to_sglang_name,
)

__all__ = [
    "SGLangEngine",
    "SGLangEngineBase",
    "SGLangError",
    "SGLangHTTPEngine",
    "SGLangLaunchArgs",
    "SGLangResponseError",
    "SGLangTimeoutError",
    "SGLangUnavailableError",
    "make_sglang_engine",
    "model_token_ids",
]


# The config fields of the vision special tokens, which a completion must never contain (as in the HF engine).
VISION_TOKEN_FIELDS = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")


def model_token_ids(model_path: str | Path, tokenizer: Any = None) -> dict[str, Any]:
    """The engine's token keyword arguments for the model at ``model_path``: ``image_token_id`` (None for a
    text-only model), ``stop_token_ids`` and ``suppress_token_ids`` (its vision special tokens).

    ``tokenizer``: the model's tokenizer if the caller has it loaded already.
    """
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    config = AutoConfig.from_pretrained(str(model_path))
    try:
        generation_config = GenerationConfig.from_pretrained(str(model_path))
    except OSError:  # no generation_config.json: the tokenizer's EOS alone
        generation_config = None
    tokenizer = tokenizer if tokenizer is not None else AutoTokenizer.from_pretrained(str(model_path))
    return dict(
        image_token_id=getattr(config, "image_token_id", None),
        stop_token_ids=eos_token_ids(generation_config, tokenizer),
        suppress_token_ids=tuple(
            getattr(config, field) for field in VISION_TOKEN_FIELDS if getattr(config, field, None) is not None
        ),
    )


def _cut(completion: Completion, end: int) -> Completion:
    """The first ``end`` tokens of ``completion``, as a sample that ran out of length there."""
    return Completion(list(completion.token_ids[:end]), list(completion.logprobs[:end]), "length")


def _check_success(result: Any, what: str) -> None:
    """SGLang answers control calls with ``(success, message)`` (Engine) or ``{"success", "message"}`` (HTTP)."""
    success, message = (result.get("success"), result.get("message")) if isinstance(result, dict) else result
    if not success:
        raise SGLangError(f"SGLang {what} failed: {message}")


class SGLangEngineBase(ABC):
    """The protocol on top of five transport calls that the in-process and HTTP engines provide.

    ``suppress_token_ids`` (the image placeholder always among them) never appear in a completion; a sample that
    draws one is redrawn from there up to ``max_resamples`` times, then cut before it.
    """

    def __init__(
        self,
        *,
        image_token_id: int | None,
        stop_token_ids: Sequence[int],
        suppress_token_ids: Sequence[int] = (),
        max_resamples: int = 4,
        bucket_bytes: int = DEFAULT_BUCKET_BYTES,
        name_mapper: Callable[[str], str] = transformers_to_sglang_name,
        prefill_groups: bool = True,
    ):
        if not stop_token_ids:
            raise ValueError("stop_token_ids is empty: give the model's EOS ids (see model_token_ids)")
        if max_resamples < 0:
            raise ValueError(f"max_resamples={max_resamples} is invalid: expected >= 0")
        self.image_token_id = image_token_id
        self.stop_token_ids = tuple(stop_token_ids)
        self.suppress_token_ids = frozenset(suppress_token_ids) | frozenset(
            [image_token_id] if image_token_id is not None else []
        )
        self.max_resamples = max_resamples
        self.bucket_bytes = bucket_bytes
        self.name_mapper = name_mapper
        self.prefill_groups = prefill_groups
        self.last_stats: GenerateStats | None = None
        self._released: set[str] = set()

    # Transport, one method per SGLang call.
    @abstractmethod
    def _generate(self, request: dict[str, Any]) -> Any: ...

    @abstractmethod
    def _encode_image(self, image: Any) -> Any: ...

    @abstractmethod
    def _update_weights_from_tensor(self, bucket: list[NamedTensor], flush_cache: bool) -> None: ...

    @abstractmethod
    def _set_memory(self, tags: list[str], *, occupied: bool) -> None: ...

    @abstractmethod
    def flush_cache(self) -> None: ...

    # The protocol.
    def generate(
        self,
        prompts: Sequence[Prompt],
        n: int,
        sampling: SamplingParams,
        seeds: Sequence[Sequence[int]],
    ) -> list[list[Completion]]:
        check_generate_args(prompts, n, seeds)
        if self._released:
            raise SGLangError(
                f"generate called while SGLang's {sorted(self._released)} memory is released; "
                "call update_weights() or resume_memory() first"
            )
        start = time.perf_counter()
        if not prompts:
            self.last_stats = GenerateStats(0, 0, 0, 0, 0, 0.0)
            return []
        warm, samples = self._requests(prompts, n, sampling, seeds, prefill_groups=self.prefill_groups)
        if warm is not None:
            self._generate(warm)
        groups, prompt_tokens, cached_tokens = parse_generate_outputs(self._generate(samples), len(prompts), n)
        self._redraw_suppressed(prompts, groups, sampling, seeds)
        self.last_stats = GenerateStats(  # of the samples as delivered: redraws are uncounted, like the cut tokens
            prompts=len(prompts),
            samples=len(prompts) * n,
            prompt_tokens=prompt_tokens,
            cached_prompt_tokens=cached_tokens,
            completion_tokens=sum(len(c.token_ids) for group in groups for c in group),
            seconds=time.perf_counter() - start,
        )
        return groups

    def _requests(
        self,
        prompts: Sequence[Prompt],
        n: int,
        sampling: SamplingParams,
        seeds: Sequence[Sequence[int]],
        *,
        prefill_groups: bool,
        max_new_tokens: Sequence[int] | None = None,
    ) -> tuple[dict[str, Any] | None, dict[str, Any]]:
        return generate_requests(
            prompts,
            n,
            sampling,
            seeds,
            image_token_id=self.image_token_id,
            stop_token_ids=self.stop_token_ids,
            encode_image=self._encode_image,
            prefill_groups=prefill_groups,
            max_new_tokens=max_new_tokens,
        )

    def _first_suppressed(self, token_ids: Sequence[int]) -> int | None:
        return next((k for k, token in enumerate(token_ids) if token in self.suppress_token_ids), None)

    def _redraw_suppressed(
        self,
        prompts: Sequence[Prompt],
        groups: list[list[Completion]],
        sampling: SamplingParams,
        seeds: Sequence[Sequence[int]],
    ) -> None:
        """Replace, in ``groups``, every sample that holds a suppressed token.

        The sample keeps its tokens before the first suppressed one and continues from there with a fresh seed
        (``resample_seed``): token-level rejection, so the allowed tokens keep their relative odds. After
        ``max_resamples`` redraws that still draw one, the sample ends before it ("length"); under greedy sampling
        a new seed would draw the same token, so it ends there at once.
        SGLang's ``logit_bias`` and ``custom_logit_processor`` would suppress inside the sampler, but both act on
        the logits from which SGLang then computes the returned log-probs, renormalising them over the allowed
        tokens; a redraw from the unchanged distribution keeps every log-prob the full-vocabulary one that the
        learner recomputes (the HF engine reports those too).
        """
        pending = [
            (i, j)
            for i, group in enumerate(groups)
            for j, completion in enumerate(group)
            if self._first_suppressed(completion.token_ids) is not None
        ]
        for attempt in range(1, (self.max_resamples if sampling.temperature > 0 else 0) + 1):
            if not pending:
                break
            heads = [_cut(groups[i][j], self._first_suppressed(groups[i][j].token_ids)) for i, j in pending]
            resumed = [
                Prompt(prompts[i].uid, list(prompts[i].input_ids) + head.token_ids, prompts[i].images)
                for (i, _), head in zip(pending, heads)
            ]
            _, request = self._requests(
                resumed,
                1,
                sampling,
                [[resample_seed(seeds[i][j], attempt)] for i, j in pending],
                prefill_groups=False,
                max_new_tokens=[sampling.max_new_tokens - len(head.token_ids) for head in heads],
            )
            tails, _, _ = parse_generate_outputs(self._generate(request), len(resumed), 1)
            still = []
            for (i, j), head, (tail,) in zip(pending, heads, tails):
                groups[i][j] = Completion(
                    head.token_ids + tail.token_ids, head.logprobs + tail.logprobs, tail.finish_reason
                )
                if self._first_suppressed(tail.token_ids) is not None:
                    still.append((i, j))
            pending = still
        for i, j in pending:
            groups[i][j] = _cut(groups[i][j], self._first_suppressed(groups[i][j].token_ids))

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> SyncStats:
        """Send the weights in buckets (names mapped to SGLang's); the last bucket flushes the prefix cache."""
        start = time.perf_counter()
        self._resume([WEIGHTS])
        mapped = ((self.name_mapper(name), tensor.detach()) for name, tensor in named_tensors)
        buckets = buckets_of(mapped, self.bucket_bytes)
        sent_bytes = sent_buckets = 0
        bucket = next(buckets, None)
        while bucket is not None:
            following = next(buckets, None)  # a bucket of lookahead tells which is the last (two held at once)
            self._update_weights_from_tensor(bucket, flush_cache=following is None)
            sent_bytes += sum(tensor_bytes(tensor) for _, tensor in bucket)
            sent_buckets += 1
            bucket = following
        if sent_buckets == 0:
            self.flush_cache()
        self._resume([KV_CACHE, CUDA_GRAPH])
        return SyncStats(bytes=sent_bytes, buckets=sent_buckets, seconds=time.perf_counter() - start)

    def release_memory(self) -> None:
        """Free the KV cache, weights and CUDA graphs (call only with no generate in flight)."""
        tags = [tag for tag in (KV_CACHE, WEIGHTS, CUDA_GRAPH) if tag not in self._released]
        if tags:
            self._set_memory(tags, occupied=False)
            self._released.update(tags)

    def resume_memory(self) -> None:
        """Take back released memory, weights before the KV cache."""
        self._resume([WEIGHTS])
        self._resume([KV_CACHE, CUDA_GRAPH])

    def _resume(self, tags: list[str]) -> None:
        pending = [tag for tag in tags if tag in self._released]
        if pending:
            self._set_memory(pending, occupied=True)
            self._released.difference_update(pending)


@dataclass
class SGLangLaunchArgs:
    """How to start an in-process ``sglang.Engine`` beside the learner."""

    model_path: str
    tp_size: int = 1
    dtype: str = "bfloat16"
    # Share of GPU memory for SGLang's weights and KV cache; the colocated learner uses the rest.
    mem_fraction_static: float = 0.4
    # Lets release_memory/resume_memory hand the GPU memory to the learner and back.
    enable_memory_saver: bool = True
    random_seed: int = 0
    # With it, a request's sampling_seed fixes its sample exactly (batch-invariant kernels, slower).
    enable_deterministic_inference: bool = False
    # Any other sglang ServerArgs field, passed through unchanged.
    extra_args: dict[str, Any] = field(default_factory=dict)

    def engine_kwargs(self) -> dict[str, Any]:
        kwargs = dict(
            model_path=self.model_path,
            tp_size=self.tp_size,
            dtype=self.dtype,
            mem_fraction_static=self.mem_fraction_static,
            enable_memory_saver=self.enable_memory_saver,
            random_seed=self.random_seed,
        )
        if self.enable_deterministic_inference:
            kwargs["enable_deterministic_inference"] = True
        return {**kwargs, **self.extra_args}


class SGLangEngine(SGLangEngineBase):
    """An in-process ``sglang.Engine`` (same process as the learner, weights shared by CUDA IPC)."""

    def __init__(self, engine: Any, **kwargs: Any):
        super().__init__(**kwargs)
        self.engine = engine

    @classmethod
    def launch(cls, args: SGLangLaunchArgs, **kwargs: Any) -> "SGLangEngine":
        """Start ``sglang.Engine`` for ``args.model_path``; ``kwargs`` go to the wrapper (bucket_bytes, ...).

        The image, stop and suppressed token ids are read from the model folder unless stop_token_ids is given.
        """
        try:
            import sglang
        except ImportError as error:
            raise ImportError(
                "the SGLang rollout engine needs the sglang package (CUDA only): pip install 'ekipl[sglang]', "
                "or use the HF engine"
            ) from error
        if "stop_token_ids" not in kwargs:
            kwargs = {**model_token_ids(args.model_path), **kwargs}
        return cls(sglang.Engine(**args.engine_kwargs()), **kwargs)

    def _generate(self, request: dict[str, Any]) -> Any:
        return self.engine.generate(**request)

    def _encode_image(self, image: Any) -> Any:
        return image  # the Engine takes PIL images as they are

    def _update_weights_from_tensor(self, bucket: list[NamedTensor], flush_cache: bool) -> None:
        result = self.engine.update_weights_from_tensor(named_tensors=bucket, load_format=None, flush_cache=flush_cache)
        _check_success(result, "update_weights_from_tensor")

    def _set_memory(self, tags: list[str], *, occupied: bool) -> None:
        if occupied:
            self.engine.resume_memory_occupation(tags=tags)
        else:
            self.engine.release_memory_occupation(tags=tags)

    def flush_cache(self) -> None:
        self.engine.flush_cache()

    def shutdown(self) -> None:
        self.engine.shutdown()


def _sglang_tensor_serializer(bucket: list[NamedTensor]) -> str:
    from sglang.srt.utils import MultiprocessingSerializer

    return MultiprocessingSerializer.serialize(bucket, output_str=True)


class SGLangHTTPEngine(SGLangEngineBase):
    """A client of a running ``python -m sglang.launch_server``.

    Connection errors and 5xx answers are retried ``max_retries`` times with exponential backoff
    (``backoff_s``, doubled each time); a reply slower than ``timeout_s`` raises :class:`SGLangTimeoutError`
    without a retry (the server may still be working on it); 4xx answers and replies that are not SGLang's
    format raise :class:`SGLangResponseError`. All errors derive from :class:`SGLangError`.
    """

    def __init__(
        self,
        base_url: str,
        *,
        timeout_s: float = 900.0,
        connect_timeout_s: float = 10.0,
        max_retries: int = 3,
        backoff_s: float = 1.0,
        tp_size: int = 1,
        serializer: Callable[[list[NamedTensor]], str] = _sglang_tensor_serializer,
        **kwargs: Any,
    ):
        super().__init__(**kwargs)
        self.base_url = base_url.rstrip("/")
        self.timeout_s = timeout_s
        self.connect_timeout_s = connect_timeout_s
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.tp_size = tp_size
        self.serializer = serializer
        self.session = requests.Session()

    @classmethod
    def for_model(cls, base_url: str, model_path: str | Path, **kwargs: Any) -> "SGLangHTTPEngine":
        """A client whose image, stop and suppressed ids are read from the served model's local folder."""
        return cls(base_url, **{**model_token_ids(model_path), **kwargs})

    def _post(self, endpoint: str, body: dict[str, Any] | None = None) -> requests.Response:
        url = f"{self.base_url}{endpoint}"
        failure = ""
        for attempt in range(self.max_retries + 1):
            if attempt:
                time.sleep(self.backoff_s * 2 ** (attempt - 1))
            try:
                response = self.session.post(url, json=body, timeout=(self.connect_timeout_s, self.timeout_s))
            except requests.exceptions.ConnectionError as error:  # refused, reset, or connect timeout
                failure = f"connection failed ({error.__class__.__name__}: {error})"
                continue
            except requests.exceptions.Timeout as error:
                raise SGLangTimeoutError(
                    f"{url} did not answer within timeout_s={self.timeout_s}s; raise timeout_s for long generations"
                ) from error
            if response.status_code >= 500:
                failure = f"HTTP {response.status_code}: {response.text[:300]}"
                continue
            if response.status_code >= 400:
                raise SGLangResponseError(
                    f"{url} refused the request: HTTP {response.status_code}: {response.text[:300]}"
                )
            return response
        if failure.startswith("connection"):
            raise SGLangUnavailableError(
                f"no SGLang server answered at {self.base_url} after {self.max_retries + 1} tries: {failure}. "
                "Start one with `python -m sglang.launch_server --model-path MODEL --port PORT` or fix the URL."
            )
        raise SGLangResponseError(f"{url} failed {self.max_retries + 1} times, last with {failure}")

    def _post_json(self, endpoint: str, body: dict[str, Any]) -> Any:
        response = self._post(endpoint, body)
        try:
            return response.json()
        except ValueError as error:
            raise SGLangResponseError(
                f"{self.base_url}{endpoint} answered with something that is not JSON: {response.text[:300]!r}"
            ) from error

    def _generate(self, request: dict[str, Any]) -> Any:
        return self._post_json("/generate", request)

    def _encode_image(self, image: Any) -> Any:
        return image_to_data_url(image)

    def _update_weights_from_tensor(self, bucket: list[NamedTensor], flush_cache: bool) -> None:
        payload = self.serializer(bucket)
        body = {"serialized_named_tensors": [payload] * self.tp_size, "load_format": None, "flush_cache": flush_cache}
        _check_success(self._post_json("/update_weights_from_tensor", body), "update_weights_from_tensor")

    def _set_memory(self, tags: list[str], *, occupied: bool) -> None:
        self._post("/resume_memory_occupation" if occupied else "/release_memory_occupation", {"tags": tags})

    def flush_cache(self) -> None:
        self._post("/flush_cache")

    def shutdown(self) -> None:
        """Close the connection pool; the server belongs to whoever started it."""
        self.session.close()


def make_sglang_engine(rollout: Any, *, model_path: str | Path, processor: Any) -> SGLangEngineBase:
    """The policy's SGLang engine from the trainer's rollout config.

    ``rollout.engine``: ``"sglang"`` launches an in-process engine (``mem_fraction_static``), ``"sglang-http"``
    connects to the server at ``rollout.url``; both sync weights in buckets of ``rollout.bucket_mb`` MB.
    """
    common = dict(
        **model_token_ids(model_path, getattr(processor, "tokenizer", processor)),
        bucket_bytes=rollout.bucket_mb * 1024 * 1024,
    )
    if rollout.engine == "sglang-http":
        return SGLangHTTPEngine(rollout.url, **common)
    if rollout.engine == "sglang":
        launch = SGLangLaunchArgs(model_path=str(model_path), mem_fraction_static=rollout.mem_fraction_static)
        return SGLangEngine.launch(launch, **common)
    raise ValueError(f"rollout.engine={rollout.engine!r} is not an SGLang engine: expected 'sglang' or 'sglang-http'")
