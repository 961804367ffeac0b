"""Chat prompts with random images, built with a model folder's own processor."""

from __future__ import annotations

import numpy as np
from PIL import Image

from ekipl.data import Prompt

QUESTIONS = (
    "How many red cubes are there?",
    "Subtract all large spheres. How many objects are left?",
    "What is the size of the gray cylinder?",
    "Find the angle x.",
)


def random_image(rng: np.random.Generator, height: int, width: int) -> Image.Image:
    return Image.fromarray(rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8))


def chat_prompt(processor, uid: str, question: str, images: list[Image.Image]) -> Prompt:
    """A user turn with ``images`` then ``question``, templated and processed (image placeholders expanded)."""
    content = [{"type": "image"} for _ in images] + [{"type": "text", "text": question}]
    text = processor.apply_chat_template(
        [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
    )
    encoded = processor(text=[text], images=images or None, return_tensors="pt")
    mm_inputs = {key: encoded[key] for key in ("pixel_values", "image_grid_thw") if key in encoded}
    return Prompt(uid=uid, input_ids=encoded["input_ids"][0].tolist(), images=list(images), mm_inputs=mm_inputs)


def image_prompts(processor, count: int, *, seed: int) -> list[Prompt]:
    """``count`` prompts of different lengths, each with one random image of a random size."""
    rng = np.random.default_rng(seed)
    prompts = []
    for index in range(count):
        height, width = (int(side) for side in rng.integers(40, 150, size=2))
        question = QUESTIONS[index % len(QUESTIONS)] + " " * int(rng.integers(0, 3))
        prompts.append(chat_prompt(processor, f"p{index}", question, [random_image(rng, height, width)]))
    return prompts
