"""SGLang's ``generate`` request and response format, shared by the in-process and the HTTP engine.

A group of ``n`` samples is sent as ``n`` adjacent requests with the same prompt and distinct
``sampling_seed``s; SGLang's own ``n`` would give every copy the same sampling parameters, hence the same
seed. So that the radix cache prefills each prompt once, the unique prompts go first with
``max_new_tokens=0`` (what SGLang itself does for ``n > 1``), and the samples then find them cached.

Prompts carry their image placeholders expanded (one ``<|image_pad|>`` per image token, as the HF model needs
them); SGLang expands placeholders itself from the image it is given, so each run is collapsed to one.
"""

from __future__ import annotations

import base64
import hashlib
import io
from typing import Any, Callable, Sequence

from ekipl.data import Prompt
from ekipl.rollout.base import Completion, SamplingParams

# Memory tags of ``release_memory_occupation`` / ``resume_memory_occupation`` (``sglang.srt.constants``).
KV_CACHE = "kv_cache"
WEIGHTS = "weights"
CUDA_GRAPH = "cuda_graph"


class SGLangError(RuntimeError):
    """An SGLang engine or server failed a request."""


class SGLangUnavailableError(SGLangError):
    """No SGLang server answered."""


class SGLangTimeoutError(SGLangError):
    """The server accepted the request but did not answer in time."""


class SGLangResponseError(SGLangError):
    """The server answered with an error or with something that is not SGLang's response format."""


def collapse_image_placeholders(input_ids: Sequence[int], image_token_id: int | None) -> list[int]:
    """Replace each run of ``image_token_id`` with a single one (SGLang re-expands it from the image)."""
    collapsed: list[int] = []
    for token in input_ids:
        if token == image_token_id and collapsed and collapsed[-1] == image_token_id:
            continue
        collapsed.append(int(token))
    return collapsed


def image_to_data_url(image: Any) -> str:
    """A PIL image as a PNG ``data:`` URL (SGLang's ``image_data`` accepts those); strings pass unchanged."""
    if isinstance(image, str):
        return image
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def sampling_params_dict(
    sampling: SamplingParams, stop_token_ids: Sequence[int], seed: int, max_new_tokens: int | None = None
) -> dict[str, Any]:
    return {
        "temperature": sampling.temperature,
        "top_p": sampling.top_p,
        "top_k": sampling.top_k if sampling.top_k > 0 else -1,  # SGLang disables top-k with -1
        "max_new_tokens": sampling.max_new_tokens if max_new_tokens is None else max_new_tokens,
        "stop_token_ids": list(stop_token_ids),
        "sampling_seed": int(seed),
        "no_stop_trim": True,  # keep the stop token: the learner trains on it
        "skip_special_tokens": False,
    }


def resample_seed(seed: int, attempt: int) -> int:
    """The 31-bit seed of the ``attempt``-th redraw of the sample seeded ``seed``.

    SGLang's seeded sampling draws each position from (seed, position), so the original seed would only draw the
    same token again.
    """
    digest = hashlib.blake2b(f"{seed}:resample:{attempt}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFFFFFF


def generate_requests(
    prompts: Sequence[Prompt],
    n: int,
    sampling: SamplingParams,
    seeds: Sequence[Sequence[int]],
    *,
    image_token_id: int | None,
    stop_token_ids: Sequence[int],
    encode_image: Callable[[Any], Any],
    prefill_groups: bool,
    max_new_tokens: Sequence[int] | None = None,
) -> tuple[dict[str, Any] | None, dict[str, Any]]:
    """The (optional) prefix-warming request and the sampling request, as ``Engine.generate`` keyword args.

    The sampling request holds ``len(prompts) * n`` requests, sample ``j`` of prompt ``i`` at ``i * n + j``.
    ``max_new_tokens[i]``, if given, replaces ``sampling.max_new_tokens`` for prompt ``i``.
    """
    budgets = list(max_new_tokens) if max_new_tokens is not None else [sampling.max_new_tokens] * len(prompts)
    if len(budgets) != len(prompts):
        raise ValueError(f"max_new_tokens has {len(budgets)} entries for {len(prompts)} prompts")
    input_ids = [collapse_image_placeholders(p.input_ids, image_token_id) for p in prompts]
    has_images = any(p.images for p in prompts)
    images = [[encode_image(image) for image in p.images] or None for p in prompts]

    def request(rows: list[int], sampling_params: list[dict[str, Any]]) -> dict[str, Any]:
        body: dict[str, Any] = {
            "input_ids": [input_ids[i] for i in rows],
            "sampling_params": sampling_params,
            "return_logprob": True,
        }
        if has_images:
            body["image_data"] = [images[i] for i in rows]
        return body

    rows = [i for i in range(len(prompts)) for _ in range(n)]
    samples = request(
        rows,
        [
            sampling_params_dict(sampling, stop_token_ids, seed, budgets[i])
            for i, group in enumerate(seeds)
            for seed in group
        ],
    )
    if not prefill_groups or n == 1:
        return None, samples
    warm = request(
        list(range(len(prompts))),
        [sampling_params_dict(sampling, stop_token_ids, group[0], max_new_tokens=0) for group in seeds],
    )
    return warm, samples


def parse_completion(output: Any) -> tuple[Completion, int, int]:
    """One ``generate`` output dict as a Completion, with its prompt-token and cached-token counts."""
    try:
        meta = output["meta_info"]
        finish = meta["finish_reason"]
        kind = finish["type"] if isinstance(finish, dict) else str(finish)
        triples = meta["output_token_logprobs"]
        token_ids = [int(triple[1]) for triple in triples]
        logprobs = [float(triple[0]) for triple in triples]
        prompt_tokens, cached_tokens = int(meta["prompt_tokens"]), int(meta.get("cached_tokens", 0))
    except (KeyError, TypeError, IndexError, ValueError) as error:
        raise SGLangResponseError(
            f"an SGLang generate output lacks {error!r} (expected meta_info with finish_reason, "
            f"prompt_tokens and output_token_logprobs from return_logprob=True); got {str(output)[:300]}"
        ) from error
    if kind == "abort":
        raise SGLangResponseError(f"SGLang aborted a request: {finish}")
    return Completion(token_ids, logprobs, "stop" if kind == "stop" else "length"), prompt_tokens, cached_tokens


def parse_generate_outputs(outputs: Any, n_prompts: int, n: int) -> tuple[list[list[Completion]], int, int]:
    """Group the ``n_prompts * n`` outputs by prompt; also return total prompt tokens and cached tokens."""
    if isinstance(outputs, dict):  # a batch of one comes back as a bare dict
        outputs = [outputs]
    if not isinstance(outputs, list) or len(outputs) != n_prompts * n:
        got = len(outputs) if isinstance(outputs, list) else type(outputs).__name__
        raise SGLangResponseError(f"expected {n_prompts * n} generate outputs, got {got}")
    parsed = [parse_completion(output) for output in outputs]
    completions = [completion for completion, _, _ in parsed]
    groups = [completions[i * n : (i + 1) * n] for i in range(n_prompts)]
    return groups, sum(p for _, p, _ in parsed), sum(c for _, _, c in parsed)
