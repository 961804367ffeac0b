"""Convergence on the embedded tiny default: plain GRPO, EKIPL (top-G), EKIPL replace (LUFFY-style) and SFT
on the expert's answers, at the same seeds, budget and config, scored beside the majority-class and random
baselines.

    python benchmarks/convergence.py [--seeds 0 1 2] [--steps 300] [--eval-every 50] [--jobs 2]

For each seed the warm-started tiny policy (what ``model.path: tiny`` builds: random weights, then
SFT on weak demonstrations) and the synthetic data are built once, and every method starts from them:

- ``grpo``: ``ekipl/train.py`` with no experts (the policy's own samples only);
- ``ekipl``: the config's experts, the top G of the pooled candidates by reward (the paper's rule);
- ``ekipl_replace``: ``group.select: replace`` and ``loss.expert_mode: shaped`` (LUFFY's fixed mix);
- ``sft_expert``: ``python -m ekipl.sft --demos expert``, supervised training on the same expert's answers
  (k per prompt, same error rate) for the same steps, prompts per step and optimiser settings.

Each run is a fresh process (``--run.resume=never``); runs go ``--jobs`` at a time with
``--threads`` intra-op threads each. Then every final policy, and the warm start, is sampled ``--samples``
times per test prompt at temperature 1 for pass@k. Held-out accuracy is the trainer's evaluation
(Reason-RFT's protocol: temperature 0.1, one sample). Writes ``convergence.json`` and ``convergence.png``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from ekipl.config import load_config  # noqa: E402
from ekipl.data import SYNTHETIC_TASK, load_records  # noqa: E402
from ekipl.data.synthetic import ANSWER_RANGE, chance_baselines, write_synthetic_dataset  # noqa: E402
from ekipl.tools.tiny_model import build_tiny_model  # noqa: E402
from cpu_model import cpu_model  # noqa: E402  (a sibling script module: benchmarks/ is on sys.path)

RL_METHODS: dict[str, list[str]] = {
    "grpo": ["--experts.experts=[]"],
    "ekipl": ["--group.select=topg"],
    "ekipl_replace": ["--group.select=replace", "--loss.expert_mode=shaped"],
}
SFT_METHOD = "sft_expert"
METHODS = (*RL_METHODS, SFT_METHOD)
LABELS = {
    "warm_start": "warm start (weak-demonstration SFT, before RL)",
    "grpo": "plain GRPO",
    "ekipl": "EKIPL (top-G)",
    "ekipl_replace": "EKIPL replace (LUFFY-style, shaped)",
    "sft_expert": "SFT on the expert's answers",
}
PASS_K = (1, 4, 8)  # those up to --samples


@dataclass
class Run:
    """One method at one seed: where it ran, its metrics rows and its wall time."""

    method: str
    seed: int
    folder: Path
    seconds: float = 0.0
    rows: list[dict] = field(default_factory=list)

    @property
    def model(self) -> Path:
        return self.folder / "hf_export"


def prepare_seed(work: Path, seed: int, cfg) -> tuple[Path, Path]:
    """The seed's warm-started tiny model and synthetic data, built as the trainer builds them (cached)."""
    folder = work / f"seed{seed}"
    model = folder / "tiny_model"
    if not (model / "config.json").is_file():
        build_tiny_model(model, seed=seed)
    data = folder / "data"
    if not (data / "test.jsonl").is_file():
        write_synthetic_dataset(data, n_train=cfg.data.synthetic_train, n_test=cfg.data.synthetic_test, seed=seed)
    return model, data


def run_method(run: Run, *, config: str, model: Path, data: Path, steps: int, eval_every: int, cfg, env: dict) -> Run:
    if run.folder.exists():
        shutil.rmtree(run.folder)
    run.folder.mkdir(parents=True)
    if run.method == SFT_METHOD:
        expert = cfg.experts.experts[0]
        cmd = [sys.executable, "-m", "ekipl.sft", "--model", str(model), "--data", str(data / "train.jsonl"),
               "--eval-data", str(data / "test.jsonl"), "--out", str(run.folder), "--demos", "expert",
               "--k", str(expert.k), "--error-rate", str(expert.error_rate), "--steps", str(steps),
               "--prompts-per-step", str(cfg.data.prompts_per_step), "--lr", str(cfg.optim.lr),
               "--warmup-steps", str(cfg.optim.warmup_steps), "--max-pixels", str(cfg.data.max_pixels),
               "--eval-every", str(eval_every), "--eval-max-new-tokens", str(cfg.eval.max_new_tokens),
               "--seed", str(run.seed)]
    else:
        cmd = [sys.executable, str(REPO / "ekipl" / "train.py"), "--config", config, f"--run.output_dir={run.folder}",
               f"--run.seed={run.seed}", f"--run.max_steps={steps}", f"--run.eval_every={eval_every}",
               "--run.save_every=0", "--run.resume=never", f"--model.path={model}", *RL_METHODS[run.method]]
    start = time.perf_counter()
    with (run.folder / "log.txt").open("w") as log:
        done = subprocess.run(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    run.seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{run.method} seed {run.seed} failed (exit {done.returncode}); see {run.folder / 'log.txt'}")
    run.rows = [json.loads(line) for line in (run.folder / "metrics.jsonl").read_text().splitlines()]
    return run


def sampled_pass_at_k(model: Path, data: Path, out: Path, *, samples: int, ks: tuple[int, ...], max_new_tokens: int,
                      max_pixels: int, seed: int, env: dict) -> dict:
    """pass@k over the test set from ``samples`` answers per prompt at temperature 1 (no top-k/top-p cut)."""
    cmd = [sys.executable, "-m", "ekipl.eval", "--model", str(model), "--data", str(data / "test.jsonl"),
           "--task", SYNTHETIC_TASK, "--image-root", str(data), "--out", str(out), "--n", str(samples),
           "--k", *map(str, ks), "--temperature", "1.0", "--top-p", "1.0", "--top-k", "0",
           "--max-new-tokens", str(max_new_tokens), "--max-pixels", str(max_pixels), "--seed", str(seed)]
    with (out.parent / f"{out.name}.log").open("w") as log:
        subprocess.run(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, check=True)
    return json.loads((out / f"{SYNTHETIC_TASK}_summary.json").read_text())


def series(rows: list[dict], key: str) -> list[tuple[int, float]]:
    return [(row["step"], row[key]) for row in rows if key in row]


def last(rows: list[dict], key: str) -> float:
    values = series(rows, key)
    return values[-1][1] if values else float("nan")


def mean_of(rows: list[dict], key: str, *, first: float = 0.0, end: float = 1.0) -> float:
    """The mean of ``key`` over the training steps in the fraction [first, end) of the run."""
    values = [value for _, value in series(rows, key)]
    if not values:
        return float("nan")
    part = values[int(first * len(values)) : max(int(end * len(values)), int(first * len(values)) + 1)]
    return sum(part) / len(part)


def run_summary(run: Run) -> dict:
    summary = {
        "accuracy": last(run.rows, "eval/score"),
        "heldout_reward": last(run.rows, "eval/reward_mean"),
        "format_rate": last(run.rows, "eval/format_rate"),
        "wall_s": run.seconds,
    }
    if run.method in RL_METHODS:
        summary.update({
            "train_reward_last_tenth": mean_of(run.rows, "reward/mean", first=0.9),
            "zero_variance_share": mean_of(run.rows, "groups/zero_variance_frac"),
            "expert_share": mean_of(run.rows, "groups/action_source_ratio"),
            "expert_share_first_quarter": mean_of(run.rows, "groups/action_source_ratio", end=0.25),
            "expert_share_last_quarter": mean_of(run.rows, "groups/action_source_ratio", first=0.75),
        })
    return summary


def spread(values: list[float]) -> dict:
    """Mean, sample standard deviation, min and max over seeds."""
    values = [v for v in values if v == v]
    if not values:
        return {"mean": float("nan"), "std": float("nan"), "min": float("nan"), "max": float("nan")}
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values)}


def machine() -> str:
    return f"{cpu_model(platform.processor() or 'unknown CPU')}, {os.cpu_count()} cores"


def git_commit() -> str:
    done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO, capture_output=True,
                           text=True).stdout.strip()
    return done.stdout.strip() + ("+uncommitted" if dirty else "") if done.returncode == 0 else "unknown"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(REPO / "configs" / "tiny_cpu.yaml"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=300, help="training steps of every method")
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--samples", type=int, default=8, help="answers per test prompt for pass@k (temperature 1)")
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads per run (OMP_NUM_THREADS)")
    parser.add_argument("--work", type=Path, default=REPO / "runs" / "convergence", help="run folders")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results", help="JSON and PNG")
    args = parser.parse_args()
    from tqdm import tqdm

    started, commit = time.perf_counter(), git_commit()
    ks = tuple(k for k in PASS_K if k <= args.samples)
    cfg = load_config(args.config)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    args.out.mkdir(parents=True, exist_ok=True)

    prepared = {seed: prepare_seed(args.work, seed, cfg) for seed in tqdm(args.seeds, desc="warm start + data per seed")}
    runs = [Run(method, seed, args.work / f"seed{seed}" / method) for seed in args.seeds for method in args.methods]
    with ThreadPoolExecutor(args.jobs) as pool, tqdm(total=len(runs), desc="training runs") as bar:
        futures = [pool.submit(run_method, run, config=args.config, model=prepared[run.seed][0], data=prepared[run.seed][1],
                               steps=args.steps, eval_every=args.eval_every, cfg=cfg, env=env) for run in runs]
        for future in futures:
            run = future.result()
            bar.write(f"{run.method} seed {run.seed}: held-out accuracy {last(run.rows, 'eval/score'):.1f} "
                      f"({run.seconds:.0f} s)")
            bar.update()

    models = [("warm_start", seed, prepared[seed][0], args.work / f"seed{seed}" / "warm_start_pass_at_k")
              for seed in args.seeds] + [(run.method, run.seed, run.model, run.folder / "pass_at_k") for run in runs]
    with ThreadPoolExecutor(args.jobs) as pool:
        pass_at_k = list(tqdm(pool.map(lambda item: sampled_pass_at_k(
            item[2], prepared[item[1]][1], item[3], samples=args.samples, ks=ks, max_new_tokens=cfg.eval.max_new_tokens,
            max_pixels=cfg.data.max_pixels, seed=item[1], env=env), models), total=len(models), desc="pass@k"))

    baselines = {}
    for seed in args.seeds:
        test = load_records(prepared[seed][1] / "test.jsonl", task=SYNTHETIC_TASK, image_root=prepared[seed][1])
        baselines[seed] = chance_baselines([record.gold_answer for record in test], ANSWER_RANGE, ks=ks)
    per_seed: dict[str, dict[int, dict]] = {}
    for run in runs:
        per_seed.setdefault(run.method, {})[run.seed] = run_summary(run)
    for seed in args.seeds:  # the warm start's held-out scores: any RL run's step-0 evaluation at that seed
        step0 = next((r for run in runs if run.seed == seed and run.method in RL_METHODS for r in run.rows
                      if r["step"] == 0 and "eval/score" in r), {})
        per_seed.setdefault("warm_start", {})[seed] = {"accuracy": step0.get("eval/score", float("nan")),
                                                      "heldout_reward": step0.get("eval/reward_mean", float("nan")),
                                                      "format_rate": step0.get("eval/format_rate", float("nan"))}
    for (method, seed, _, _), summary in zip(models, pass_at_k):
        per_seed[method][seed].update({f"pass@{k}": summary[f"pass@{k}"] for k in ks})

    order = ["warm_start", *args.methods]
    metrics = sorted({key for method in order for values in per_seed[method].values() for key in values})
    result = {
        "machine": machine(), "date": datetime.date.today().isoformat(), "commit": commit,
        "command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]), "config": args.config,
        "seeds": args.seeds, "steps": args.steps, "eval_every": args.eval_every, "samples_for_pass_at_k": args.samples,
        "pass_k": ks,
        "jobs": args.jobs, "threads_per_job": args.threads, "wall_s": time.perf_counter() - started,
        "baselines": {"per_seed": baselines, **{key: spread([b[key] for b in baselines.values()])
                                                for key in next(iter(baselines.values()))}},
        "per_seed": per_seed,
        "summary": {method: {key: spread([per_seed[method][s].get(key, float("nan")) for s in args.seeds])
                             for key in metrics} for method in order},
        "curves": {run.method: {} for run in runs},
    }
    for run in runs:
        result["curves"][run.method][run.seed] = {
            key: series(run.rows, key) for key in ("eval/score", "eval/reward_mean", "eval/format_rate", "reward/mean",
                                                   "groups/action_source_ratio", "groups/zero_variance_frac", "sft/loss")
            if series(run.rows, key)}
    (args.out / "convergence.json").write_text(json.dumps(result, indent=2))
    plot(result, order, args.out / "convergence.png")
    print(report(result, order))
    print(f"\nwrote {args.out / 'convergence.json'} and {args.out / 'convergence.png'} "
          f"({result['wall_s'] / 60:.1f} min)")
    return 0


def report(result: dict, order: list[str]) -> str:
    """The table: mean ± std over seeds, the chance baselines beside every score."""
    base, summary, ks = result["baselines"], result["summary"], result["pass_k"]

    def cell(method: str, key: str, scale: float = 1.0, digits: int = 1) -> str:
        value = summary[method].get(key)
        if value is None or value["mean"] != value["mean"]:
            return "-"
        return f"{value['mean'] * scale:.{digits}f} ± {value['std'] * scale:.{digits}f}"

    majority, random_guess = base["majority"]["mean"], base["random"]["mean"]
    lines = [
        f"held-out accuracy × 100 over seeds {result['seeds']}, {result['steps']} steps; baselines: majority class "
        f"{majority:.1f}, random {random_guess:.1f}; pass@k at temperature 1 from {result['samples_for_pass_at_k']} "
        "samples, chance: " + ", ".join(f"pass@{k} majority {base[f'majority_pass@{k}']['mean']:.1f} / random "
                                        f"{base[f'random_pass@{k}']['mean']:.1f}" for k in ks),
        "",
        "| method | accuracy | vs majority | majority | random | held-out reward (0-2) | format rate | "
        + " | ".join(f"pass@{k}" for k in ks) + " | zero-variance groups | expert share (first → last quarter) | wall s |",
        "|---|" + "---:|" * (9 + len(ks)),
    ]
    for method in order:
        accuracy = summary[method]["accuracy"]["mean"]
        has = lambda key: summary[method][key]["mean"] == summary[method][key]["mean"]  # noqa: E731 - not NaN
        expert = (f"{cell(method, 'expert_share', 100, 0)}% ({summary[method]['expert_share_first_quarter']['mean']:.0%} → "
                  f"{summary[method]['expert_share_last_quarter']['mean']:.0%})" if has("expert_share") else "-")
        zero = f"{cell(method, 'zero_variance_share', 100, 0)}%" if has("zero_variance_share") else "-"
        lines.append(
            f"| {LABELS[method]} | {cell(method, 'accuracy')} | {accuracy - majority:+.1f} | {majority:.1f} | "
            f"{random_guess:.1f} | {cell(method, 'heldout_reward', digits=2)} | {cell(method, 'format_rate', digits=2)} | "
            + " | ".join(cell(method, f"pass@{k}") for k in ks)
            + f" | {zero} | {expert} | {cell(method, 'wall_s', digits=0)} |")
    return "\n".join(lines)


def plot(result: dict, order: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    curves, base, ks = result["curves"], result["baselines"], result["pass_k"]
    colors = {"grpo": "tab:blue", "ekipl": "tab:red", "ekipl_replace": "tab:orange", "sft_expert": "tab:green",
              "warm_start": "tab:gray"}
    fig, axes = plt.subplots(2, 3, figsize=(16, 8.5))

    def band(ax, method: str, key: str, smooth: int = 1, scale: float = 1.0) -> None:
        per_seed = [values[key] for values in curves.get(method, {}).values() if key in values]
        if not per_seed:
            return
        length = min(len(s) for s in per_seed)
        steps = np.array([step for step, _ in per_seed[0][:length]])
        values = np.array([[value * scale for _, value in s[:length]] for s in per_seed])
        smooth = min(smooth, length)
        if smooth > 1:
            kernel = np.ones(smooth) / smooth
            values = np.array([np.convolve(row, kernel, mode="valid") for row in values])
            steps = steps[smooth - 1 :]
        mean, std = values.mean(0), values.std(0)
        ax.plot(steps, mean, color=colors[method], label=LABELS[method])
        ax.fill_between(steps, mean - std, mean + std, color=colors[method], alpha=0.15)

    def chance_lines(ax, scale: float = 1.0) -> None:
        ax.axhline(base["majority"]["mean"] * scale, color="black", linestyle="--", linewidth=1, label="majority class")
        ax.axhline(base["random"]["mean"] * scale, color="black", linestyle=":", linewidth=1, label="random")

    rl = [m for m in order if m in RL_METHODS]
    for method in order:
        band(axes[0, 0], method, "eval/score")
        band(axes[0, 1], method, "eval/reward_mean")
    chance_lines(axes[0, 0])
    for method in rl:
        band(axes[1, 0], method, "reward/mean", smooth=10)
        band(axes[1, 1], method, "groups/action_source_ratio", smooth=10, scale=100)
        band(axes[1, 2], method, "groups/zero_variance_frac", smooth=10, scale=100)
    axes[0, 0].set(title="held-out accuracy (temperature 0.1)", xlabel="step", ylabel="accuracy × 100")
    axes[0, 1].set(title="held-out reward (format + accuracy)", xlabel="step", ylabel="reward (0-2)")
    axes[1, 0].set(title="policy reward on training prompts (10-step mean)", xlabel="step", ylabel="reward (0-2)")
    axes[1, 1].set(title="expert share of selected answers (action source)", xlabel="step", ylabel="% of group")
    axes[1, 2].set(title="zero-variance groups", xlabel="step", ylabel="% of groups")

    ax = axes[0, 2]
    width = 0.8 / len(order)
    for index, method in enumerate(order):
        stats = [result["summary"][method].get(f"pass@{k}", {"mean": np.nan, "std": 0.0}) for k in ks]
        ax.bar(np.arange(len(ks)) + index * width, [s["mean"] for s in stats], width, yerr=[s["std"] for s in stats],
               color=colors[method], label=LABELS[method])
    for offset, k in enumerate(ks):
        x = [offset - width / 2, offset + len(order) * width - width / 2]
        ax.plot(x, [base[f"random_pass@{k}"]["mean"]] * 2, color="black", linestyle=":", linewidth=1)
        ax.plot(x, [base[f"majority_pass@{k}"]["mean"]] * 2, color="black", linestyle="--", linewidth=1)
    ax.set_xticks(np.arange(len(ks)) + width * (len(order) - 1) / 2, [f"pass@{k}" for k in ks])
    ax.set(title=f"pass@k, {result['samples_for_pass_at_k']} samples at temperature 1 (lines: chance)", ylabel="% solved")
    ax.legend(fontsize=7)
    for ax in axes.flat:
        ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=8)
    fig.suptitle(f"tiny Qwen2.5-VL on the synthetic counting task: mean ± std over seeds {result['seeds']} "
                 f"(commit {result['commit']}, {result['date']})")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
