"""The run folder: one job at a time (an exclusive lock), and no silent reuse of an earlier run's folder.

Resume semantics (``run.resume``):

* ``auto``: continue the run in ``run.output_dir`` from its newest usable checkpoint; start fresh when
  the folder holds no checkpoint.
* ``never``: start fresh, in an output folder that holds no earlier run (no checkpoints, metrics or
  export); a folder that does is refused, so an old run is never mixed with or rotated out by a new one.
* a checkpoint folder: continue from exactly that checkpoint.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from typing import IO, Optional

LOCK_NAME = ".lock"
# What an earlier run leaves behind; the cached tiny model and synthetic data are not a run.
RUN_OUTPUTS = ("checkpoints", "metrics.jsonl", "hf_export", "eval")


class RunFolderError(RuntimeError):
    """The output folder cannot be used as asked; the message says what to do."""


def earlier_run(out_dir: Path) -> list[str]:
    """The outputs of an earlier run found in ``out_dir`` (empty when there are none)."""
    found = []
    for name in RUN_OUTPUTS:
        path = out_dir / name
        if path.is_file() and path.stat().st_size > 0 or path.is_dir() and any(path.iterdir()):
            found.append(name)
    return found


def check_fresh_start(out_dir: Path, resume: str) -> None:
    """Refuses ``resume: never`` into a folder that holds an earlier run."""
    if resume != "never":
        return
    found = earlier_run(out_dir)
    if found:
        raise RunFolderError(
            f"run.output_dir={str(out_dir)!r} holds an earlier run ({', '.join(found)}) and run.resume=never: "
            "continue it with run.resume=auto, or choose a new run.output_dir (or delete the folder yourself)"
        )


class RunLock:
    """An exclusive, advisory lock on the run folder, held while the job runs and released on exit.

    ``flock`` locks die with the process, so a crashed or killed job never leaves a stale lock behind.
    """

    def __init__(self, out_dir: Path) -> None:
        self.path = out_dir / LOCK_NAME
        self._file: Optional[IO[str]] = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = self.path.open("a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            owner = handle.read().strip() or "unknown"
            handle.close()
            raise RunFolderError(
                f"run.output_dir={str(self.path.parent)!r} is in use by another job (pid {owner}); wait for it to "
                "finish or choose another run.output_dir"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        self._file = handle

    def release(self) -> None:
        if self._file is not None:
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()
            self._file = None

    def __enter__(self) -> "RunLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
