"""An offline CLEVR-Math-like counting task, small enough for a tiny model to learn on a CPU.

A scene holds a few flat objects (shape, colour, size, position) on a grey canvas. Questions are plain
counting ("How many objects are there?") or CLEVR-Math subtraction ("Subtract all red cubes. How many
objects are left?"), with integer answers. Everything is deterministic from a seed, and datasets are
written in Reason-RFT's record format, each row carrying its ``scene`` so that :func:`oracle_answer` can
solve it from disk (the expert pool calls it with records). The vocabulary is small and closed.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

from PIL import Image, ImageDraw

from ekipl.data.prompts import prompt_text
from ekipl.data.records import Record
from ekipl.data.tasks import SYNTHETIC_TASK

SHAPES = ("cube", "sphere", "cylinder")
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (200, 30, 30),
    "green": (30, 150, 40),
    "blue": (40, 70, 210),
    "yellow": (235, 210, 40),
    "purple": (130, 40, 180),
}
# Radius as a share of a grid cell's side: every object fits in its own cell, so none overlap. Objects fill
# most of their cell (one image token each for the tiny model), so that counting them is learnable in minutes.
SIZES: dict[str, float] = {"small": 0.36, "large": 0.48}
BACKGROUND = (150, 150, 150)
GRID = 4  # the canvas is a GRID x GRID board of cells, one object at most per cell
MAX_OBJECTS = 8
ANSWER_RANGE = (1, 6)  # every answer, inclusive, equally likely
# Subtractions per question : weight. Plain counts dominate, so that a tiny model can learn to count within
# a CPU budget; the subtractions (CLEVR-Math's other question kinds) are the hard tail.
QUESTION_MIX: dict[int, float] = {0: 7, 1: 2, 2: 1}

PLAIN_COUNT_QUESTION = "How many objects are there?"
LEFT_QUESTION = "How many objects are left?"


@dataclass(frozen=True)
class SceneObject:
    shape: str
    color: str
    size: str
    row: int  # grid cell
    col: int


@dataclass(frozen=True)
class Scene:
    """The objects, and the groups the question subtracts in order (none: a plain counting question).

    A group is a dict holding ``shape`` and optionally one of ``color`` or ``size``.
    """

    objects: tuple[SceneObject, ...]
    subtract: tuple[dict[str, str], ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "objects": [asdict(obj) for obj in self.objects],
            "subtract": [dict(group) for group in self.subtract],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Scene":
        try:
            return cls(
                objects=tuple(SceneObject(**obj) for obj in data["objects"]),
                subtract=tuple(dict(group) for group in data["subtract"]),
            )
        except (KeyError, TypeError) as error:
            raise ValueError(f"not a synthetic scene ({error}): {str(data)[:200]}") from error


def group_name(group: dict[str, str]) -> str:
    """'red cubes', 'small spheres', 'cylinders'."""
    attribute = group.get("color") or group.get("size")
    return f"{attribute} {group['shape']}s" if attribute else f"{group['shape']}s"


def matches(obj: SceneObject, group: dict[str, str]) -> bool:
    return all(getattr(obj, key) == value for key, value in group.items())


def question_text(scene: Scene) -> str:
    if not scene.subtract:
        return PLAIN_COUNT_QUESTION
    return " ".join(f"Subtract all {group_name(group)}." for group in scene.subtract) + " " + LEFT_QUESTION


def removal_counts(scene: Scene) -> list[int]:
    """How many of the objects still present each subtraction removes, in order."""
    remaining = list(scene.objects)
    counts = []
    for group in scene.subtract:
        kept = [obj for obj in remaining if not matches(obj, group)]
        counts.append(len(remaining) - len(kept))
        remaining = kept
    return counts


def scene_answer(scene: Scene) -> int:
    return len(scene.objects) - sum(removal_counts(scene))


def random_scene(rng: random.Random, question_mix: dict[int, float] | None = None) -> Scene:
    """A scene whose answer is uniform over ``ANSWER_RANGE``, so that no answer beats another by frequency.

    The answer is drawn first, then the kind of question from ``question_mix`` (subtractions per question:
    weight; default ``QUESTION_MIX``), then scenes of that kind until one has that answer.
    """
    mix = QUESTION_MIX if question_mix is None else question_mix
    answer = rng.randint(*ANSWER_RANGE)
    n_groups = rng.choices(list(mix), weights=list(mix.values()))[0]
    while True:
        n_objects = answer if n_groups == 0 else rng.randint(answer, MAX_OBJECTS)
        scene = _scene_of(rng, n_objects, n_groups)
        if scene_answer(scene) == answer:
            return scene


def _scene_of(rng: random.Random, n_objects: int, n_groups: int) -> Scene:
    all_cells = [(row, col) for row in range(GRID) for col in range(GRID)]
    objects = tuple(
        SceneObject(
            shape=rng.choice(SHAPES), color=rng.choice(list(COLORS)), size=rng.choice(list(SIZES)), row=row, col=col
        )
        for row, col in rng.sample(all_cells, n_objects)
    )
    groups: list[dict[str, str]] = []
    while len(groups) < n_groups:
        group = _random_group(rng, objects)
        if group not in groups:
            groups.append(group)
    return Scene(objects=objects, subtract=tuple(groups))


def _random_group(rng: random.Random, objects: tuple[SceneObject, ...]) -> dict[str, str]:
    # Mostly describe an object that is there, so the subtraction removes something; sometimes not.
    if rng.random() < 0.85:
        template = rng.choice(objects)
        shape, color, size = template.shape, template.color, template.size
    else:
        shape, color, size = rng.choice(SHAPES), rng.choice(list(COLORS)), rng.choice(list(SIZES))
    attribute = rng.choice(("color", "size", None))
    group = {"shape": shape}
    if attribute == "color":
        group["color"] = color
    elif attribute == "size":
        group["size"] = size
    return group


def render_scene(scene: Scene, image_size: int = 112) -> Image.Image:
    """Draw the scene: cubes as squares, spheres as discs, cylinders as upright capsules."""
    image = Image.new("RGB", (image_size, image_size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    cell = image_size / GRID
    for obj in scene.objects:
        cx, cy = (obj.col + 0.5) * cell, (obj.row + 0.5) * cell
        radius = SIZES[obj.size] * cell
        fill = COLORS[obj.color]
        outline = tuple(channel // 2 for channel in fill)
        if obj.shape == "cube":
            draw.rectangle((cx - radius, cy - radius, cx + radius, cy + radius), fill=fill, outline=outline)
        elif obj.shape == "sphere":
            draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=fill, outline=outline)
        else:
            half_width = 0.65 * radius
            draw.rounded_rectangle(
                (cx - half_width, cy - radius, cx + half_width, cy + radius),
                radius=half_width * 0.6, fill=fill, outline=outline,
            )
    return image


def chance_baselines(
    gold_answers: Sequence[str], answer_range: tuple[int, int] = ANSWER_RANGE, ks: Sequence[int] = (1,)
) -> dict[str, float]:
    """Scores × 100 of answering without looking at the question: ``majority`` always gives the test set's most
    common answer, ``random`` draws uniformly from ``answer_range`` (inclusive). With k answers per question
    (``majority_pass@k``, ``random_pass@k``) the majority guess only repeats itself, while k random guesses
    solve an answer in the range with probability ``1 - (1 - 1/m)^k`` for m possible answers."""
    if not gold_answers:
        raise ValueError("no answers to compute baselines from")
    counts = Counter(gold_answers)
    possible = {str(value) for value in range(answer_range[0], answer_range[1] + 1)}
    in_range = sum(count for answer, count in counts.items() if answer in possible) / len(gold_answers)
    baselines = {"majority": 100.0 * max(counts.values()) / len(gold_answers), "random": 100.0 * in_range / len(possible)}
    for k in ks:
        baselines[f"majority_pass@{k}"] = baselines["majority"]
        baselines[f"random_pass@{k}"] = 100.0 * in_range * (1.0 - (1.0 - 1.0 / len(possible)) ** k)
    return baselines


def _objects_phrase(count: int, name: str) -> str:
    return f"{count} {name}" if count != 1 else f"1 {name[:-1]}"


def oracle_answer(
    record_or_scene: Record | Scene | dict[str, Any], *, error_rate: float = 0.0, rng: random.Random | None = None
) -> str:
    """A benchmark-style answer, ``<think>...</think>\\n<answer>N</answer>``, worked out from the scene.

    With probability ``error_rate`` the oracle miscounts one step by one (the total or one subtracted
    group) and carries the slip through, so its answer is wrong yet reads as consistent: an imperfect
    expert. ``rng`` draws the slips and is required when ``error_rate > 0``.
    """
    scene = _as_scene(record_or_scene)
    if not 0.0 <= error_rate <= 1.0:
        raise ValueError(f"error_rate must lie in [0, 1], got {error_rate}")
    if error_rate > 0 and rng is None:
        raise ValueError("pass rng (a random.Random) to draw the oracle's errors")
    total = len(scene.objects)
    removed = removal_counts(scene)
    if error_rate > 0 and rng.random() < error_rate:
        total, removed = _miscount(total, removed, rng)
    return _worked_answer(scene, total, removed)


def guessed_answer(record_or_scene: Record | Scene | dict[str, Any], rng: random.Random) -> str:
    """The oracle's reasoning and format with every count guessed, blind to the image: the total uniform over
    ``ANSWER_RANGE`` for a plain count (up to ``MAX_OBJECTS`` before subtractions), each subtracted group
    uniform up to what is left, the arithmetic consistent. A weak demonstration: it shows how to answer and
    nothing about the answer."""
    scene = _as_scene(record_or_scene)
    total = rng.randint(*ANSWER_RANGE) if not scene.subtract else rng.randint(1, MAX_OBJECTS)
    removed = []
    for _ in scene.subtract:
        removed.append(rng.randint(0, total - sum(removed)))
    return _worked_answer(scene, total, removed)


def _worked_answer(scene: Scene, total: int, removed: list[int]) -> str:
    steps = [f"There {'is' if total == 1 else 'are'} {_objects_phrase(total, 'objects')} in the image."]
    left = total
    for group, count in zip(scene.subtract, removed):
        name = group_name(group)
        verb = "is" if count == 1 else "are"
        pronoun = "it" if count == 1 else "them"
        steps.append(
            f"There {verb} {_objects_phrase(count, name)}; subtracting {pronoun} leaves {left} - {count} = "
            f"{_objects_phrase(left - count, 'objects')}."
        )
        left -= count
    return f"<think>{' '.join(steps)}</think>\n<answer>{left}</answer>"


def _miscount(total: int, removed: list[int], rng: random.Random) -> tuple[int, list[int]]:
    """Shift one count (the total, or one subtracted group) by one, among the slips that keep every step
    possible (no group larger than what is left); the final answer then differs from the truth by one."""
    candidates = [(total + delta, removed) for delta in (-1, 1)]
    for index in range(len(removed)):
        for delta in (-1, 1):
            candidates.append((total, [count + (delta if i == index else 0) for i, count in enumerate(removed)]))
    possible = [(new_total, new_removed) for new_total, new_removed in candidates if _possible(new_total, new_removed)]
    return rng.choice(possible)  # never empty: one more object in total is always possible


def _possible(total: int, removed: list[int]) -> bool:
    left = total
    for count in removed:
        if not 0 <= count <= left:
            return False
        left -= count
    return total >= 1


def _as_scene(record_or_scene: Record | Scene | dict[str, Any]) -> Scene:
    if isinstance(record_or_scene, Scene):
        return record_or_scene
    if isinstance(record_or_scene, Record):
        if "scene" not in record_or_scene.extra:
            raise ValueError(
                f"record {record_or_scene.id!r} has no 'scene' field: the oracle solves only synthetic records"
            )
        return Scene.from_json(record_or_scene.extra["scene"])
    return Scene.from_json(record_or_scene)


@dataclass(frozen=True)
class SyntheticDataset:
    """Where :func:`write_synthetic_dataset` put the splits; pass ``image_root`` to the loader."""

    train: Path
    test: Path
    image_root: Path


def synthetic_row(split: str, index: int, seed: int) -> tuple[dict[str, Any], Scene]:
    """Row ``index`` of a split: deterministic from (seed, split, index) alone."""
    scene = random_scene(random.Random(f"ekipl-synthetic/{seed}/{split}/{index}"))
    row = {
        "id": f"synthetic-{split}-{index:06d}",
        "image": f"images/{split}-{index:06d}.png",
        "problem": question_text(scene),
        "solution": f"<answer>{scene_answer(scene)}</answer>",
        "scene": scene.to_json(),
    }
    return row, scene


def write_synthetic_split(out_dir: str | Path, split: str, count: int, *, seed: int, image_size: int = 112) -> Path:
    """Write ``{split}.jsonl`` with ``count`` rows and their PNG images under ``out_dir``; return the file."""
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for index in range(count):
        row, scene = synthetic_row(split, index, seed)
        render_scene(scene, image_size).save(out_dir / row["image"])
        lines.append(json.dumps(row))
    path = out_dir / f"{split}.jsonl"
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def write_synthetic_dataset(
    out_dir: str | Path, *, n_train: int, n_test: int, seed: int, image_size: int = 112
) -> SyntheticDataset:
    """Write ``train.jsonl``, ``test.jsonl`` and their PNG images under ``out_dir``."""
    train = write_synthetic_split(out_dir, "train", n_train, seed=seed, image_size=image_size)
    test = write_synthetic_split(out_dir, "test", n_test, seed=seed, image_size=image_size)
    return SyntheticDataset(train=train, test=test, image_root=Path(out_dir))


def tokenizer_corpus(n_scenes: int = 400, seed: int = 0) -> list[str]:
    """Texts that cover the synthetic task's whole vocabulary, for training a tiny model's tokenizer:
    each prompt with its instruction, the bare question, and oracle answers (right and wrong)."""
    rng = random.Random(seed)
    texts = []
    for index in range(n_scenes):
        row, scene = synthetic_row("corpus", index, seed)
        record = Record(
            id=row["id"], task=SYNTHETIC_TASK, images=(row["image"],), problem=row["problem"], solution=row["solution"]
        )
        wrong = oracle_answer(scene, error_rate=1.0, rng=rng)
        texts += [prompt_text(record), row["problem"], oracle_answer(scene), wrong]
    return texts
