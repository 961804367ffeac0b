"""Weight sync to a rollout engine: tensors grouped into buckets, names mapped to the engine's.

Sending one tensor per call is the classic slowness of colocated RL (hundreds of round trips, each with its
own serialisation and lock); sending the whole model in one call needs a second copy of it in memory.
Buckets of a few hundred MB sit between the two.
"""

from __future__ import annotations

from typing import Iterable, Iterator

import torch

DEFAULT_BUCKET_BYTES = 512 * 1024 * 1024

# transformers (5.x) nests a VLM's language model and vision tower under ``model.``; SGLang's Qwen2-VL and
# Qwen2.5-VL classes load the checkpoint layout, where they sit at ``model.`` and ``visual.``.
TRANSFORMERS_TO_SGLANG_PREFIXES = (
    ("model.language_model.", "model."),
    ("model.visual.", "visual."),
)

NamedTensor = tuple[str, torch.Tensor]


def transformers_to_sglang_name(name: str) -> str:
    """Map a transformers parameter name to the one SGLang's model loader expects (others pass unchanged)."""
    for source, target in TRANSFORMERS_TO_SGLANG_PREFIXES:
        if name.startswith(source):
            return target + name[len(source) :]
    return name


def tensor_bytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def buckets_of(named_tensors: Iterable[NamedTensor], bucket_bytes: int) -> Iterator[list[NamedTensor]]:
    """Group consecutive tensors into buckets of at most ``bucket_bytes`` (a larger tensor goes alone).

    The input is consumed lazily, so a caller that gathers sharded parameters one by one holds at most one
    bucket of them at a time.
    """
    if bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes must be positive, got {bucket_bytes}")
    bucket: list[NamedTensor] = []
    filled = 0
    for name, tensor in named_tensors:
        size = tensor_bytes(tensor)
        if bucket and filled + size > bucket_bytes:
            yield bucket
            bucket, filled = [], 0
        bucket.append((name, tensor))
        filled += size
    if bucket:
        yield bucket
