"""Precompute expert answers for a dataset, for a ``cache`` expert to serve during training.

    python -m ekipl.experts.generate --config CFG.yaml --out answers.jsonl [--expert NAME ...]

The YAML holds a ``data`` section (``path``, ``task``, ``image_root``) and an ``experts`` section (the pool's
config, as in a training config). Every online expert (``openai``, ``sglang``) is asked, or only those named
with ``--expert``. Each (record, expert) that got answers becomes one line of ``--out``; a rerun skips the
pairs already there (resumable); with ``experts.cache_dir`` set, answers that arrived before an interrupt
mid-batch are not paid for twice either.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Optional, Sequence

from ekipl.config_loader import from_dict, load_yaml
from ekipl.data.records import Record, load_records
from ekipl.experts.config import ExpertConfig, ExpertPoolConfig
from ekipl.experts.jsonl import JsonlAppender, read_jsonl
from ekipl.experts.pool import ExpertPool


@dataclasses.dataclass(frozen=True)
class DataSource:
    """path: the JSON / JSONL records; task: their task name; image_root: where image paths resolve
    (default: the data file's folder)."""

    path: str
    task: str
    image_root: Optional[str] = None


def load_generate_config(path: str | Path) -> tuple[DataSource, ExpertPoolConfig]:
    raw = load_yaml(path)
    unknown = sorted(set(raw) - {"data", "experts"})
    if unknown:
        raise ValueError(f"{path}: unknown section(s) {unknown}; expected 'data' and 'experts'")
    if "data" not in raw:
        raise ValueError(f"{path}: no 'data' section (path, task, image_root)")
    return from_dict(DataSource, raw["data"], "data."), from_dict(ExpertPoolConfig, raw.get("experts"), "experts.")


def select_experts(config: ExpertPoolConfig, names: Sequence[str]) -> list[ExpertConfig]:
    """The online experts named (all online experts when ``names`` is empty)."""
    online = [expert for expert in config.experts if expert.is_online]
    if not names:
        if not online:
            raise ValueError("the config has no online expert (kind openai or sglang) to generate answers with")
        return online
    by_name = {expert.name: expert for expert in online}
    missing = [name for name in names if name not in by_name]
    if missing:
        raise ValueError(f"no online expert named {missing}; online experts in the config: {sorted(by_name)}")
    return [by_name[name] for name in names]


def answer_row(record: Record, expert: ExpertConfig, answers) -> dict:
    """One output line: a record's answers from one expert (token ids only where the expert kept its own)."""
    stored = []
    for answer in answers:
        item = {"sample_index": answer.sample_index, "text": answer.text, "finish_reason": answer.finish_reason}
        if answer.token_ids is not None:
            item["token_ids"] = answer.token_ids
        if answer.logprobs is not None:
            item["logprobs"] = answer.logprobs
        stored.append(item)
    return {"id": record.id, "expert": expert.name, "model": expert.model, "answers": stored}


def generate(
    records: Sequence[Record],
    pool_config: ExpertPoolConfig,
    experts: Sequence[ExpertConfig],
    out: str | Path,
    *,
    batch_size: int,
    progress: bool = True,
) -> dict[str, dict[str, int]]:
    """Ask each expert for the records it has not answered in ``out`` yet, appending a line per record;
    returns per expert how many records were written, already there, and left without an answer."""
    from tqdm import tqdm

    rows, _ = read_jsonl(out)
    done = {(str(row.get("id")), row.get("expert")) for row in rows}
    appender = JsonlAppender(out)
    summary = {}
    try:
        for expert in experts:
            todo = [record for record in records if (record.id, expert.name) not in done]
            tally = {"written": 0, "skipped": len(records) - len(todo), "unanswered": 0}
            config = dataclasses.replace(pool_config, experts=(expert,), infuse_when="always")
            with ExpertPool(config) as pool, tqdm(total=len(todo), desc=expert.name, disable=not progress) as bar:
                for start in range(0, len(todo), batch_size):
                    batch = todo[start : start + batch_size]
                    for record, answers in zip(batch, pool.collect(pool.submit(batch))):
                        if answers:
                            appender.append(answer_row(record, expert, answers))
                            tally["written"] += 1
                        else:
                            tally["unanswered"] += 1
                    bar.update(len(batch))
                    bar.set_postfix(written=tally["written"], unanswered=tally["unanswered"])
            summary[expert.name] = tally
    finally:
        appender.close()
    return summary


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML with 'data' and 'experts' sections")
    parser.add_argument("--out", required=True, help="JSONL file to append answers to (created if missing)")
    parser.add_argument("--expert", action="append", default=[], help="only this online expert (repeatable)")
    parser.add_argument("--limit", type=int, default=0, help="only the first N records (0: all)")
    parser.add_argument("--batch-size", type=int, default=64, help="records asked at once (default 64)")
    parser.add_argument(
        "--timeout-s", type=float, default=900.0,
        help="deadline of each batch in seconds (default 900; answers not in by then are left for a rerun)",
    )
    args = parser.parse_args(argv)
    if args.batch_size < 1 or args.timeout_s <= 0:
        parser.error(f"--batch-size must be >= 1 and --timeout-s > 0, got {args.batch_size} and {args.timeout_s}")
    data, pool_config = load_generate_config(args.config)
    pool_config = dataclasses.replace(pool_config, expert_timeout_s=args.timeout_s)
    experts = select_experts(pool_config, args.expert)
    records = list(load_records(data.path, task=data.task, image_root=data.image_root))
    if args.limit > 0:
        records = records[: args.limit]
    summary = generate(records, pool_config, experts, args.out, batch_size=args.batch_size)
    for name, tally in summary.items():
        print(
            f"{name}: {tally['written']} records written, {tally['skipped']} already in {args.out}, "
            f"{tally['unanswered']} without an answer (rerun to retry them)",
            file=sys.stderr,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
