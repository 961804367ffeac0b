"""What a user sees and what a rerun does: console output of a run, resume refusing a changed config, a
finished run, the step-0 evaluation and the kept per-invocation configs (the real trainer on the tiny model)."""

from __future__ import annotations

import json

import pytest
from test_train import overrides

from ekipl.metrics import read_metrics


def cli(out_dir, model_dir, **extra):
    return [f"--{key}={json.dumps(value)}" for key, value in overrides(out_dir, model_dir, **extra).items()]


def test_a_run_tells_what_happened_and_a_rerun_is_safe(tiny_model_dir, tmp_path, capsys):
    from ekipl.train import main

    run = dict(**{"run.max_steps": 2, "run.save_every": 1, "run.eval_every": 2, "data.synthetic_test": 2, "eval.max_new_tokens": 8})
    assert main(cli(tmp_path, tiny_model_dir, **run)) == 0
    err = capsys.readouterr().err
    for expected in ("step 0 eval: score", "step 1/2 | reward", "step 1: checkpoint", "step 2 eval: score",
                     "exported the HF model to", "final step 2 eval", "done: 2/2 steps in", "time per phase: ",
                     f"outputs in {tmp_path}"):
        assert expected in err, (expected, err[-2000:])
    assert "FutureWarning" not in err and "min_pixels" not in err
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl") if "eval/score" in r] == [0, 2]

    # a finished run says so and what to do
    assert main(cli(tmp_path, tiny_model_dir, **run, **{"run.resume": "auto"})) == 0
    assert "run already complete (2/2 steps)" in capsys.readouterr().err

    # a change of the training (not of its length) is refused on resume, naming the key; allowed explicitly
    longer = {**run, "run.max_steps": 3, "run.resume": "auto", "run.eval_every": -1}
    assert main(cli(tmp_path, tiny_model_dir, **longer, **{"loss.beta": 0.1})) == 2
    err = capsys.readouterr().err
    assert "loss.beta: 0.04 -> 0.1" in err and "run.allow_config_change=true" in err
    assert main(cli(tmp_path, tiny_model_dir, **longer, **{"loss.beta": 0.1, "run.allow_config_change": True})) == 0
    assert "resuming" in capsys.readouterr().err
    assert len(list((tmp_path / "invocations").glob("*.yaml"))) == 4  # every invocation's resolved config is kept


@pytest.mark.parametrize("allowed", [{"run.max_steps": 9}, {"eval.n": 2, "eval.k_values": [1, 2]}, {"run.eval_every": 5},
                                     {"loss_backend.schedule": "vocab", "loss_backend.memory_budget_mb": 2048}])
def test_run_length_evaluation_and_logging_keys_may_change_on_resume(allowed):
    from ekipl.config import load_config, resume_conflicts
    from ekipl.config_loader import to_dict

    before = to_dict(load_config(None, {}))
    assert resume_conflicts(before, to_dict(load_config(None, allowed))) == []
    assert resume_conflicts(before, to_dict(load_config(None, {"run.seed": 1}))) == ["run.seed: 0 -> 1"]
    assert resume_conflicts(before, to_dict(load_config(None, {"experts.experts": [{"name": "o", "kind": "oracle"}]})))


def test_print_config_and_help_list_the_resolved_keys(capsys):
    import yaml

    from ekipl.train import main

    assert main(["--print-config", "--optim.lr=1e-5", "--rollout.temperature=0.7"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["optim"]["lr"] == 1e-5 and printed["loss"]["temperature"] == 0.7
    with pytest.raises(SystemExit) as exited:
        main(["--help"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    assert "--print-config" in out and "optim.lr" in out and "experts.experts[].k" in out
