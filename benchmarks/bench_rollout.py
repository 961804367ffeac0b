"""Rollout throughput: the HF engine and (on CUDA, where installed) SGLang on the same prompts.

Each engine samples ``--n`` completions for each of ``--prompts`` synthetic-task prompts (an image and a
counting question each); the table gives completion tokens per second and the share of prompt tokens that
came from a prefix cache (SGLang's ``cached_tokens``; for the HF engine, the group's shared prefill). With
SGLang, one weight sync of the policy (bucketed ``update_weights_from_tensor``) is timed as well.

    python benchmarks/bench_rollout.py                      # tiny model, built on the fly (CPU or GPU)
    python benchmarks/bench_rollout.py --model /models/Qwen2.5-VL-3B-Instruct --prompts 64 --n 8

Prints a table and writes JSON (``--out``).
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import subprocess
import tempfile
import time
from dataclasses import asdict, fields
from pathlib import Path

import torch

from ekipl.data import SYNTHETIC_TASK
from ekipl.data.prompts import encode_prompt
from ekipl.data.records import load_records
from ekipl.data.synthetic import write_synthetic_dataset
from ekipl.models import load_policy, load_processor
from ekipl.data import Prompt
from ekipl.rollout.base import GenerateStats, SamplingParams
from ekipl.rollout.hf import HFEngine
from ekipl.tools.tiny_model import build_tiny_model
from cpu_model import cpu_model  # noqa: E402  (a sibling script module: benchmarks/ is on sys.path)


def synthetic_prompts(processor, count: int, workdir: Path, max_pixels: int) -> list[Prompt]:
    dataset = write_synthetic_dataset(workdir / "data", n_train=count, n_test=1, seed=0)
    records = load_records(dataset.train, task=SYNTHETIC_TASK, image_root=dataset.image_root)
    return [encode_prompt(processor, record, max_pixels=max_pixels, max_prompt_len=8192) for record in records]


def seeds_for(prompts: list[Prompt], n: int, offset: int) -> list[list[int]]:
    return [[offset + i * n + j for j in range(n)] for i in range(len(prompts))]


def timed_rounds(engine, prompts, n, sampling, rounds: int) -> GenerateStats:
    """One warm-up call on a quarter of the prompts, then ``rounds`` timed calls (fresh seeds each), summed."""
    warm = prompts[: max(1, len(prompts) // 4)]
    engine.generate(warm, n, sampling, seeds_for(warm, n, offset=10**6))
    total = GenerateStats(0, 0, 0, 0, 0, 0.0)
    for round_index in range(rounds):
        engine.generate(prompts, n, sampling, seeds_for(prompts, n, offset=round_index * 10**4))
        total = GenerateStats(*(getattr(total, f.name) + getattr(engine.last_stats, f.name) for f in fields(total)))
    return total


def row(engine: str, stats: GenerateStats, extra: dict | None = None) -> dict:
    return {
        "engine": engine,
        "samples": stats.samples,
        "completion_tokens": stats.completion_tokens,
        "seconds": round(stats.seconds, 3),
        "tokens_per_s": round(stats.completion_tokens_per_second, 1),
        "prefix_hit_rate": round(stats.prefix_hit_rate, 3),
        **(extra or {}),
    }


def machine() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"{cpu_model()} ({torch.get_num_threads()} threads)"


def commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).parent,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="local model folder (default: build the tiny model in a temp folder)")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--n", type=int, default=8, help="samples per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=2, help="timed generate calls per engine")
    parser.add_argument("--max-batch-size", type=int, default=64, help="HF engine rows decoded together")
    parser.add_argument("--max-pixels", type=int, default=480_000)
    parser.add_argument("--engines", default="hf,sglang", help="comma list of hf, sglang (sglang: CUDA only)")
    parser.add_argument("--mem-fraction", type=float, default=0.5, help="SGLang mem_fraction_static")
    parser.add_argument("--bucket-mb", type=int, default=512, help="weight-sync bucket size for SGLang")
    parser.add_argument(
        "--sglang-args", default="{}", help='other sglang ServerArgs as JSON, e.g. \'{"attention_backend": "triton"}\''
    )
    parser.add_argument("--out", default="outputs/bench/rollout.json")
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    engines = set(args.engines.split(","))
    sampling = SamplingParams(args.temperature, args.top_p, args.top_k, args.max_new_tokens)
    workdir = Path(tempfile.mkdtemp(prefix="bench_rollout_"))
    model_path = Path(args.model) if args.model else build_tiny_model(workdir / "tiny_model")
    processor = load_processor(model_path)
    prompts = synthetic_prompts(processor, args.prompts, workdir, args.max_pixels)
    results = []

    policy = load_policy(model_path, dtype=dtype, device=device)
    if "hf" in engines:
        engine = HFEngine(policy, processor, max_batch_size=args.max_batch_size)
        results.append(row("hf", timed_rounds(engine, prompts, args.n, sampling, args.rounds)))
        del engine
    if "sglang" in engines:
        if device.type != "cuda" or importlib.util.find_spec("sglang") is None:
            print("sglang: skipped (needs CUDA and the sglang package)")
        else:
            from ekipl.rollout.sglang import SGLangEngine, SGLangLaunchArgs

            gc.collect()
            torch.cuda.empty_cache()
            launch = SGLangLaunchArgs(
                model_path=str(model_path),
                mem_fraction_static=args.mem_fraction,
                extra_args=json.loads(args.sglang_args),
            )
            engine = SGLangEngine.launch(launch, bucket_bytes=args.bucket_mb * 1024 * 1024)
            try:
                stats = timed_rounds(engine, prompts, args.n, sampling, args.rounds)
                engine.release_memory()
                sync = engine.update_weights(policy.named_parameters())
                results.append(
                    row(
                        "sglang",
                        stats,
                        {
                            "sync_bytes": sync.bytes,
                            "sync_buckets": sync.buckets,
                            "sync_seconds": round(sync.seconds, 3),
                        },
                    )
                )
            finally:
                engine.shutdown()

    header = ("engine", "samples", "completion_tokens", "seconds", "tokens_per_s", "prefix_hit_rate")
    print(f"{args.prompts} prompts x n={args.n}, max_new_tokens={args.max_new_tokens}, on {machine()}")
    print(" | ".join(f"{h:>17}" for h in header))
    for result in results:
        print(" | ".join(f"{result[h]!s:>17}" for h in header))
        if "sync_bytes" in result:
            print(
                f"  weight sync: {result['sync_bytes'] / 2**20:.1f} MiB in {result['sync_buckets']} buckets, "
                f"{result['sync_seconds']} s"
            )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "benchmark": "rollout",
                "machine": machine(),
                "commit": commit(),
                "date": time.strftime("%Y-%m-%d"),
                "model": str(args.model or "tiny"),
                "prompts": args.prompts,
                "n": args.n,
                "sampling": asdict(sampling),
                "results": results,
            },
            indent=2,
        )
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
