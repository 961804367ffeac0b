"""The EKIPL trainer end to end on the tiny model: one step against the reference, resume, errors."""

from __future__ import annotations

import json
import math

import pytest
import torch

from ekipl.config import load_config
from ekipl.learner import NonFiniteLossError
from ekipl.metrics import PhaseTimer
from ekipl.models import multimodal_token_types
from ekipl.packing import pack_sequences
from ekipl_kernels import reference


def overrides(out_dir, model_dir, **extra):
    base = {
        "run.output_dir": str(out_dir), "run.max_steps": 2, "run.save_every": 0, "run.eval_every": -1,
        "run.resume": "never", "model.path": str(model_dir), "data.synthetic_train": 6, "data.synthetic_test": 2,
        "data.prompts_per_step": 4, "data.max_pixels": 12544, "rollout.n_policy": 2, "rollout.max_new_tokens": 64,
        "rollout.top_p": 1.0, "rollout.top_k": 0, "experts.experts": [{"name": "oracle", "kind": "oracle", "k": 1, "error_rate": 0.3}],
        "group.size": 3, "loss.beta": 0.04, "loss.temperature": 0.9, "optim.lr": 1e-3, "optim.micro_batch_size": 4,
    }
    return {**base, **extra}


@pytest.fixture(scope="module")
def trainer(tiny_model_dir, tmp_path_factory):
    from ekipl.train import Trainer

    return Trainer(load_config(None, overrides(tmp_path_factory.mktemp("run"), tiny_model_dir)))


def test_one_step_matches_the_reference_loss_and_gradient(trainer):
    batch = trainer.experience.make(trainer.step_index, PhaseTimer())
    seqs = batch.sequences
    assert any(o > 0 for s in seqs for o in s.origins), "the oracle's answers should join the groups"
    learner = trainer.learner
    packed = learner.pack(seqs)
    learner.fill_logprobs(packed, old=True)
    model = learner.model
    mb = packed.micro_batch()
    normalizer = learner._normalizer(packed)
    probe = model.model.language_model.layers[0].mlp.down_proj.weight

    model.zero_grad(set_to_none=True)
    out = learner._micro_batch_loss(mb, normalizer)
    learner.engine.backward(out.loss, scale_wrt_gas=False)
    fused_grad = probe.grad.detach().clone()
    learner.engine.optimizer.zero_grad()

    model.zero_grad(set_to_none=True)
    # the model's own forward, logits and all (Qwen-VL needs the token types to place the image positions)
    types = multimodal_token_types(mb.input_ids, model.config)
    logits = model(input_ids=mb.input_ids, attention_mask=mb.attention_mask, mm_token_type_ids=types, **mb.mm_inputs).logits
    rows = logits.reshape(-1, logits.shape[-1])[mb.hidden_index]
    expected = reference.grpo_loss(
        rows, mb.targets, advantages=mb.advantages, cu_seqlens=mb.cu_seqlens, origin=mb.origin,
        old_logprobs=mb.old_logprobs, ref_logprobs=mb.ref_logprobs, normalizer=normalizer,
        config=trainer.cfg.loss,
    )
    (reference_grad,) = torch.autograd.grad(expected.loss, probe)
    model.zero_grad(set_to_none=True)

    assert math.isfinite(out.loss.item()) and out.loss.item() != 0.0
    torch.testing.assert_close(out.loss.double(), expected.loss.double(), rtol=1e-4, atol=1e-6)
    rel = (fused_grad.double() - reference_grad.double()).norm() / reference_grad.double().norm()
    assert reference_grad.abs().sum() > 0 and rel < 1e-4
    # the seq-mean normaliser counts sequences with at least one token
    assert normalizer == sum(1 for s in seqs if s.num_tokens)


def test_nan_guard_skips_then_stops(trainer, monkeypatch):
    learner = trainer.learner
    batch = trainer.experience.make(trainer.step_index, PhaseTimer())
    packed = learner.pack(batch.sequences)
    learner.fill_logprobs(packed, old=False)
    before = [p.detach().clone() for p in learner.model.parameters()]
    real = learner._micro_batch_loss

    def poisoned(mb, normalizer):
        out = real(mb, normalizer)
        out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(learner, "_micro_batch_loss", poisoned)
    learner.bad_steps = 0
    for _ in range(learner.optim_cfg.max_bad_steps - 1):
        assert learner.update(packed)["skipped_steps"] == 1.0
    assert all(torch.equal(a, b) for a, b in zip(before, learner.model.parameters()))
    with pytest.raises(NonFiniteLossError, match="max_bad_steps"):
        learner.update(packed)
    learner.bad_steps = 0


def _weights(path):
    from safetensors.torch import load_file

    return load_file(str(path / "hf_export" / "model.safetensors"))


def _comparable(path):
    rows = [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith(("time/", "tokens_per_s", "memory/", "sync/seconds", "experts/"))
             and "latency" not in k} for r in rows]


def test_resume_reproduces_an_uninterrupted_run_across_an_epoch_boundary(tiny_model_dir, tmp_path):
    from ekipl.train import Trainer

    straight, split = tmp_path / "straight", tmp_path / "split"
    Trainer(load_config(None, overrides(straight, tiny_model_dir, **{"run.max_steps": 4}))).run()
    Trainer(load_config(None, overrides(split, tiny_model_dir, **{"run.max_steps": 4, "run.stop_at_step": 2}))).run()
    resumed = Trainer(load_config(None, overrides(split, tiny_model_dir, **{"run.max_steps": 4, "run.resume": "auto"})))
    resumed.run()
    assert resumed.sampler.epoch >= 1  # 4 steps x 4 prompts over 6 records crosses epochs
    row = json.loads((split / "metrics.jsonl").read_text().splitlines()[-1])
    for key in ("reward/mean", "reward/mean_std", "rollout/truncated_frac", "groups/zero_variance_frac",
                "groups/selected_share/oracle", "experts/oracle/received", "reward/expert_answers", "loss/entropy_mean"):
        assert key in row and math.isfinite(row[key]), key
    assert 0.0 <= row["rollout/truncated_frac"] <= 1.0 and row["groups/selected_share/oracle"] == row["groups/action_source_ratio"]
    assert _comparable(straight) == _comparable(split)
    a, b = _weights(straight), _weights(split)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_bad_key_and_missing_model_give_one_line_errors(tmp_path, capsys):
    from ekipl.train import main

    assert main(["--optim.lrr=1e-3"]) == 2
    err = capsys.readouterr().err
    assert "optim.lrr" in err and "Traceback" not in err
    assert main([f"--model.path={tmp_path / 'nowhere'}", f"--run.output_dir={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err
    assert "model.path" in err and "config.json" in err
    assert main(["--loss.kl=k4"]) == 2
    assert "loss.kl=" in capsys.readouterr().err


def _launch(num_ranks: int, out_dir, model_dir) -> None:
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parent.parent
    args = [f"--{key}={json.dumps(value) if isinstance(value, list) else value}"
            for key, value in overrides(out_dir, model_dir, **{"run.max_steps": 1}).items()]
    launcher = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(num_ranks),
                "--master_port", str(29500 + num_ranks + os.getpid() % 1000)]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([*launcher, str(repo / "ekipl" / "train.py"), *args], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def test_two_cpu_ranks_match_one_rank_with_the_same_global_batch(tiny_model_dir, tmp_path):
    _launch(1, tmp_path / "one", tiny_model_dir)
    _launch(2, tmp_path / "two", tiny_model_dir)
    one, two = _comparable(tmp_path / "one")[0], _comparable(tmp_path / "two")[0]
    assert one["loss"] == pytest.approx(two["loss"], rel=1e-5, abs=1e-7)
    a, b, initial = _weights(tmp_path / "one"), _weights(tmp_path / "two"), _weights_of_model(tiny_model_dir)
    assert a.keys() == b.keys()
    update_one = torch.cat([(a[k] - initial[k]).flatten() for k in sorted(a)])
    update_two = torch.cat([(b[k] - initial[k]).flatten() for k in sorted(a)])
    assert update_one.norm() > 1e-3  # the step really moved the weights
    # Adam's first step is ~lr * sign(g): where g is ~0, rounding of the cross-rank sum may flip a few
    # elements, so compare the update as a whole and bound each element by a small share of lr.
    assert (update_one - update_two).norm() / update_one.norm() < 1e-3
    assert (update_one - update_two).abs().max() < 1e-2 * 1e-3


def _weights_of_model(path):
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


def _reference_grad_norm(model_dir, seqs, pad_id, config, normalizer):
    """The full-batch gradient norm of the reference loss, on a plain (non-DeepSpeed) copy of the policy."""
    from ekipl.models import load_policy

    model = load_policy(model_dir)
    mb = pack_sequences(seqs, pad_id, torch.device("cpu")).micro_batch()
    types = multimodal_token_types(mb.input_ids, model.config)
    logits = model(input_ids=mb.input_ids, attention_mask=mb.attention_mask, mm_token_type_ids=types, **mb.mm_inputs).logits
    rows = logits.reshape(-1, logits.shape[-1])[mb.hidden_index]
    loss = reference.grpo_loss(rows, mb.targets, advantages=mb.advantages, cu_seqlens=mb.cu_seqlens, origin=mb.origin,
                               normalizer=normalizer, config=config).loss
    grads = torch.autograd.grad(loss, [p for p in model.parameters()])
    return torch.stack([g.double().norm() for g in grads]).norm().item()


@pytest.mark.parametrize("stage", [0, 2, 3])
def test_micro_batches_accumulate_to_the_full_batch_gradient_under_every_zero_stage(stage, tiny_model_dir, tmp_path):
    from ekipl.train import Trainer

    extra = {"deepspeed.config": f"configs/ds_zero{stage}.json", "loss.beta": 0.0, "optim.micro_batch_size": 5}
    trainer = Trainer(load_config(None, overrides(tmp_path, tiny_model_dir, **extra)))
    seqs = trainer.experience.make(trainer.step_index, PhaseTimer()).sequences
    assert len(seqs) > 5  # several micro-batches
    packed = trainer.learner.pack(seqs)
    expected = _reference_grad_norm(tiny_model_dir, seqs, trainer.learner.pad_id, trainer.cfg.loss,
                                    trainer.learner._normalizer(packed))
    metrics = trainer.learner.update(packed)
    assert metrics["grad_norm"] == pytest.approx(expected, rel=1e-4)
