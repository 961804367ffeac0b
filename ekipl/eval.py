"""Evaluate a policy on a test set with the benchmark's protocol, plus pass@k.

Reason-RFT's protocol: temperature 0.1, top_p 0.9, top_k 50, 768 new tokens, one sample per question;
the score is the mean per-question score × 100 (exact-or-equivalent answers for counting and GeoMath,
GeoMath also split into choice and non-choice questions; partial credit for TRANCE). With ``n > 1``
samples the score is averaged over samples, and pass@k (a question counts as solved by a sample with
full credit) uses the unbiased estimator ``1 - C(n - c, k) / C(n, k)``.

Writes ``{task}_predictions.jsonl`` (every sample's text and score) and ``{task}_summary.json``.

    python -m ekipl.eval --model PATH --data FILE --task T --image-root DIR --out DIR
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Sequence

import torch
from tqdm import tqdm

from ekipl.data import BadRecordError, Record, decode_completion, encode_prompt, load_records
from ekipl.data.tasks import STRUCTURE, is_choice_answer, task_family
from ekipl.rewards import eval_score_fn
from ekipl.rollout.base import RolloutEngine, SamplingParams

EVAL_SAMPLING = SamplingParams(temperature=0.1, top_p=0.9, top_k=50, max_new_tokens=768)
EVAL_MAX_PIXELS = 480_000
FULL_CREDIT = 1.0 - 1e-9


def pass_at_k(n: int, correct: int, k: int) -> float:
    """Unbiased pass@k from ``n`` samples of which ``correct`` are right: 1 - C(n-c, k) / C(n, k)."""
    if not 1 <= k <= n:
        raise ValueError(f"pass@{k} needs 1 <= k <= n samples (n={n})")
    if n - correct < k:
        return 1.0
    return 1.0 - math.comb(n - correct, k) / math.comb(n, k)


def subset_of(record: Record) -> str | None:
    """The benchmark's sub-split of a record: choice / non_choice for structure perception, else None."""
    if task_family(record.task) != STRUCTURE:
        return None
    return "choice" if is_choice_answer(record.gold_answer) else "non_choice"


def _summarise(rows: list[dict], n: int, k_values: Sequence[int]) -> dict:
    """Score × 100 and pass@k × 100 over ``rows`` (one per record, with its samples' ``scores``)."""
    summary = {"n_records": len(rows), "score": 100.0 * sum(sum(r["scores"]) / n for r in rows) / len(rows)}
    for k in k_values:
        solved = [pass_at_k(n, sum(s >= FULL_CREDIT for s in r["scores"]), k) for r in rows]
        summary[f"pass@{k}"] = 100.0 * sum(solved) / len(rows)
    return summary


def evaluate(
    engine: RolloutEngine,
    records: Sequence[Record],
    processor,
    *,
    task: str,
    out_dir: str | Path,
    sampling: SamplingParams = EVAL_SAMPLING,
    n: int = 1,
    k_values: Sequence[int] = (1,),
    max_pixels: int = EVAL_MAX_PIXELS,
    max_prompt_len: int = 4096,
    batch_size: int = 16,
    seed: int = 0,
    progress: bool = True,
    skip_bad_rows: bool = False,
) -> dict:
    """Generate ``n`` answers per record with ``engine``, score them and write predictions and a summary.

    Returns the summary: ``score`` and ``pass@k`` (× 100) over the test set, the same per subset
    (GeoMath's choice / non_choice), the sampling used and the files written. Sample ``j`` of record
    ``i`` is seeded with ``seed + i * n + j``, so a rerun reproduces it. A record that cannot be encoded
    (an image that fails to decode, a prompt over ``max_prompt_len``) raises :class:`BadRecordError`, or
    with ``skip_bad_rows`` is left out of the score and listed in ``skipped_ids``.
    """
    if not records:
        raise ValueError(f"no records to evaluate for task {task!r}")
    for k in k_values:
        if not 1 <= k <= n:
            raise ValueError(f"pass@{k} needs k between 1 and n={n} samples: raise n or drop k={k}")
    score_fn = eval_score_fn(task)
    tokenizer = processor.tokenizer
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    predictions_path = out_dir / f"{task}_predictions.jsonl"

    rows: list[dict] = []
    skipped_ids: list[str] = []
    with predictions_path.open("w", encoding="utf-8") as predictions, tqdm(
        total=len(records), desc=f"eval {task}", unit="q", disable=not progress
    ) as bar:
        for first in range(0, len(records), batch_size):
            chunk = records[first : first + batch_size]
            batch, prompts, seeds = [], [], []
            for index, record in enumerate(chunk, start=first):
                try:
                    prompts.append(encode_prompt(processor, record, max_pixels=max_pixels, max_prompt_len=max_prompt_len))
                except BadRecordError:
                    if not skip_bad_rows:
                        raise
                    skipped_ids.append(record.id)
                    continue
                batch.append(record)
                seeds.append([seed + index * n + j for j in range(n)])
            if not batch:
                bar.update(len(chunk))
                continue
            groups = engine.generate(prompts, n, sampling, seeds)
            if len(groups) != len(batch) or any(len(group) != n for group in groups):
                raise RuntimeError(
                    f"{type(engine).__name__}.generate returned {[len(g) for g in groups]} completions for "
                    f"{len(batch)} prompts x n={n}"
                )
            for record, group in zip(batch, groups):
                texts = [decode_completion(tokenizer, completion.token_ids) for completion in group]
                row = {
                    "id": record.id,
                    "task": task,
                    "subset": subset_of(record),
                    "gold": record.gold_answer,
                    "completions": texts,
                    "scores": [score_fn(text, record.gold_answer) for text in texts],
                    "finish_reasons": [completion.finish_reason for completion in group],
                }
                predictions.write(json.dumps(row) + "\n")
                rows.append(row)
            bar.update(len(chunk))
    if not rows:
        raise BadRecordError(f"no usable records to evaluate for task {task!r}: all {len(records)} were skipped as bad rows")

    summary = {"task": task, "n_samples": n, **_summarise(rows, n, k_values)}
    subsets = sorted({row["subset"] for row in rows if row["subset"] is not None})
    summary["subsets"] = {
        name: _summarise([row for row in rows if row["subset"] == name], n, k_values) for name in subsets
    }
    summary["truncated_share"] = sum(r["finish_reasons"].count("length") for r in rows) / (len(rows) * n)
    summary["sampling"] = {
        "temperature": sampling.temperature,
        "top_p": sampling.top_p,
        "top_k": sampling.top_k,
        "max_new_tokens": sampling.max_new_tokens,
    }
    summary["skipped_ids"] = skipped_ids
    summary["predictions"] = str(predictions_path)
    summary_path = out_dir / f"{task}_summary.json"
    summary["summary"] = str(summary_path)
    summary_path.write_text(json.dumps(summary, indent=2), encoding="utf-8")
    return summary


def held_out_rewards(predictions_path: str | Path, records: Sequence[Record], rewards) -> dict[str, float]:
    """The training reward (``rewards``, a :class:`~ekipl.rewards.RewardSet`) and format rate of an evaluation's
    answers: the held-out mean reward, beside the benchmark's score."""
    solutions = {r.id: r.solution for r in records}
    totals, formatted = [], []
    for line in Path(predictions_path).read_text().splitlines():
        row = json.loads(line)
        for text in row["completions"]:
            parts = rewards.components(text, solutions[row["id"]])
            totals.append(sum(parts.values()))
            formatted.append(float(parts.get("format", 0.0) > 0))
    return {"eval/reward_mean": sum(totals) / len(totals), "eval/format_rate": sum(formatted) / len(formatted)}


def format_table(summaries: Sequence[dict]) -> str:
    """A plain-text table: one line per test set and subset, score and pass@k columns."""
    metrics = sorted({key for s in summaries for key in s if key.startswith("pass@")}, key=lambda m: int(m[5:]))
    header = ["task", "n", "score", *metrics]
    lines = []
    for summary in summaries:
        parts = [(summary["task"], summary)] + [
            (f"  {summary['task']}/{name}", sub) for name, sub in summary.get("subsets", {}).items()
        ]
        for label, values in parts:
            lines.append([label, str(values["n_records"]), f"{values['score']:.2f}"]
                         + [f"{values[m]:.2f}" if m in values else "-" for m in metrics])
    widths = [max(len(row[i]) for row in [header, *lines]) for i in range(len(header))]

    def render(row: list[str]) -> str:  # first column left-aligned, numbers right-aligned
        return "  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))

    return "\n".join([render(header), render(["-" * w for w in widths]), *map(render, lines)])


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="local folder of the model and its processor")
    parser.add_argument("--data", required=True, help="test set: a JSON list or JSONL file of records")
    parser.add_argument("--task", required=True, help="task name, e.g. clevr-math, geomath, trance")
    parser.add_argument("--image-root", default=None, help="folder the records' image paths are relative to "
                        "(default: the data file's folder)")
    parser.add_argument("--out", required=True, help="folder for predictions and the summary")
    parser.add_argument("--n", type=int, default=1, help="samples per question (default 1, the benchmark's)")
    parser.add_argument("--k", type=int, nargs="+", default=[1], help="pass@k values to report (default 1)")
    parser.add_argument("--temperature", type=float, default=EVAL_SAMPLING.temperature)
    parser.add_argument("--top-p", type=float, default=EVAL_SAMPLING.top_p)
    parser.add_argument("--top-k", type=int, default=EVAL_SAMPLING.top_k)
    parser.add_argument("--max-new-tokens", type=int, default=EVAL_SAMPLING.max_new_tokens)
    parser.add_argument("--max-pixels", type=int, default=EVAL_MAX_PIXELS)
    parser.add_argument("--max-prompt-len", type=int, default=4096)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--limit", type=int, default=None, help="evaluate only the first N questions")
    parser.add_argument("--skip-bad-rows", action="store_true", help="skip (and count) unusable rows")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)

    from ekipl.models import load_policy, load_processor
    from ekipl.rollout.hf import HFEngine

    dataset = load_records(args.data, task=args.task, image_root=args.image_root, skip_bad_rows=args.skip_bad_rows)
    records = dataset.records[: args.limit]
    processor = load_processor(args.model)
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    model = load_policy(args.model, dtype=dtype, device=args.device)
    engine = HFEngine(model, processor, max_batch_size=args.batch_size * args.n)
    sampling = SamplingParams(
        temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, max_new_tokens=args.max_new_tokens
    )
    summary = evaluate(
        engine, records, processor, task=args.task, out_dir=args.out, sampling=sampling, n=args.n,
        k_values=args.k, max_pixels=args.max_pixels, max_prompt_len=args.max_prompt_len,
        batch_size=args.batch_size, seed=args.seed, skip_bad_rows=args.skip_bad_rows,
    )
    print(format_table([summary]))
    skipped = len(dataset.skipped) + len(summary["skipped_ids"])
    if skipped:
        print(f"skipped {skipped} bad row(s) of {args.data}")
    return summary


if __name__ == "__main__":
    main()
