"""What a run tells the person watching it: progress, each evaluation, where things were written, a summary.

On a terminal a progress bar carries the latest reward and loss; in a log file (stderr not a TTY) a plain
line of the main metrics is printed every ``run.log_every`` steps instead. Events (evaluations,
checkpoints, the export) are printed as they happen, and the run ends with a summary: final evaluation,
wall time, the share of time spent in each phase, and the output folder.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Optional, TextIO

# (metric, label, format) of the plain metrics line, in order; absent metrics are left out
LINE_FIELDS = (
    ("reward/mean", "reward", "{:.3f}"),
    ("groups/action_source_ratio", "expert share", "{:.2f}"),
    ("loss", "loss", "{:.4g}"),
    ("loss/kl_mean", "kl", "{:.4g}"),
    ("loss/entropy_mean", "entropy", "{:.3f}"),
    ("loss/clip_frac", "clip", "{:.3f}"),
    ("grad_norm", "grad norm", "{:.3g}"),
    ("lr", "lr", "{:.2e}"),
    ("response_length", "length", "{:.1f}"),
    ("time/step", "s/step", "{:.2f}"),
)


def format_duration(seconds: float) -> str:
    minutes, seconds = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{seconds:02d}s" if hours else f"{minutes}m{seconds:02d}s"


def metrics_line(step: int, total: int, metrics: dict[str, float]) -> str:
    parts = [f"step {step}/{total}"]
    for key, label, fmt in LINE_FIELDS:
        if key in metrics:
            value = fmt.format(metrics[key])
            if key == "reward/mean" and "reward/mean_std" in metrics:
                value += f" ± {metrics['reward/mean_std']:.3f}"
            parts.append(f"{label} {value}")
    return " | ".join(parts)


def eval_line(step: int, metrics: dict[str, float]) -> str:
    parts = [f"score {metrics['eval/score']:.2f}"] if "eval/score" in metrics else []
    parts += [f"{key[5:]} {value:.2f}" for key, value in sorted(metrics.items()) if key.startswith("eval/pass@")]
    if "eval/reward_mean" in metrics:
        parts.append(f"reward {metrics['eval/reward_mean']:.3f}")
    if "eval/format_rate" in metrics:
        parts.append(f"format {metrics['eval/format_rate']:.2f}")
    if metrics.get("eval/skipped_rows"):
        parts.append(f"{int(metrics['eval/skipped_rows'])} bad rows skipped")
    return f"step {step} eval: " + ", ".join(parts)


class Console:
    """Rank 0's voice; every other rank stays silent (``enabled=False``)."""

    def __init__(self, *, enabled: bool, total: int, initial: int, log_every: int, stream: Optional[TextIO] = None):
        self.enabled, self.total, self.log_every = enabled, total, log_every
        self.stream = stream or sys.stderr
        self.interactive = enabled and self.stream.isatty()
        self.started = time.perf_counter()
        self.phase_seconds: dict[str, float] = {}
        self.last_eval: dict[str, float] = {}
        self._bar = None
        if self.interactive:
            from tqdm import tqdm

            self._bar = tqdm(total=total, initial=initial, desc="ekipl", dynamic_ncols=True, file=self.stream)

    def say(self, text: str) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(f"[ekipl] {text}", file=self.stream)
        else:
            print(f"[ekipl] {text}", file=self.stream, flush=True)

    def step(self, step: int, metrics: dict[str, float]) -> None:
        for key, value in metrics.items():
            if key.startswith("time/") and key != "time/step":
                self.phase_seconds[key[5:]] = self.phase_seconds.get(key[5:], 0.0) + value
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(1)
            if step % self.log_every == 0:
                self._bar.set_postfix({label: fmt.format(metrics[key]) for key, label, fmt in LINE_FIELDS[:3] if key in metrics})
        elif step % self.log_every == 0 or step == self.total:
            self.say(metrics_line(step, self.total, metrics))

    def evaluation(self, step: int, metrics: dict[str, float]) -> None:
        if metrics:
            self.last_eval = {"step": step, **metrics}
            self.say(eval_line(step, metrics))

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def summary(self, *, steps_done: int, out_dir: Path) -> None:
        """The closing lines: final evaluation, wall time and phase shares, and what was written where."""
        if self.last_eval:
            self.say("final " + eval_line(int(self.last_eval["step"]), self.last_eval))
        spent = sum(self.phase_seconds.values())
        shares = ", ".join(f"{name} {100 * seconds / spent:.0f}%" for name, seconds in
                           sorted(self.phase_seconds.items(), key=lambda item: -item[1]) if seconds / spent >= 0.005)
        self.say(f"done: {steps_done}/{self.total} steps in {format_duration(time.perf_counter() - self.started)}"
                 + (f"; time per phase: {shares}" if spent > 0 else ""))
        self.say(f"outputs in {out_dir}: metrics.jsonl, curves.png, checkpoints/, eval/, hf_export/")
