"""Append-only JSONL files that survive being killed mid-write.

Each row is written as one line and flushed at once, so a crash loses at most the line being written. On
read, a line that does not parse (a torn last line, typically) is skipped and counted, never fatal; before
appending to such a file a newline is written, so the new rows never fuse with the torn fragment.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


def read_jsonl(path: str | os.PathLike) -> tuple[list[dict[str, Any]], int]:
    """The rows of ``path`` that parse as JSON objects, and how many lines did not (0 rows if no file)."""
    path = Path(path)
    if not path.exists():
        return [], 0
    rows: list[dict[str, Any]] = []
    bad = 0
    with path.open("r", encoding="utf-8", errors="replace") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                row = None
            if not isinstance(row, dict):
                bad += 1
                logger.warning("%s:%d is not a JSON object (a torn write?); skipped", path, line_number)
                continue
            rows.append(row)
    return rows, bad


class JsonlAppender:
    """Appends rows to a JSONL file from any thread, one flushed line per row."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._handle = self.path.open("a", encoding="utf-8")
        if self._handle.tell() > 0 and not _ends_with_newline(self.path):
            self._handle.write("\n")
            self._handle.flush()

    def append(self, row: dict[str, Any]) -> None:
        line = json.dumps(row, ensure_ascii=False) + "\n"
        with self._lock:
            if self._handle.closed:
                raise ValueError(f"{self.path} was closed; rows can no longer be appended")
            self._handle.write(line)
            self._handle.flush()

    def close(self) -> None:
        with self._lock:
            self._handle.close()


def _ends_with_newline(path: Path) -> bool:
    with path.open("rb") as handle:
        handle.seek(-1, os.SEEK_END)
        return handle.read(1) == b"\n"
