"""Run outputs: metrics.jsonl, the trackers of ``run.report_to`` (TensorBoard, W&B, MLflow), and curves.png."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import sys
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence, Union

from .config_loader import ConfigError


class PhaseTimer:
    """Seconds spent in each named phase of a step."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start

    def as_metrics(self) -> dict[str, float]:
        return {f"time/{name}": value for name, value in self.seconds.items()}


TRACKERS = ("tensorboard", "wandb", "mlflow")
"""What ``run.report_to`` may name (besides ``none``), each with the package it needs."""
_TRACKER_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}
_IDS_FILE = "trackers.json"  # the W&B / MLflow run ids of this output folder, so a resumed run continues them
_MLFLOW_NAME = re.compile(r"[^\w./\- :]")  # characters MLflow refuses in metric names (``eval/pass@1``)


def normalize_report_to(report_to: Union[str, Sequence[str], None]) -> tuple[str, ...]:
    """``run.report_to`` as a tuple of tracker names: a bare string is one tracker, ``none`` (or ``[]``) is none.

    Raises ``ValueError`` naming ``run.report_to`` for an unknown tracker or ``none`` beside another.
    """
    names = (report_to,) if isinstance(report_to, str) else tuple(report_to or ())
    expected = f"a list of {', '.join(map(repr, TRACKERS))}, or 'none'"
    unknown = [name for name in names if name not in (*TRACKERS, "none")]
    if unknown or ("none" in names and len(names) > 1):
        raise ValueError(f"run.report_to={list(names)!r} is invalid: expected {expected}")
    return tuple(dict.fromkeys(name for name in names if name != "none"))


def missing_tracker_message(report_to: Union[str, Sequence[str], None]) -> Optional[str]:
    """What to do when a tracker named in ``run.report_to`` has no package installed; None when all are there."""
    trackers = normalize_report_to(report_to)
    missing = [name for name in trackers if not _installed(_TRACKER_PACKAGES[name])]
    if not missing:
        return None
    packages = " ".join(_TRACKER_PACKAGES[name] for name in missing)
    return (
        f"run.report_to={list(trackers)!r} names {', '.join(map(repr, missing))}, whose package is not installed: "
        f"pip install {packages}, or remove {' and '.join(map(repr, missing))} from run.report_to "
        "(run.report_to=none logs to metrics.jsonl only)"
    )


def _installed(package: str) -> bool:
    try:
        return importlib.util.find_spec(package) is not None
    except ValueError:  # in sys.modules without a spec (a stand-in module): importable
        return sys.modules.get(package) is not None


class MetricsLogger:
    """Appends one JSON line per ``log`` call (flushed) to ``metrics.jsonl`` and mirrors the scalars to the
    trackers of ``report_to``: ``tensorboard`` (``<out_dir>/tensorboard``), ``wandb`` and ``mlflow``.

    ``project`` is the W&B project and the MLflow experiment; ``run_name`` the run's name in both (default: the
    output folder's name). W&B and MLflow take their server and credentials from their own environment
    (``WANDB_API_KEY``/``WANDB_MODE``, ``MLFLOW_TRACKING_URI``). Their run ids are kept in
    ``<out_dir>/trackers.json``, so that a resumed run goes on logging into the same W&B / MLflow run (W&B
    ignores a step it has already seen: the steps replayed after a crash keep their first values there, while
    ``metrics.jsonl`` is rewritten). ``config`` (the resolved config as plain data) is stored with the run.
    A tracker whose package is missing raises :class:`ConfigError` saying what to install, before any is started.
    """

    def __init__(
        self,
        out_dir: Path,
        *,
        enabled: bool,
        report_to: Union[str, Sequence[str], None] = ("tensorboard",),
        project: str = "ekipl",
        run_name: Optional[str] = None,
        config: Any = None,
    ):
        out_dir = Path(out_dir)
        self.path = out_dir / "metrics.jsonl"
        self.enabled = enabled
        self.report_to = normalize_report_to(report_to)
        self._tb = None
        self._wandb = None
        self._mlflow = None
        if not enabled:
            return
        problem = missing_tracker_message(self.report_to)
        if problem:
            raise ConfigError(problem)
        out_dir.mkdir(parents=True, exist_ok=True)
        run_name = run_name or out_dir.resolve().name
        ids_file = out_dir / _IDS_FILE
        ids = json.loads(ids_file.read_text()) if ids_file.is_file() else {}
        if "tensorboard" in self.report_to:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(out_dir / "tensorboard"))
        if "wandb" in self.report_to:
            import wandb

            ids.setdefault("wandb", uuid.uuid4().hex[:16])
            ids_file.write_text(json.dumps(ids, indent=1) + "\n")
            self._wandb = wandb.init(project=project, name=run_name, id=ids["wandb"], resume="allow", config=config,
                                     dir=str(out_dir))
        if "mlflow" in self.report_to:
            import mlflow

            mlflow.set_experiment(project)
            if "mlflow" in ids:
                self._mlflow = mlflow.start_run(run_id=ids["mlflow"])
            else:
                self._mlflow = mlflow.start_run(run_name=run_name)
                ids["mlflow"] = self._mlflow.info.run_id
                ids_file.write_text(json.dumps(ids, indent=1) + "\n")
                if config is not None:
                    mlflow.log_dict(config, "config.json")

    def truncate_after(self, step: int) -> None:
        """On resume: drop lines past ``step`` so that the log reads as one uninterrupted run."""
        if not self.enabled or not self.path.exists():
            return
        kept = [line for line in self.path.read_text().splitlines() if _step_of(line) is not None and _step_of(line) <= step]
        # a new file renamed over the old one: a kill mid-write leaves either log whole, never an empty one
        staging = self.path.with_name(self.path.name + ".tmp")
        with staging.open("w") as f:
            f.write("".join(line + "\n" for line in kept))
            f.flush()
            os.fsync(f.fileno())
        os.replace(staging, self.path)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        if self._tb is not None:
            for key, value in metrics.items():
                self._tb.add_scalar(key, value, step)
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log(metrics, step=step)
        if self._mlflow is not None:
            import mlflow

            mlflow.log_metrics({_MLFLOW_NAME.sub("_", key): float(value) for key, value in metrics.items()}, step=step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None
        if self._mlflow is not None:
            import mlflow

            mlflow.end_run()
            self._mlflow = None


def _step_of(line: str) -> Optional[int]:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None  # a torn last line from a crash


def read_metrics(path: Path) -> list[dict[str, float]]:
    return [json.loads(line) for line in path.read_text().splitlines() if _step_of(line) is not None]


# The panels of curves.png, in order: (title, y label, [(key, label), ...]). The first series of a panel is its
# main one; a panel whose keys are all absent from the log is left out.
CURVE_PANELS: tuple[tuple[str, str, tuple[tuple[str, str], ...]], ...] = (
    ("reward (policy samples)", "reward", (("reward/mean", "policy"), ("reward/expert_mean", "expert answers"))),
    ("held-out score", "score", (("eval/score", "eval/score"),)),
    ("held-out reward", "reward", (("eval/reward_mean", "eval/reward_mean"),)),
    ("KL to the reference", "KL", (("loss/kl_mean", "loss/kl_mean"),)),
    ("entropy", "nats / token", (("loss/entropy_mean", "loss/entropy_mean"),)),
    ("clip fraction", "fraction of tokens", (("loss/clip_frac", "loss/clip_frac"),)),
    ("response length", "tokens", (("response_length", "policy samples"),)),
    ("grad norm", "norm", (("grad_norm", "grad_norm"),)),
    ("expert share of selected answers", "share", (("groups/action_source_ratio", "groups/action_source_ratio"),)),
)


def ema(values: Sequence[float], span: int) -> list[float]:
    """Exponential moving average with ``alpha = 2 / (span + 1)``, started at the first value; NaNs are skipped
    (they keep the previous average)."""
    alpha = 2.0 / (max(span, 1) + 1)
    out, average = [], math.nan
    for value in values:
        if math.isfinite(value):
            average = value if not math.isfinite(average) else average + alpha * (value - average)
        out.append(average)
    return out


def _series(rows: list[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of the rows that hold a number for ``key`` (eval rows hold only ``eval/*``)."""
    points = [(float(r["step"]), float(r[key])) for r in rows
              if isinstance(r.get(key), (int, float)) and not isinstance(r.get(key), bool)]
    return [p[0] for p in points], [p[1] for p in points]


def curve_panels(rows: list[dict[str, Any]]) -> list[str]:
    """The titles of the panels :func:`plot_curves` draws for these metric rows."""
    return [title for title, _, series in CURVE_PANELS if any(_series(rows, key)[0] for key, _ in series)]


def plot_curves(metrics_path: Path, out_png: Path) -> list[str]:
    """curves.png: does it learn? One panel per quantity of :data:`CURVE_PANELS` that the log holds.

    Training curves are drawn raw (thin) and smoothed (an EMA spanning about a fifteenth of the steps); the held-out
    panels mark each evaluation, the step-0 one included. Every panel spans the same steps. Returns the titles
    of the panels drawn (none: the PNG says that there are no metrics yet).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(Path(metrics_path))
    titles = curve_panels(rows)
    panels = [panel for panel in CURVE_PANELS if panel[0] in titles]
    columns = min(3, max(len(panels), 1))
    lines = max(math.ceil(len(panels) / columns), 1)
    fig, axes = plt.subplots(lines, columns, figsize=(4.8 * columns, 3.3 * lines), squeeze=False)
    steps = [float(r["step"]) for r in rows]
    for ax, (title, ylabel, series) in zip(axes.flat, panels):
        for index, (key, label) in enumerate(series):
            x, y = _series(rows, key)
            if not x:
                continue
            color = f"C{index}"
            if key.startswith("eval/"):
                ax.plot(x, y, marker="o", color=color, label=label)
                continue
            span = max(len(y) // 15, 1)
            if span > 1:
                ax.plot(x, y, color=color, alpha=0.3, linewidth=0.8)
                ax.plot(x, ema(y, span), color=color, linewidth=1.8, label=f"{label} (EMA {span})")
            else:
                ax.plot(x, y, color=color, marker="." if len(y) < 50 else None, label=label)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        if steps and min(steps) < max(steps):
            margin = 0.02 * (max(steps) - min(steps))  # room for the markers at either end
            ax.set_xlim(min(steps) - margin, max(steps) + margin)
        ax.grid(alpha=0.3)
        labels = ax.get_legend_handles_labels()[1]
        if len(labels) > 1 or any("EMA" in label for label in labels):
            ax.legend(fontsize="small")
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    if not panels:
        axes.flat[0].text(0.5, 0.5, "no metrics yet", ha="center", va="center", transform=axes.flat[0].transAxes)
    fig.suptitle(f"{Path(metrics_path).resolve().parent.name}: up to step {max(steps, default=0):g}")
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return titles


def peak_memory_gb(device) -> float:
    """Peak accelerator memory on CUDA; peak resident memory of the process elsewhere."""
    import torch

    if getattr(device, "type", str(device)) == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB
