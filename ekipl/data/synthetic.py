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
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

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
# Radius as a share of a grid cell's side: every object fits in its own cell, so none overlap.
SIZES: dict[str, float] = {"small": 0.25, "large": 0.42}
BACKGROUND = (150, 150, 150)
GRID = 4  # the canvas is a GRID x GRID board of cells, one object at most per cell
MIN_OBJECTS, MAX_OBJECTS = 3, 6

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


def random_scene(rng: random.Random) -> Scene:
    """A scene with 3–6 objects: a plain count (1 in 5), one subtraction (3 in 5) or two (1 in 5)."""
    all_cells = [(row, col) for row in range(GRID) for col in range(GRID)]
    cells = rng.sample(all_cells, rng.randint(MIN_OBJECTS, MAX_OBJECTS))
    objects = tuple(
        SceneObject(
            shape=rng.choice(SHAPES), color=rng.choice(list(COLORS)), size=rng.choice(list(SIZES)), row=row, col=col
        )
        for row, col in cells
    )
    n_groups = rng.choices((0, 1, 2), weights=(1, 3, 1))[0]
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


def write_synthetic_dataset(
    out_dir: str | Path, *, n_train: int, n_test: int, seed: int, image_size: int = 112
) -> SyntheticDataset:
    """Write ``train.jsonl``, ``test.jsonl`` and their PNG images under ``out_dir``."""
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    files = {}
    for split, count in (("train", n_train), ("test", n_test)):
        lines = []
        for index in range(count):
            row, scene = synthetic_row(split, index, seed)
            render_scene(scene, image_size).save(out_dir / row["image"])
            lines.append(json.dumps(row))
        files[split] = out_dir / f"{split}.jsonl"
        files[split].write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return SyntheticDataset(train=files["train"], test=files["test"], image_root=out_dir)


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
