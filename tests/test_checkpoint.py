"""Checkpoint safety without DeepSpeed: verification, rotation that keeps the last good one, fallback on resume."""

from __future__ import annotations

import json

import pytest

from ekipl import checkpoint
from ekipl.checkpoint import CheckpointError


def fake_checkpoint(root, step, *, payload=b"weights" * 100, suspect=None):
    """A folder laid out as :func:`checkpoint.save` lays it out, with a manifest of its files."""
    path = root / f"step_{step:08d}"
    (path / checkpoint.STATE_TAG).mkdir(parents=True)
    (path / checkpoint.STATE_TAG / "mp_rank_00_model_states.pt").write_bytes(payload)
    (path / checkpoint.STATE_TAG / "optim_states.pt").write_bytes(payload * 2)
    (path / checkpoint.MANIFEST).write_text(json.dumps({"step": step, "files": checkpoint._files(path)}))
    if suspect:
        (path / checkpoint.SUSPECT).write_text(suspect)
    return path


class FakeEngine:
    """Loads a checkpoint by reading its model file: raises on what DeepSpeed would choke on."""

    def __init__(self):
        self.loaded = []

    def load_checkpoint(self, path, tag):
        data = (checkpoint.Path(path) / tag / "mp_rank_00_model_states.pt").read_bytes()
        if not data.startswith(b"weights"):
            raise RuntimeError("PytorchStreamReader failed reading zip archive")
        self.loaded.append(path)
        return path, {"step": int(path[-8:]), "sampler": {}, "rng": {}}


def test_a_whole_checkpoint_has_no_problem(tmp_path):
    assert checkpoint.problem(fake_checkpoint(tmp_path, 1)) is None


@pytest.mark.parametrize("damage, expected", [
    (lambda p: (p / "state" / "optim_states.pt").write_bytes(b"weights"), "truncated"),
    (lambda p: (p / "state" / "optim_states.pt").write_bytes(b""), "truncated"),
    (lambda p: (p / "state" / "optim_states.pt").unlink(), "missing file"),
    (lambda p: __import__("shutil").rmtree(p / "state"), "no 'state/'"),
    (lambda p: (p / "manifest.json").write_text("{"), "unreadable"),
])
def test_damaged_checkpoints_are_named(tmp_path, damage, expected):
    path = fake_checkpoint(tmp_path, 3)
    damage(path)
    assert expected in checkpoint.problem(path)


def test_legacy_checkpoints_without_manifest_get_the_coarse_checks(tmp_path):
    path = fake_checkpoint(tmp_path, 1)
    (path / checkpoint.MANIFEST).unlink()
    assert checkpoint.problem(path) is None
    (path / "state" / "optim_states.pt").write_bytes(b"")
    assert "empty file" in checkpoint.problem(path)


def test_rotation_never_deletes_the_last_good_checkpoint(tmp_path):
    fake_checkpoint(tmp_path, 1)
    fake_checkpoint(tmp_path, 2)
    fake_checkpoint(tmp_path, 3, suspect="NaN loss right after it")
    fake_checkpoint(tmp_path, 4, suspect="NaN loss right after it")
    checkpoint.prune(tmp_path, keep_last=1)
    assert [p.name for p in checkpoint.checkpoints(tmp_path)] == ["step_00000002", "step_00000004"]
    assert checkpoint.last_good(tmp_path).name == "step_00000002"


def test_rotation_keeps_a_proven_checkpoint_beside_one_whose_weights_are_untried(tmp_path):
    fake_checkpoint(tmp_path, 1)
    fake_checkpoint(tmp_path, 2)
    fake_checkpoint(tmp_path, 3)  # just saved: the next step may still find its weights give NaN
    checkpoint.prune(tmp_path, keep_last=1)
    assert [p.name for p in checkpoint.checkpoints(tmp_path)] == ["step_00000002", "step_00000003"]


def test_resume_falls_back_past_corrupt_and_suspect_checkpoints(tmp_path):
    fake_checkpoint(tmp_path, 1)
    fake_checkpoint(tmp_path, 2)
    fake_checkpoint(tmp_path, 3, payload=b"garbage" * 100)  # same size as recorded, unreadable content
    fake_checkpoint(tmp_path, 4, suspect="NaN loss right after it")
    (fake_checkpoint(tmp_path, 5) / "state" / "optim_states.pt").write_bytes(b"")  # truncated
    engine = FakeEngine()
    with pytest.warns(UserWarning, match=r"step_00000002.*skipped: step_00000005 \(.*truncated.*step_00000004 "
                                         r"\(marked suspect.*step_00000003 \(RuntimeError"):
        path, state = checkpoint.load_latest(engine, tmp_path)
    assert path.name == "step_00000002" and state["step"] == 2


def test_resume_with_no_usable_checkpoint_says_why_instead_of_starting_over(tmp_path):
    fake_checkpoint(tmp_path, 1, suspect="NaN loss right after it")
    with pytest.raises(CheckpointError, match=r"no usable checkpoint.*step_00000001 \(marked suspect.*run.resume=<path>"):
        checkpoint.load_latest(FakeEngine(), tmp_path)
    assert checkpoint.load_latest(FakeEngine(), tmp_path / "empty") is None


def test_an_explicit_resume_path_must_be_whole(tmp_path):
    path = fake_checkpoint(tmp_path, 1)
    (path / "state" / "optim_states.pt").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="run.resume=.*truncated"):
        checkpoint.load_from(FakeEngine(), path)
