"""Run outputs: the trackers of run.report_to (TensorBoard, W&B, MLflow stand-ins) and curves.png."""

from __future__ import annotations

import json
import math
import sys
import types

import pytest

from ekipl.config_loader import ConfigError
from ekipl.metrics import (
    CURVE_PANELS,
    MetricsLogger,
    curve_panels,
    ema,
    missing_tracker_message,
    normalize_report_to,
    plot_curves,
)

ALL_PANELS = [title for title, _, _ in CURVE_PANELS]


# -- run.report_to ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("given, expected", [
    (["tensorboard"], ("tensorboard",)),
    ("wandb", ("wandb",)),
    (["tensorboard", "wandb", "mlflow", "wandb"], ("tensorboard", "wandb", "mlflow")),
    (["none"], ()),
    ("none", ()),
    ([], ()),
    (None, ()),
])
def test_report_to_is_normalised(given, expected):
    assert normalize_report_to(given) == expected


@pytest.mark.parametrize("given", [["tensorbord"], ["none", "wandb"], "comet"])
def test_report_to_refuses_unknown_trackers_naming_the_key(given):
    with pytest.raises(ValueError, match=r"run.report_to=.*is invalid: expected a list of 'tensorboard', 'wandb', "
                                         r"'mlflow', or 'none'"):
        normalize_report_to(given)


def test_a_missing_tracker_package_says_what_to_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "wandb", None)  # not importable
    monkeypatch.setitem(sys.modules, "mlflow", None)
    assert missing_tracker_message(["tensorboard"]) is None
    message = missing_tracker_message(["tensorboard", "wandb", "mlflow"])
    assert "run.report_to=['tensorboard', 'wandb', 'mlflow']" in message
    assert "pip install wandb mlflow" in message and "remove 'wandb' and 'mlflow' from run.report_to" in message
    with pytest.raises(ConfigError, match=r"run.report_to=\['wandb'\].*pip install wandb"):
        MetricsLogger(tmp_path / "run", enabled=True, report_to=["wandb"])
    assert not (tmp_path / "run").exists()  # refused before anything was started or written
    MetricsLogger(tmp_path / "other", enabled=False, report_to=["wandb"])  # ranks that do not log need nothing


def test_default_logs_to_tensorboard_and_none_to_the_jsonl_only(tmp_path):
    logger = MetricsLogger(tmp_path / "tb", enabled=True)
    logger.log(1, {"reward/mean": 0.5})
    logger.close()
    assert list((tmp_path / "tb" / "tensorboard").glob("events.out.tfevents.*"))
    logger = MetricsLogger(tmp_path / "plain", enabled=True, report_to="none")
    logger.log(1, {"reward/mean": 0.5})
    logger.close()
    assert sorted(p.name for p in (tmp_path / "plain").iterdir()) == ["metrics.jsonl"]
    assert json.loads((tmp_path / "plain" / "metrics.jsonl").read_text()) == {"step": 1, "reward/mean": 0.5}


def fake_wandb(calls: list) -> types.ModuleType:
    module = types.ModuleType("wandb")

    class Run:
        def log(self, metrics, step):
            calls.append(("log", dict(metrics), step))

        def finish(self):
            calls.append(("finish",))

    def init(**kwargs):
        calls.append(("init", kwargs))
        return Run()

    module.init = init
    return module


def fake_mlflow(calls: list) -> types.ModuleType:
    module = types.ModuleType("mlflow")

    def start_run(run_id=None, run_name=None):
        calls.append(("start_run", run_id, run_name))
        return types.SimpleNamespace(info=types.SimpleNamespace(run_id=run_id or "mlflow-run-1"))

    module.set_experiment = lambda name: calls.append(("set_experiment", name))
    module.start_run = start_run
    module.log_dict = lambda data, path: calls.append(("log_dict", data, path))
    module.log_metrics = lambda metrics, step: calls.append(("log_metrics", dict(metrics), step))
    module.end_run = lambda: calls.append(("end_run",))
    return module


def test_wandb_gets_project_name_config_and_every_row_and_a_resumed_run_continues_it(monkeypatch, tmp_path):
    calls: list = []
    monkeypatch.setitem(sys.modules, "wandb", fake_wandb(calls))
    out = tmp_path / "run_a"
    logger = MetricsLogger(out, enabled=True, report_to=["wandb"], project="proj", config={"run": {"seed": 0}})
    logger.log(0, {"eval/score": 10.0})
    logger.log(1, {"reward/mean": 0.25})
    logger.close()
    init = calls[0][1]
    assert init["project"] == "proj" and init["name"] == "run_a" and init["config"] == {"run": {"seed": 0}}
    assert init["resume"] == "allow" and init["dir"] == str(out)
    assert calls[1:] == [("log", {"eval/score": 10.0}, 0), ("log", {"reward/mean": 0.25}, 1), ("finish",)]
    assert not (out / "tensorboard").exists()

    calls.clear()  # the same folder again (a resume): the same W&B run, a chosen name wins over the folder's
    MetricsLogger(out, enabled=True, report_to=["wandb"], project="proj", run_name="mine").close()
    assert calls[0][1]["id"] == init["id"] and calls[0][1]["name"] == "mine"


def test_mlflow_gets_an_experiment_a_run_the_config_and_metric_names_it_accepts(monkeypatch, tmp_path):
    calls: list = []
    monkeypatch.setitem(sys.modules, "mlflow", fake_mlflow(calls))
    out = tmp_path / "run_b"
    logger = MetricsLogger(out, enabled=True, report_to=["mlflow"], project="proj", run_name="r1",
                           config={"run": {"seed": 0}})
    logger.log(3, {"eval/pass@1": 0.5, "loss/kl_mean": 0.01})
    logger.close()
    assert calls == [
        ("set_experiment", "proj"),
        ("start_run", None, "r1"),
        ("log_dict", {"run": {"seed": 0}}, "config.json"),
        ("log_metrics", {"eval/pass_1": 0.5, "loss/kl_mean": 0.01}, 3),
        ("end_run",),
    ]
    calls.clear()
    MetricsLogger(out, enabled=True, report_to=["mlflow"], project="proj").close()
    assert calls == [("set_experiment", "proj"), ("start_run", "mlflow-run-1", None), ("end_run",)]


# -- curves.png -------------------------------------------------------------------------------------------------
def write_log(path, rows, torn_tail=True):
    text = "".join(json.dumps(row) + "\n" for row in rows)
    path.write_text(text + ('{"step": 9, "reward/me' if torn_tail else ""))  # a crash mid-write
    return path


def training_rows(steps=40, keys=None):
    rows = [{"step": 0, "eval/score": 5.0, "eval/reward_mean": 0.2, "eval/pass@1": 0.05}]
    for step in range(1, steps + 1):
        row = {"step": step, "reward/mean": step / steps, "reward/expert_mean": 1.9, "reward/accuracy": 0.1,
               "loss/kl_mean": 0.001 * step, "loss/entropy_mean": 2.0 - step / steps, "loss/clip_frac": 0.01,
               "response_length": 40.0 + step, "grad_norm": 1.0, "groups/action_source_ratio": 0.5 - step / (4 * steps),
               "time/step": 1.0}
        rows.append({k: v for k, v in row.items() if keys is None or k in keys or k == "step"})
        if step % 10 == 0:
            rows.append({"step": step, "eval/score": 5.0 + step, "eval/reward_mean": 0.2 + step / 50})
    return rows


@pytest.fixture
def drawn(monkeypatch):
    """The lines of every panel of the figures that plot_curves saves: {title: [(label, xs, ys), ...]}."""
    from matplotlib.figure import Figure

    seen = {}
    real_savefig = Figure.savefig

    def savefig(fig, *args, **kwargs):
        for ax in fig.axes:
            if ax.get_title():
                seen[ax.get_title()] = [(line.get_label(), list(line.get_xdata()), list(line.get_ydata()))
                                        for line in ax.get_lines()]
        return real_savefig(fig, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", savefig)
    return seen


def test_curves_show_every_learning_signal_with_the_step0_evaluation(tmp_path, drawn):
    log = write_log(tmp_path / "metrics.jsonl", training_rows())
    titles = plot_curves(log, tmp_path / "curves.png")
    assert titles == ALL_PANELS == [
        "reward (policy samples)", "held-out score", "held-out reward", "KL to the reference", "entropy",
        "clip fraction", "response length", "grad norm", "expert share of selected answers",
    ]
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert set(drawn) == set(titles)
    (label, xs, ys), = drawn["held-out score"]
    assert xs == [0, 10, 20, 30, 40] and ys == [5.0, 15.0, 25.0, 35.0, 45.0]
    labels = [line[0] for line in drawn["reward (policy samples)"]]
    assert "policy (EMA 2)" in labels and "expert answers (EMA 2)" in labels
    raw = next(line for line in drawn["reward (policy samples)"] if line[0].startswith("_"))  # unlabelled: raw
    assert raw[1] == list(range(1, 41)) and raw[2] == pytest.approx([s / 40 for s in range(1, 41)])


def test_panels_of_absent_keys_are_skipped(tmp_path, drawn):
    rows = training_rows(keys={"reward/mean", "grad_norm", "response_length", "loss/clip_frac"})  # beta=0: no KL
    titles = plot_curves(write_log(tmp_path / "metrics.jsonl", rows), tmp_path / "curves.png")
    assert titles == ["reward (policy samples)", "held-out score", "held-out reward", "clip fraction",
                      "response length", "grad norm"]
    assert [line[0] for line in drawn["reward (policy samples)"] if not line[0].startswith("_")] == ["policy (EMA 2)"]

    only_eval = [{"step": 0, "eval/score": 3.0}]  # the step-0 evaluation, before any training step
    assert plot_curves(write_log(tmp_path / "eval.jsonl", only_eval), tmp_path / "eval.png") == ["held-out score"]
    assert curve_panels([]) == []
    assert plot_curves(write_log(tmp_path / "empty.jsonl", [], torn_tail=False), tmp_path / "empty.png") == []
    assert (tmp_path / "empty.png").stat().st_size > 0


def test_curves_survive_odd_rows(tmp_path, drawn):
    rows = [{"step": 1, "reward/mean": 0.1, "grad_norm": None}, {"step": 2, "reward/mean": float("nan")},
            {"step": 3, "reward/mean": 0.3, "grad_norm": True}, {"step": 3, "eval/score": 1.0}]
    assert plot_curves(write_log(tmp_path / "m.jsonl", rows), tmp_path / "c.png") == ["reward (policy samples)",
                                                                                      "held-out score"]
    (label, xs, ys), = drawn["reward (policy samples)"]
    assert xs == [1, 2, 3] and ys[0] == 0.1 and math.isnan(ys[1])


def test_ema_starts_at_the_first_value_and_skips_nan():
    assert ema([1.0, 1.0, 1.0], span=5) == [1.0, 1.0, 1.0]
    assert ema([0.0, 3.0], span=2) == [0.0, 2.0]  # alpha = 2/3
    assert ema([float("nan"), 2.0, float("nan"), 4.0], span=1) == pytest.approx([math.nan, 2.0, 2.0, 4.0],
                                                                               nan_ok=True)
