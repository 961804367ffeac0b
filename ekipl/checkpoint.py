"""Atomic, resumable checkpoints: DeepSpeed state plus the data position, every RNG state and the step.

A checkpoint is written under a temporary name and renamed when complete, so a crash mid-save never
leaves a folder that looks valid; only the last ``keep_last`` are kept.
"""

from __future__ import annotations

import random
import re
import shutil
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist

STATE_TAG = "state"
_NAME = re.compile(r"^step_(\d{8})$")


def _is_main() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


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
    """Complete checkpoints under ``root``, oldest first."""
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if p.is_dir() and _NAME.match(p.name)), key=lambda p: p.name)


def save(engine, root: Path, step: int, client_state: dict[str, Any], keep_last: int) -> Path:
    """Writes ``root/step_XXXXXXXX`` atomically (every rank writes its shard; rank 0 renames)."""
    final = root / f"step_{step:08d}"
    staging = root / f".step_{step:08d}.tmp"
    if _is_main():
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    _barrier()
    engine.save_checkpoint(str(staging), tag=STATE_TAG, client_state=client_state, save_latest=False)
    _barrier()
    if _is_main():
        shutil.rmtree(final, ignore_errors=True)
        staging.rename(final)
        for old in checkpoints(root)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def resolve_resume(resume: str, root: Path) -> Optional[Path]:
    """The checkpoint to resume from: "auto" = the latest under ``root``, "never" = none, else a path."""
    if resume == "never":
        return None
    if resume == "auto":
        found = checkpoints(root)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / STATE_TAG).is_dir():
        raise FileNotFoundError(f"run.resume={resume!r} is not a checkpoint folder (no '{STATE_TAG}' inside)")
    return path


def load(engine, path: Path) -> dict[str, Any]:
    """Restores the engine (weights, optimizer, scheduler) and returns the saved client state."""
    loaded, client_state = engine.load_checkpoint(str(path), tag=STATE_TAG)
    if loaded is None:
        raise RuntimeError(f"DeepSpeed could not load the checkpoint at {path}")
    return client_state
