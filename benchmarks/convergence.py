"""EKIPL vs plain GRPO on the embedded tiny default: same seed, same policy samples, same steps.

    python benchmarks/convergence.py [--steps 80] [--out benchmarks/results]

Runs ``ekipl/train.py`` twice in fresh processes (run folders under ``--work``) — once with the config's
experts, once with none (plain GRPO) — evaluates both on the held-out split, and writes
``convergence.json`` and ``convergence.png`` into ``--out`` (training reward per step, held-out mean
reward at each evaluation).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def train(name: str, config: str, out: Path, steps: int, eval_every: int, extra: list[str]) -> list[dict]:
    run_dir = out / name
    cmd = [sys.executable, str(REPO / "ekipl" / "train.py"), "--config", config, f"--run.output_dir={run_dir}",
           f"--run.max_steps={steps}", f"--run.eval_every={eval_every}", f"--run.save_every={steps}",
           "--run.resume=never", *extra]
    print(f"[convergence] {name}: {' '.join(cmd)}", flush=True)
    subprocess.run(cmd, check=True, cwd=REPO)
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def step_rows(rows: list[dict]) -> list[dict]:
    """The training steps' rows (evaluations are logged as rows of their own, holding eval/* only)."""
    return [r for r in rows if "reward/mean" in r]


def final(rows: list[dict], key: str) -> float:
    values = [r[key] for r in rows if key in r]
    return values[-1] if values else float("nan")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(REPO / "configs" / "tiny_cpu.yaml"))
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--eval-every", type=int, default=20)
    parser.add_argument("--work", type=Path, default=REPO / "runs" / "convergence", help="run folders")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results", help="JSON and PNG")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    runs = {
        "ekipl": train("ekipl", args.config, args.work, args.steps, args.eval_every, []),
        "grpo": train("grpo", args.config, args.work, args.steps, args.eval_every, ["--experts.experts=[]"]),
    }
    summary = {
        name: {
            "heldout_reward_mean": final(rows, "eval/reward_mean"),
            "heldout_accuracy": final(rows, "eval/score"),
            "heldout_format_rate": final(rows, "eval/format_rate"),
            "train_reward_last5": sum(r["reward/mean"] for r in step_rows(rows)[-5:]) / len(step_rows(rows)[-5:]),
            "action_source_ratio_mean": sum(r["groups/action_source_ratio"] for r in step_rows(rows)) / len(step_rows(rows)),
            "zero_variance_frac_mean": sum(r["groups/zero_variance_frac"] for r in step_rows(rows)) / len(step_rows(rows)),
        }
        for name, rows in runs.items()
    }
    result = {"config": args.config, "steps": args.steps, "runs": summary,
              "curves": {name: [{k: r[k] for k in ("step", "reward/mean", "eval/reward_mean") if k in r} for r in rows]
                         for name, rows in runs.items()}}
    (args.out / "convergence.json").write_text(json.dumps(result, indent=2))
    plot(runs, args.out / "convergence.png")

    print(f"\n{'run':8} {'held-out reward':>16} {'held-out acc':>13} {'format rate':>12} {'train reward (last 5)':>22}")
    for name, s in summary.items():
        print(f"{name:8} {s['heldout_reward_mean']:16.3f} {s['heldout_accuracy']:13.1f} {s['heldout_format_rate']:12.2f} "
              f"{s['train_reward_last5']:22.3f}")
    print(f"\nwrote {args.out / 'convergence.json'} and {args.out / 'convergence.png'}")
    return 0


def plot(runs: dict[str, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (train_ax, eval_ax) = plt.subplots(1, 2, figsize=(10, 3.6))
    for name, rows in runs.items():
        train_ax.plot([r["step"] for r in step_rows(rows)], [r["reward/mean"] for r in step_rows(rows)], label=name)
        points = [(r["step"], r["eval/reward_mean"]) for r in rows if "eval/reward_mean" in r]
        eval_ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=name)
    train_ax.set(title="policy reward (training prompts)", xlabel="step", ylabel="reward (format + accuracy)")
    eval_ax.set(title="held-out mean reward", xlabel="step", ylabel="reward (format + accuracy)")
    for ax in (train_ax, eval_ax):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
