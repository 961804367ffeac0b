"""Atomic, verifiable, resumable checkpoints: DeepSpeed state plus the data position, RNG states and step.

Guarantees:

* **Atomic.** A checkpoint is written under a temporary name, gets a ``manifest.json`` (every file and
  its size) and is renamed when complete, so a crash mid-save never leaves a folder that looks valid.
* **Verifiable.** :func:`problem` finds a truncated, emptied or incomplete checkpoint from its manifest;
  :func:`load_latest` falls back from such a checkpoint to the previous good one, with a warning.
* **The last good checkpoint is kept.** A checkpoint whose weights then gave a non-finite loss is
  marked suspect (:func:`mark_suspect`). Rotation keeps the newest ``keep_last`` checkpoints *and* the
  newest proven one (older than the newest, whose weights have not been tried yet, and not suspect),
  and ``resume: auto`` skips suspect ones.
"""

from __future__ import annotations

import json
import random
import re
import shutil
import warnings
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist

STATE_TAG = "state"
MANIFEST = "manifest.json"
SUSPECT = "SUSPECT"
CLIENT_KEYS = ("step", "sampler", "rng")
_NAME = re.compile(r"^step_(\d{8})$")


class CheckpointError(RuntimeError):
    """No usable checkpoint where one was asked for; the message names each candidate and its problem."""


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _is_main() -> bool:
    return not _distributed() or dist.get_rank() == 0


def _barrier() -> None:
    if _distributed():
        dist.barrier()


def _all_ranks_ok(ok: bool) -> bool:
    """True when ``ok`` holds on every rank (so that all ranks take the same branch)."""
    if not _distributed():
        return ok
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    flag = torch.tensor([0.0 if ok else 1.0], dtype=torch.float64, device=device)
    dist.all_reduce(flag)
    return flag.item() == 0.0


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoints(root: Path) -> list[Path]:
    """Checkpoint folders under ``root`` (complete renames, not yet verified), oldest first."""
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if p.is_dir() and _NAME.match(p.name)), key=lambda p: p.name)


def step_of(path: Path) -> int:
    return int(_NAME.match(path.name).group(1))


def _files(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()}


def problem(path: Path) -> Optional[str]:
    """Why ``path`` cannot be resumed from (missing, truncated or empty files), or None when it is whole."""
    state = path / STATE_TAG
    if not state.is_dir():
        return f"no '{STATE_TAG}/' folder"
    manifest = path / MANIFEST
    if not manifest.is_file():  # written by older versions: only the coarse checks apply
        files = _files(state)
        if not files:
            return f"'{STATE_TAG}/' is empty"
        empty = [name for name, size in files.items() if size == 0]
        return f"empty file {empty[0]}" if empty else None
    try:
        expected = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError, TypeError):
        return f"unreadable {MANIFEST}"
    for name, size in expected.items():
        file = path / name
        if not file.is_file():
            return f"missing file {name}"
        if file.stat().st_size != size:
            return f"{name} has {file.stat().st_size} bytes, the manifest says {size} (truncated?)"
    return None


def is_suspect(path: Path) -> bool:
    return (path / SUSPECT).is_file()


def mark_suspect(path: Path, reason: str) -> None:
    """Records that the weights in ``path`` gave a non-finite loss: kept, but never resumed from by "auto"."""
    if _is_main() and path.is_dir():
        (path / SUSPECT).write_text(reason + "\n")
    _barrier()


def last_good(root: Path) -> Optional[Path]:
    """The newest checkpoint that is whole and not suspect."""
    for path in reversed(checkpoints(root)):
        if not is_suspect(path) and problem(path) is None:
            return path
    return None


def save(engine, root: Path, step: int, client_state: dict[str, Any], keep_last: int) -> Path:
    """Writes ``root/step_XXXXXXXX`` atomically (every rank writes its shard; rank 0 seals and renames)."""
    final = root / f"step_{step:08d}"
    staging = root / f".step_{step:08d}.tmp"
    if _is_main():
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    _barrier()
    engine.save_checkpoint(str(staging), tag=STATE_TAG, client_state=client_state, save_latest=False)
    _barrier()
    if _is_main():
        (staging / MANIFEST).write_text(json.dumps({"step": step, "files": _files(staging)}, indent=1))
        shutil.rmtree(final, ignore_errors=True)
        staging.rename(final)
        prune(root, keep_last)
    _barrier()
    return final


def prune(root: Path, keep_last: int) -> None:
    """Deletes all but the newest ``keep_last`` checkpoints, always keeping the newest proven good one."""
    found = checkpoints(root)
    keep = set(found[-keep_last:])
    proven = next((p for p in reversed(found[:-1]) if not is_suspect(p) and problem(p) is None), None)
    if proven is not None:
        keep.add(proven)
    for old in found:
        if old not in keep:
            shutil.rmtree(old, ignore_errors=True)


def _load(engine, path: Path) -> dict[str, Any]:
    loaded, client_state = engine.load_checkpoint(str(path), tag=STATE_TAG)
    if loaded is None:
        raise CheckpointError(f"DeepSpeed found no state to load in {path}")
    missing = [key for key in CLIENT_KEYS if key not in (client_state or {})]
    if missing:
        raise CheckpointError(f"{path} lacks the trainer state {missing}")
    return client_state


def load_from(engine, path: Path) -> dict[str, Any]:
    """Restores an explicitly named checkpoint (``run.resume: <path>``); no fallback, since it was chosen."""
    path = Path(path)
    why = problem(path)
    if why is not None:
        raise CheckpointError(f"run.resume={str(path)!r} is not a usable checkpoint: {why}")
    if is_suspect(path):
        warnings.warn(f"resuming from {path}, marked suspect: {(path / SUSPECT).read_text().strip()}", stacklevel=2)
    ok, state, error = True, None, None
    try:
        state = _load(engine, path)
    except Exception as exc:  # noqa: BLE001 - any failure of one rank must reach every rank
        ok, error = False, exc
    if not _all_ranks_ok(ok):
        raise CheckpointError(f"run.resume={str(path)!r} could not be loaded: {error or 'failed on another rank'}")
    return state


def load_latest(engine, root: Path) -> Optional[tuple[Path, dict[str, Any]]]:
    """Restores the newest usable checkpoint under ``root`` (``run.resume: auto``), or None when there is none.

    Suspect, incomplete or unloadable checkpoints are skipped with a warning naming each; when
    checkpoints exist but none can be used, :class:`CheckpointError` says why for every one, rather
    than silently starting over in a folder that holds a run.
    """
    tried: list[str] = []
    for path in reversed(checkpoints(root)):
        why = "marked suspect: " + (path / SUSPECT).read_text().strip() if is_suspect(path) else problem(path)
        if why is None:
            try:
                state = _load(engine, path)
            except Exception as exc:  # noqa: BLE001 - a corrupt file raises whatever its reader raises
                why = f"{type(exc).__name__}: {exc}"
        if _all_ranks_ok(why is None):  # every rank votes on every candidate, so all pick the same one
            if tried:
                warnings.warn(f"resuming from {path.name}, the newest usable checkpoint; skipped: {'; '.join(tried)}",
                              stacklevel=2)
            return path, state
        tried.append(f"{path.name} ({why or 'failed on another rank'})")
    if tried:
        raise CheckpointError(
            f"no usable checkpoint under {root}: {'; '.join(tried)}. Resume from one with run.resume=<path> "
            "or start a new run in another run.output_dir"
        )
    return None
