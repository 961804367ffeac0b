"""Training sequences and a Learner on the tiny model, for the learner's tests (in-process and per rank)."""

from __future__ import annotations

import numpy as np

from ekipl.config import read_deepspeed_config
from ekipl.distributed import join_process_group  # noqa: F401  (re-exported for the tests)
from ekipl.packing import TrainSequence
from fakes.prompts import image_prompts

ANSWERS = (
    "<think>I count the objects one by one: there are 3 of them.</think> <answer>3</answer>",
    "<think>Subtract the spheres, then count the rest.</think> <answer>5</answer>",
    "<answer>B</answer>",
    "<think>The gray cylinder is large.</think> <answer>large</answer>",
)


def make_sequences(processor, count: int, *, seed: int, expert_every: int = 3) -> list[TrainSequence]:
    """``count`` sequences of different lengths; every ``expert_every``-th is expert 1's and has no behaviour
    log-probs (an API expert's), the others are the policy's with the rollout engine's log-probs."""
    rng = np.random.default_rng(seed)
    tokenizer = processor.tokenizer
    seqs = []
    for index, prompt in enumerate(image_prompts(processor, count, seed=seed)):
        ids = tokenizer.encode(ANSWERS[index % len(ANSWERS)], add_special_tokens=False)
        ids = ids[: int(rng.integers(2, len(ids) + 1))]
        expert = index % expert_every == expert_every - 1
        behavior = None if expert else [float(x) for x in -rng.uniform(0.1, 3.0, size=len(ids))]
        seqs.append(TrainSequence(prompt, ids, [1 if expert else 0] * len(ids), float(rng.normal()), behavior))
    return seqs


def ds_config(stage: int) -> dict:
    """configs/ds_zero{stage}.json (the learner fills in its batch, clipping and precision keys)."""
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "configs" / f"ds_zero{stage}.json"
    return read_deepspeed_config(str(path))
