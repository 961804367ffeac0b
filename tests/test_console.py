"""The console: a plain metrics line per log_every steps off a terminal, evaluation lines, the closing summary."""

from __future__ import annotations

import io
from pathlib import Path

from ekipl.console import Console, eval_line, format_duration, metrics_line


def test_off_a_terminal_a_metrics_line_every_log_every_steps():
    stream = io.StringIO()
    console = Console(enabled=True, total=4, initial=0, log_every=2, stream=stream)
    assert not console.interactive
    for step in range(1, 5):
        console.step(step, {"reward/mean": 0.5 * step, "reward/mean_std": 0.25, "loss": 0.0123, "time/step": 2.0,
                            "time/rollout": 1.5, "time/update": 0.5})
    lines = stream.getvalue().splitlines()
    assert lines == ["[ekipl] step 2/4 | reward 1.000 ± 0.250 | loss 0.0123 | s/step 2.00",
                     "[ekipl] step 4/4 | reward 2.000 ± 0.250 | loss 0.0123 | s/step 2.00"]
    console.evaluation(4, {"eval/score": 41.5, "eval/pass@1": 41.5, "eval/reward_mean": 1.2, "eval/format_rate": 0.9})
    console.summary(steps_done=4, out_dir=Path("runs/x"))
    tail = stream.getvalue().splitlines()[2:]
    assert tail[0] == "[ekipl] step 4 eval: score 41.50, pass@1 41.50, reward 1.200, format 0.90"
    assert tail[1].startswith("[ekipl] final step 4 eval: score 41.50")
    assert tail[2].startswith("[ekipl] done: 4/4 steps in 0m0") and tail[2].endswith("time per phase: rollout 75%, update 25%")
    assert tail[3].startswith("[ekipl] outputs in runs/x: metrics.jsonl")


def test_other_ranks_stay_silent():
    stream = io.StringIO()
    console = Console(enabled=False, total=2, initial=0, log_every=1, stream=stream)
    console.step(1, {"reward/mean": 1.0})
    console.say("hello")
    console.evaluation(1, {"eval/score": 1.0})
    assert stream.getvalue() == ""


def test_formats():
    assert format_duration(3725) == "1h02m05s" and format_duration(65.4) == "1m05s"
    assert metrics_line(3, 10, {}) == "step 3/10"
    assert eval_line(0, {"eval/score": 10.0, "eval/skipped_rows": 2.0}) == "step 0 eval: score 10.00, 2 bad rows skipped"
