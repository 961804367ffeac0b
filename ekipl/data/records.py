"""Reason-RFT RL records: one question about one or two images, with its reference solution.

A data file is a JSON list of rows or a JSONL file (one row a line). A row holds ``id``, ``image`` (a path
or a list of paths, relative to an image root), ``problem``, ``solution`` and, for GeoMath, ``answer``;
any other field (``scene`` for the synthetic task, ``level``, ``type``) is kept in :attr:`Record.extra`.
Every row is checked when the file is loaded, images included, so that a bad row fails here, naming its
file and row, instead of crashing a training run mid-epoch.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from PIL import Image

from ekipl.data.answers import gold_answer
from ekipl.data.tasks import IMAGES_PER_FAMILY, task_family

logger = logging.getLogger(__name__)

REQUIRED_FIELDS = ("id", "image", "problem", "solution")


class BadRecordError(ValueError):
    """A data row that cannot be used; the message starts with the file and row."""


@dataclass(frozen=True)
class Record:
    """One question of a task.

    ``images`` are resolved paths; ``source`` ("file:line" or "file[index]") names the row in errors.
    """

    id: str
    task: str
    images: tuple[str, ...]
    problem: str
    solution: str
    answer: str | None = None
    source: str = ""
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def gold_answer(self) -> str:
        """The reference answer: ``answer`` if the row has one, else the contents of the solution's tag."""
        return gold_answer(self.solution, self.answer)


@dataclass(frozen=True)
class BadRow:
    source: str
    reason: str


@dataclass
class LoadedDataset:
    """The usable records of a file and the rows that were skipped (only with ``skip_bad_rows``)."""

    records: list[Record]
    skipped: list[BadRow]

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> Record:
        return self.records[index]

    def __iter__(self) -> Iterator[Record]:
        return iter(self.records)


def load_records(
    path: str | os.PathLike,
    *,
    task: str,
    image_root: str | os.PathLike | None = None,
    skip_bad_rows: bool = False,
) -> LoadedDataset:
    """Load and check every row of ``path`` (a JSON list or JSONL file) as records of ``task``.

    Image paths are resolved against ``image_root`` (default: the data file's folder). A bad row raises
    :class:`BadRecordError` naming the file and row; with ``skip_bad_rows=True`` it is skipped, counted
    in :attr:`LoadedDataset.skipped` and reported in the log.

    Record ids must be unique after ``str()`` (``7`` and ``"7"`` are the same id): the trainer caches
    prompts, experts serve cached answers and evaluation matches solutions by id, so a second row with the
    same id would be trained on the first row's prompt. A repeated id is a bad row, the later one: it is
    rejected, or skipped with ``skip_bad_rows=True`` while the first row is kept. Ids are not made unique
    by renaming, since a renamed id would silently detach the row from answers cached under its id.
    """
    family = task_family(task)
    path = Path(path)
    root = Path(image_root) if image_root is not None else path.parent
    records: list[Record] = []
    skipped: list[BadRow] = []
    first_source: dict[str, str] = {}  # id -> the row that holds it
    for source, row in _read_rows(path):
        try:
            record = _parse_row(row, source=source, task=task, family=family, image_root=root)
            if record.id in first_source:
                raise BadRecordError(
                    f"{source}: id {row['id']!r} is already the id of row {first_source[record.id]} (ids are "
                    "compared as strings); record ids must be unique: give one of the rows a new id or drop it"
                )
            first_source[record.id] = source
            records.append(record)
        except BadRecordError as error:
            if not skip_bad_rows:
                raise
            skipped.append(BadRow(source, str(error)))
    if skipped:
        logger.warning(
            "%s: skipped %d bad row(s) of %d; first: %s",
            path, len(skipped), len(records) + len(skipped), skipped[0].reason,
        )
    if not records:
        raise BadRecordError(f"{path}: no usable records (skipped {len(skipped)} bad row(s))")
    return LoadedDataset(records, skipped)


def _read_rows(path: Path) -> Iterator[tuple[str, Any]]:
    """Yield (source, parsed row); an unparseable JSONL line yields the error itself as its row."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise FileNotFoundError(f"cannot read data file {path}: {error}") from error
    if text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as error:
            raise BadRecordError(f"{path}: not valid JSON ({error}); expected a list of rows or JSONL") from error
        for index, row in enumerate(rows):
            yield f"{path}[{index}]", row
        return
    for line_number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        source = f"{path}:{line_number}"
        try:
            yield source, json.loads(line)
        except json.JSONDecodeError as error:
            yield source, error


def _parse_row(row: Any, *, source: str, task: str, family: str, image_root: Path) -> Record:
    def bad(reason: str) -> BadRecordError:
        return BadRecordError(f"{source}: {reason}")

    if isinstance(row, json.JSONDecodeError):
        raise bad(f"not valid JSON ({row})")
    if not isinstance(row, dict):
        raise bad(f"expected a JSON object, got {type(row).__name__}")
    missing = [name for name in REQUIRED_FIELDS if name not in row]
    if missing:
        raise bad(f"missing field(s) {', '.join(missing)}")

    record_id = row["id"]
    if isinstance(record_id, bool) or not isinstance(record_id, (str, int)):
        raise bad(f"'id' must be a string or an integer, got {type(record_id).__name__}")
    for name in ("problem", "solution"):
        if not isinstance(row[name], str) or not row[name].strip():
            raise bad(f"{name!r} must be a non-empty string, got {row[name]!r:.80}")
    answer = row.get("answer")
    if answer is not None:
        if isinstance(answer, bool) or not isinstance(answer, (str, int, float)):
            raise bad(f"'answer' must be a string or a number, got {type(answer).__name__}")
        answer = str(answer)
    if not gold_answer(row["solution"], answer):
        raise bad("the reference answer is empty")

    images = _resolve_images(row["image"], image_root, bad)
    expected = IMAGES_PER_FAMILY[family]
    if len(images) != expected:
        raise bad(f"task {task!r} takes {expected} image(s) per row, this row has {len(images)}")

    extra = {key: value for key, value in row.items() if key not in REQUIRED_FIELDS and key != "answer"}
    return Record(
        id=str(record_id),
        task=task,
        images=images,
        problem=row["problem"],
        solution=row["solution"],
        answer=answer,
        source=source,
        extra=extra,
    )


def _resolve_images(value: Any, image_root: Path, bad) -> tuple[str, ...]:
    names = value if isinstance(value, list) else [value]
    if not names or not all(isinstance(name, str) and name for name in names):
        raise bad(f"'image' must be a path or a non-empty list of paths, got {value!r:.80}")
    paths = []
    for name in names:
        image_path = image_root / name
        try:
            with Image.open(image_path) as image:
                image.verify()  # header and (for PNG) chunk checksums, without decoding every pixel
        except (OSError, SyntaxError, ValueError) as error:
            raise bad(f"image {image_path} is missing or unreadable ({error}); check --image-root") from error
        paths.append(str(image_path))
    return tuple(paths)
