"""Faults never lose or corrupt work: NaN weights, a reused or shared run folder, a failing evaluation, a corrupt
checkpoint and a signal, each driven through the real trainer on the tiny model (DeepSpeed on CPU)."""

from __future__ import annotations

import os
import signal

import pytest
import torch
from test_train import overrides

from ekipl import checkpoint
from ekipl.config import load_config
from ekipl.learner import NonFiniteLossError, NonFiniteWeightsError
from ekipl.run_folder import RunFolderError, RunLock


def make_trainer(out_dir, model_dir, **extra):
    from ekipl.train import Trainer

    return Trainer(load_config(None, overrides(out_dir, model_dir, **extra)))


def saved_steps(out_dir):
    return [checkpoint.step_of(p) for p in checkpoint.checkpoints(out_dir / "checkpoints")]


def test_weights_made_non_finite_by_an_update_are_never_saved_or_exported(tiny_model_dir, tmp_path):
    trainer = make_trainer(tmp_path, tiny_model_dir, **{"run.max_steps": 3, "run.save_every": 1})
    engine_step = trainer.learner.engine.step

    def poisoning_step(*args, **kwargs):
        engine_step(*args, **kwargs)
        if trainer.step_index == 1:  # the update of step 2
            next(trainer.learner.model.parameters()).data[0] = float("nan")

    trainer.learner.engine.step = poisoning_step
    with pytest.raises(NonFiniteWeightsError, match=r"NaN/Inf in the weights.*last good checkpoint is .*step_00000001"):
        trainer.run()
    assert saved_steps(tmp_path) == [1] and not (tmp_path / "hf_export").exists()


def test_a_diverged_run_keeps_its_last_good_checkpoint_and_exports_nothing(tiny_model_dir, tmp_path):
    # lr 1e30 keeps the weights finite but huge: every later loss is NaN, so those updates are skipped
    cfg = {"run.max_steps": 4, "run.save_every": 1, "run.keep_last": 1, "optim.max_bad_steps": 5}
    trainer = make_trainer(tmp_path, tiny_model_dir, **cfg)
    engine_step = trainer.learner.engine.step

    def diverging_step(*args, **kwargs):
        if trainer.step_index >= 1:  # from the update of step 2 on, as if optim.lr were 1e30
            for group in trainer.learner.engine.optimizer.param_groups:
                group["lr"] = 1e30
        engine_step(*args, **kwargs)

    trainer.learner.engine.step = diverging_step
    with pytest.raises(NonFiniteLossError, match=r"neither saved nor exported.*last good checkpoint is .*step_00000001"):
        trainer.run()
    assert not (tmp_path / "hf_export").exists()
    # step 2's weights gave NaN at step 3: marked suspect; later steps were not saved; step 1 survived keep_last=1
    assert saved_steps(tmp_path) == [1, 2]
    assert checkpoint.is_suspect(tmp_path / "checkpoints" / "step_00000002")
    assert checkpoint.last_good(tmp_path / "checkpoints").name == "step_00000001"
    resumed = make_trainer(tmp_path, tiny_model_dir, **{**cfg, "run.resume": "auto", "run.max_steps": 1})
    with pytest.warns(UserWarning, match=r"step_00000001.*skipped: step_00000002 \(marked suspect"):
        resumed.resume()
    assert resumed.step_index == 1
    resumed.lock.release()


def test_faults_between_and_during_steps_lose_no_trained_step(tiny_model_dir, tmp_path):
    cfg = {"run.max_steps": 3, "run.save_every": 1, "run.keep_last": 3, "run.eval_every": 2, "run.eval_at_start": False}

    # an evaluation that fails (here: at step 2) comes after that step's checkpoint
    trainer = make_trainer(tmp_path, tiny_model_dir, **cfg)
    trainer.evaluate = lambda: (_ for _ in ()).throw(RuntimeError("bad test image"))
    with pytest.raises(RuntimeError, match="bad test image"):
        trainer.run()
    assert saved_steps(tmp_path) == [1, 2]

    # a second job, and a fresh start over this run, are both refused before anything is written
    with RunLock(tmp_path):
        with pytest.raises(RunFolderError, match="in use by another job"):
            make_trainer(tmp_path, tiny_model_dir, **{**cfg, "run.resume": "auto"})
    with pytest.raises(RunFolderError, match="holds an earlier run"):
        make_trainer(tmp_path, tiny_model_dir, **{**cfg, "run.resume": "never"})

    # a truncated newest checkpoint: resume falls back to step 1; SIGTERM after one step saves and stops
    shard = max((tmp_path / "checkpoints" / "step_00000002" / "state").iterdir(), key=lambda p: p.stat().st_size)
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    resumed = make_trainer(tmp_path, tiny_model_dir, **{**cfg, "run.resume": "auto", "run.eval_every": -1})
    real_step = resumed.step

    def step_then_sigterm():
        metrics = real_step()
        os.kill(os.getpid(), signal.SIGTERM)
        return metrics

    resumed.step = step_then_sigterm
    from ekipl.train import RunStopped

    with pytest.warns(UserWarning, match=r"resuming from step_00000001.*step_00000002 \(.*truncated"):
        with pytest.raises(RunStopped, match=r"stopped at step 2 \(SIGTERM\).*step_00000002.*run.resume=auto") as stopped:
            resumed.run()
    assert stopped.value.exit_code == 128 + signal.SIGTERM
    assert checkpoint.problem(tmp_path / "checkpoints" / "step_00000002") is None
    assert not (tmp_path / "hf_export").exists()

    final = make_trainer(tmp_path, tiny_model_dir, **{**cfg, "run.resume": "auto", "run.eval_every": -1})
    final.run()
    assert final.step_index == 3 and (tmp_path / "hf_export" / "model.safetensors").is_file()
    steps = [row["step"] for row in __import__("ekipl.metrics", fromlist=["read_metrics"]).read_metrics(tmp_path / "metrics.jsonl")]
    assert steps == [1, 2, 3]
    exported = __import__("safetensors.torch", fromlist=["load_file"]).load_file(str(tmp_path / "hf_export" / "model.safetensors"))
    assert all(torch.isfinite(t).all() for t in exported.values())


def test_killing_the_deepspeed_launcher_stops_the_ranks_with_a_checkpoint(tiny_model_dir, tmp_path):
    """The real launcher chain (deepspeed -> launch.py -> train.py): SIGKILL the top process, as a scheduler may."""
    import json
    import subprocess
    import time
    from pathlib import Path

    repo = Path(__file__).resolve().parent.parent
    out = tmp_path / "run"
    args = [f"--{key}={json.dumps(value)}" for key, value in overrides(out, tiny_model_dir, **{"run.max_steps": 500}).items()]
    log = (tmp_path / "launcher.log").open("w")
    launcher = subprocess.Popen(["deepspeed", "--num_gpus", "1", "ekipl/train.py", *args], cwd=repo, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while not (out / "metrics.jsonl").is_file() or not (out / "metrics.jsonl").read_text().strip():
            assert launcher.poll() is None and time.monotonic() < deadline, (tmp_path / "launcher.log").read_text()[-3000:]
            time.sleep(0.5)
        rank0 = int((out / ".lock").read_text())
        launcher.kill()
        launcher.wait()
        deadline = time.monotonic() + 120
        while Path(f"/proc/{rank0}").exists() and "zombie" not in Path(f"/proc/{rank0}/status").read_text():
            assert time.monotonic() < deadline, "train.py kept running after its launcher was killed"
            time.sleep(0.5)
    finally:
        try:
            os.killpg(launcher.pid, signal.SIGKILL)  # whatever the launcher left behind
        except ProcessLookupError:
            pass
        log.close()
    text = (tmp_path / "launcher.log").read_text()
    assert "the launcher process" in text and "rerun with run.resume=auto" in text, text[-3000:]
    assert saved_steps(out) and checkpoint.problem(checkpoint.checkpoints(out / "checkpoints")[-1]) is None
