"""Prompts as the benchmark builds them, encoded through a Qwen-VL processor into :class:`Prompt` objects.

Reason-RFT uses no system prompt: the user turn holds the image(s), then the question followed by the
instruction of the task family (PEERS.md, "The benchmark").
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from PIL import Image

from ekipl.data.records import BadRecordError, BadRow, LoadedDataset, Record
from ekipl.data.tasks import COUNTING, SPATIAL, STRUCTURE, is_choice_answer, task_family


@dataclass
class Prompt:
    """One chat-templated prompt, ready for generation.

    ``input_ids`` already hold the expanded image placeholder tokens, so that ``mm_inputs`` (the
    processor's ``pixel_values``, ``image_grid_thw``, ...) line up with them for an HF forward pass;
    ``images`` keeps the PIL images for engines that take raw images (SGLang's ``image_data``).
    """

    uid: str
    input_ids: list[int]
    images: list[Any] = field(default_factory=list)
    mm_inputs: dict[str, torch.Tensor] = field(default_factory=dict)


logger = logging.getLogger(__name__)

TAGS = "Output the thinking process in <think> </think> and final answer ({what}) in <answer> </answer> tags."

COUNTING_INSTRUCTION = "{question} " + TAGS.format(what="number")
CHOICE_INSTRUCTION = "{question} " + TAGS.format(what="the letter A, B, C or D of the correct choice")
NON_CHOICE_INSTRUCTION = "{question} " + TAGS.format(what="float number or int number")

# The functions a TRANCE answer may call and the values each accepts.
TRANCE_FUNCTIONS: dict[str, tuple[str, ...]] = {
    "change_size": ("small", "medium", "large"),
    "change_color": ("yellow", "gray", "cyan", "blue", "brown", "green", "red", "purple"),
    "change_material": ("glass", "metal", "rubber"),
    "change_shape": ("cube", "sphere", "cylinder"),
    "change_position": (
        "front", "behind", "left", "right", "front_left", "front_right", "behind_left", "behind_right",
    ),
}


def _trance_instruction() -> str:
    function_lines = "\n".join(
        f"{number}. {name}(object_id, value), value one of {list(values)}"
        for number, (name, values) in enumerate(TRANCE_FUNCTIONS.items(), start=1)
    )
    return (
        "This is a spatial transformation task. The first image shows a scene in its initial state and the "
        "second image the same scene in its final state. The question lists the initial objects as tuples "
        "('object_id', 'shape', 'size', 'color', 'material').\n\n"
        "Find the transformation that turns the initial state into the final state: a sequence of 1 to 4 "
        "function calls, each written as func(object_id, value), from these functions:\n\n"
        f"{function_lines}\n\n"
        "A position value moves the object relative to its initial location and facing: front and behind "
        "along its direction, left and right across it, and the four combined values diagonally.\n\n"
        "{question} " + TAGS.format(what="the sequence of functions only")
    )


TRANCE_INSTRUCTION = _trance_instruction()

# Processor outputs that run along the prompt's tokens rather than its images: they would not cover a completion,
# and consumers derive them from the ids (``ekipl.models`` does for Qwen-VL's mm_token_type_ids).
_PER_TOKEN_OUTPUTS = ("input_ids", "attention_mask", "mm_token_type_ids", "token_type_ids")

# Reason-RFT's GeoMath training rows already end with their instruction; never append a second one.
_INSTRUCTION_MARK = "<answer> </answer> tags"


def prompt_text(record: Record) -> str:
    """The text of the user turn: the question followed by the instruction of the record's task family."""
    family = task_family(record.task)
    if family == STRUCTURE and _INSTRUCTION_MARK in record.problem:
        return record.problem
    if family == COUNTING:
        template = COUNTING_INSTRUCTION
    elif family == STRUCTURE:
        template = CHOICE_INSTRUCTION if is_choice_answer(record.gold_answer) else NON_CHOICE_INSTRUCTION
    elif family == SPATIAL:
        template = TRANCE_INSTRUCTION
    else:
        raise AssertionError(f"no instruction for family {family!r}")
    return template.replace("{question}", record.problem)


def build_messages(record: Record) -> list[dict[str, Any]]:
    """The chat: one user turn with an image placeholder per image, then the prompt text."""
    content: list[dict[str, Any]] = [{"type": "image"} for _ in record.images]
    content.append({"type": "text", "text": prompt_text(record)})
    return [{"role": "user", "content": content}]


def fit_image_size(height: int, width: int, *, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """The (height, width) nearest the image's aspect ratio with both sides multiples of ``factor`` and
    ``min_pixels <= height * width <= max_pixels`` (given ``max_pixels >= max(min_pixels, factor**2)``)."""
    if min(height, width) < 1:
        raise ValueError(f"image of size {width}x{height} has no pixels")
    new_height = max(factor, round(height / factor) * factor)
    new_width = max(factor, round(width / factor) * factor)
    if new_height * new_width > max_pixels:
        # At least 1: an image within max_pixels that rounding pushed over it is floored to the grid, not enlarged.
        scale = max(1.0, math.sqrt(height * width / max_pixels))
        new_height = max(factor, math.floor(height / scale / factor) * factor)
        new_width = max(factor, math.floor(width / scale / factor) * factor)
        # A very thin image has its short side held at one factor; then shrink the long side to fit.
        if new_height * new_width > max_pixels:
            if new_height == factor:
                new_width = max(factor, max_pixels // (factor * factor) * factor)
            else:
                new_height = max(factor, max_pixels // (factor * factor) * factor)
    elif new_height * new_width < min_pixels:
        scale = math.sqrt(min_pixels / (height * width))
        new_height = math.ceil(height * scale / factor) * factor
        new_width = math.ceil(width * scale / factor) * factor
    return new_height, new_width


def load_image(path: str, *, factor: int, min_pixels: int, max_pixels: int) -> Image.Image:
    """Decode an image as RGB, resized so the processor leaves it unchanged and its token count is known."""
    with Image.open(path) as image:
        image = image.convert("RGB")
    height, width = fit_image_size(
        image.height, image.width, factor=factor, min_pixels=min_pixels, max_pixels=max_pixels
    )
    if (height, width) != (image.height, image.width):
        image = image.resize((width, height), Image.Resampling.BICUBIC)
    return image


def encode_prompt(processor, record: Record, *, max_pixels: int, max_prompt_len: int) -> Prompt:
    """Chat-template ``record`` and run ``processor`` (a Qwen2-VL / Qwen2.5-VL processor) on it.

    Images are resized to at most ``max_pixels`` pixels (and no more than the image processor's own cap),
    sides multiples of the vision patch × merge size, so ``Prompt.images`` are exactly the pixels behind the
    image tokens. A prompt longer than ``max_prompt_len`` tokens, or an image that fails to decode, raises
    :class:`BadRecordError` naming the record's row (a long prompt is never cut: that would cut image tokens);
    :func:`check_prompt_lengths` finds the long prompts of a dataset before training.
    """
    factor, min_pixels, max_pixels = _image_bounds(processor, max_pixels)
    try:
        images = [
            load_image(path, factor=factor, min_pixels=min_pixels, max_pixels=max_pixels) for path in record.images
        ]
    except (OSError, SyntaxError, ValueError) as error:
        raise BadRecordError(f"{record.source or record.id}: cannot decode an image ({error})") from error

    text = processor.apply_chat_template(build_messages(record), tokenize=False, add_generation_prompt=True)
    encoded = processor(
        # the pixel bounds as ``size`` (min/max_pixels in the call are deprecated and warn on every prompt)
        text=[text], images=images, size={"shortest_edge": min_pixels, "longest_edge": max_pixels}, return_tensors="pt"
    )
    input_ids = encoded["input_ids"][0].tolist()
    if len(input_ids) > max_prompt_len:
        raise _too_long(record, len(input_ids), input_ids.count(processor.image_token_id), max_prompt_len)
    mm_inputs = {name: value for name, value in encoded.items() if name not in _PER_TOKEN_OUTPUTS}
    return Prompt(uid=record.id, input_ids=input_ids, images=images, mm_inputs=mm_inputs)


def prompt_lengths(processor, records: Sequence[Record], *, max_pixels: int) -> list[int]:
    """The number of tokens :func:`encode_prompt` gives each record, without decoding any image.

    An image's token count follows from its size, which is read from the file's header, so this is cheap
    enough to run over a whole dataset before training. An image that cannot be opened raises
    :class:`BadRecordError` naming the record's row.
    """
    bounds = _image_bounds(processor, max_pixels)
    return _count_tokens(processor, [_prompt_parts(processor, record, bounds) for record in records])


def check_prompt_lengths(
    processor, records: Sequence[Record], *, max_pixels: int, max_prompt_len: int, skip_bad_rows: bool = False
) -> LoadedDataset:
    """The records whose prompts fit in ``max_prompt_len`` tokens, checked before training.

    A record whose prompt is longer (see :func:`prompt_lengths`), or whose image can no longer be opened,
    raises :class:`BadRecordError` naming its row; with ``skip_bad_rows=True`` it is skipped, counted in
    :attr:`LoadedDataset.skipped` and reported in the log. Raises if records were given and none is left.
    """
    bounds = _image_bounds(processor, max_pixels)
    skipped: list[BadRow] = []
    measured, parts = [], []
    for record in records:
        try:
            parts.append(_prompt_parts(processor, record, bounds))
        except BadRecordError as error:
            if not skip_bad_rows:
                raise
            skipped.append(BadRow(record.source, str(error)))
            continue
        measured.append(record)
    kept = []
    for record, (_, image_tokens, _), length in zip(measured, parts, _count_tokens(processor, parts)):
        if length <= max_prompt_len:
            kept.append(record)
            continue
        error = _too_long(record, length, image_tokens, max_prompt_len)
        if not skip_bad_rows:
            raise error
        skipped.append(BadRow(record.source, str(error)))
    if skipped:
        logger.warning("skipped %d record(s) of %d; first: %s", len(skipped), len(records), skipped[0].reason)
    if records and not kept:
        raise BadRecordError(
            f"no record fits in max_prompt_len={max_prompt_len} tokens with max_pixels={max_pixels} "
            f"(skipped {len(skipped)}); first: {skipped[0].reason}"
        )
    return LoadedDataset(kept, skipped)


def _image_bounds(processor, max_pixels: int) -> tuple[int, int, int]:
    """(side factor, min pixels, max pixels) of the images :func:`encode_prompt` feeds ``processor``."""
    image_processor = processor.image_processor
    factor = image_processor.patch_size * image_processor.merge_size
    min_pixels = image_processor.size["shortest_edge"]
    max_pixels = min(max_pixels, image_processor.size["longest_edge"])
    if max_pixels < max(min_pixels, factor * factor):
        raise ValueError(f"max_pixels={max_pixels} is below the processor's minimum image size ({min_pixels} pixels)")
    return factor, min_pixels, max_pixels


def _prompt_parts(processor, record: Record, bounds: tuple[int, int, int]) -> tuple[str, int, int]:
    """(chat-templated text, image tokens, images) of ``record``: the text holds one image token per image,
    which the processor expands to that image's tokens, one per ``factor x factor`` block of its resized pixels."""
    factor, min_pixels, max_pixels = bounds
    image_tokens = 0
    for path in record.images:
        try:
            with Image.open(path) as image:  # reads the header only
                width, height = image.size
        except (OSError, SyntaxError, ValueError) as error:
            raise BadRecordError(f"{record.source or record.id}: cannot open image {path} ({error})") from error
        height, width = fit_image_size(height, width, factor=factor, min_pixels=min_pixels, max_pixels=max_pixels)
        image_tokens += (height // factor) * (width // factor)
    text = processor.apply_chat_template(build_messages(record), tokenize=False, add_generation_prompt=True)
    return text, image_tokens, len(record.images)


def _count_tokens(processor, parts: list[tuple[str, int, int]]) -> list[int]:
    if not parts:
        return []
    text_ids = processor.tokenizer([text for text, _, _ in parts])["input_ids"]
    return [len(ids) - images + image_tokens for ids, (_, image_tokens, images) in zip(text_ids, parts)]


def _too_long(record: Record, length: int, image_tokens: int, max_prompt_len: int) -> BadRecordError:
    return BadRecordError(
        f"{record.source or record.id}: the prompt of record {record.id!r} has {length} tokens ({image_tokens} of "
        f"them image tokens), over max_prompt_len={max_prompt_len}; it is never truncated (that would cut image "
        "tokens): raise data.max_prompt_len (eval: --max-prompt-len) or shrink the images with data.max_pixels "
        "(eval: --max-pixels), or skip such records with data.skip_bad_rows=true"
    )


def decode_completion(tokenizer, token_ids: list[int]) -> str:
    """The text of a sampled completion, without the stop token(s) that end it.

    Other special tokens are kept: a model may have ``<think>`` or ``<answer>`` as special tokens, and the
    rewards must see them.
    """
    stop_tokens = {"<|im_end|>", "<|endoftext|>"} & set(tokenizer.all_special_tokens)
    stop_ids = {tokenizer.eos_token_id, tokenizer.pad_token_id, *tokenizer.convert_tokens_to_ids(sorted(stop_tokens))}
    ids = list(token_ids)
    while ids and ids[-1] in stop_ids:
        ids.pop()
    return tokenizer.decode(ids, skip_special_tokens=False)
