"""CPU benchmark of the fused GRPO loss: forward + backward time and peak extra memory.

Compared on the same inputs, in one process, at H=512, V=151936 fp32 and N in {256, 1024, 4096}:

* ``ekipl cpu``: :func:`ekipl_kernels.fused_linear_grpo_loss` with the fused C++ op (``backend="cpu"``).
* ``reference-style``: ``ekipl_kernels.reference.grpo_loss`` step by step but in fp32 (the reference
  itself runs in fp64 and is the oracle of the tests, not a speed contender): whole ``[N, V]`` logits
  with autograd, divided by the temperature, entropy always computed as the reference does.
* ``materialised``: the same whole-logits autograd path doing only what the config needs (no entropy,
  no division at temperature 1), as a careful user would write it: the stronger baseline.
* ``ekipl chunked``: the portable torch backend (``backend="chunked"``).
* ``liger``: Liger-Kernel's ``LigerFusedLinearGRPOLoss`` (``loss_type="dapo"``, i.e. token-mean, k3 KL,
  torch.compile'd loss math, one sequence per chunk), which recomputes the logits in its backward.

The loss is the same for all five: policy-token clipped ratio with old log-probs, k3 KL (beta 0.04) to
reference log-probs, token-mean over 128-token sequences, temperature 1; the table shows each loss so
that the agreement is visible. ``--ratio-level sequence`` makes the ratio GSPO's (one per sequence; Liger's
``importance_sampling_level="sequence"``), which the fused backends run in two passes.

Time: forward + ``backward()`` with ``torch.set_num_threads(2)``, after one warm-up run of every method
(which also pays for torch.compile and the JIT build). The methods take turns in each of ``--repeats``
rounds, so that load from other processes on a shared machine falls on all of them alike; the table
gives the median and the best (least disturbed) wall time, and the median CPU time of the process.

Memory: the kernel's peak resident set size (``VmHWM`` of ``/proc/self/status``) during forward +
backward, after resetting the peak to the current RSS (writing ``5`` to ``/proc/self/clear_refs``), so no
allocation is missed however short-lived, unlike a sampler. Two numbers: ``peak extra`` = peak - RSS
before the call; ``workspace`` = ``peak extra`` - the bytes of the gradients left in ``.grad`` afterwards.
Every method must produce the same ``[V, H]`` and ``[N, H]`` gradients, so that part cannot shrink; the
workspace is what a method adds on top (logits, probabilities, buffers). It is exact where the gradients
are alive at the peak (the fused op forms them in its forward) and a lower bound where the peak comes
before them (the materialised paths peak in their forward), so ratios against those are conservative.
glibc is told to serve every allocation above 64 KiB with mmap (``mallopt``), so that freed memory
leaves the RSS at once and one method's leftovers never hide the next one's peak.

Usage: ``python benchmarks/bench_loss_cpu.py [--sizes 256,1024,4096] [--repeats 5] [--methods A,B]
[--ratio-level token|sequence]``. Prints a table and writes ``benchmarks/results/bench_loss_cpu.json`` (``--out``
elsewhere).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import re
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Optional

import torch

from ekipl_kernels import LossConfig, fused_linear_grpo_loss
from ekipl_kernels.inputs import prepare_token_inputs
from ekipl_kernels.reference import sequence_log_ratio, token_losses

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cpu_model import cpu_model  # noqa: E402  (a sibling script module)
from ekipl_kernels.testing import random_batch

HIDDEN = 512
VOCAB = 151936
SEQ_LEN = 128
THREADS = 2
TOKEN_LEVEL = LossConfig(beta=0.04, kl="k3")
METHODS = ("ekipl cpu", "reference-style", "materialised", "ekipl chunked", "liger")
BASELINES = ("reference-style", "materialised")
RESULTS = Path(__file__).resolve().parent / "results" / "bench_loss_cpu.json"
_M_MMAP_THRESHOLD = -3  # glibc mallopt parameter


@dataclass
class Batch:
    hidden: torch.Tensor  # [N, H], requires grad
    weight: torch.Tensor  # [V, H], requires grad
    targets: torch.Tensor
    advantages: torch.Tensor  # [S]
    cu_seqlens: torch.Tensor
    old_logprobs: torch.Tensor
    ref_logprobs: torch.Tensor

    @property
    def num_seqs(self) -> int:
        return self.advantages.shape[0]


def make_batch(n: int, seed: int = 0) -> Batch:
    """``n`` tokens in sequences of ``SEQ_LEN``, all unmasked policy tokens, from the shared generator of the tests
    (``ekipl_kernels.testing.random_batch``)."""
    b = random_batch(lengths=(SEQ_LEN,) * (n // SEQ_LEN), vocab=VOCAB, hidden_size=HIDDEN, seed=seed,
                     adversarial=False)
    kw = b.keywords
    return Batch(
        hidden=b.hidden.requires_grad_(),
        weight=b.weight.requires_grad_(),
        targets=b.targets,
        advantages=kw["advantages"],
        cu_seqlens=kw["cu_seqlens"],
        old_logprobs=kw["old_logprobs"],
        ref_logprobs=kw["ref_logprobs"],
    )


def run_ekipl(backend: str, config: LossConfig) -> Callable[[Batch], torch.Tensor]:
    def run(b: Batch) -> torch.Tensor:
        out = fused_linear_grpo_loss(
            b.hidden, b.weight, b.targets, advantages=b.advantages, cu_seqlens=b.cu_seqlens,
            old_logprobs=b.old_logprobs, ref_logprobs=b.ref_logprobs, config=config, backend=backend,
        )
        out.loss.backward()
        return out.loss.detach()

    return run


def run_materialised(reference_style: bool, config: LossConfig) -> Callable[[Batch], torch.Tensor]:
    """Plain autograd over fp32 ``[N, V]`` logits; ``reference_style`` follows ``reference.grpo_loss`` step
    by step (divide by the temperature, entropy always computed), otherwise only what the config needs."""

    def run(b: Batch) -> torch.Tensor:
        tok = prepare_token_inputs(
            b.hidden.shape[0], b.hidden.device, advantages=b.advantages, cu_seqlens=b.cu_seqlens, origin=None,
            old_logprobs=b.old_logprobs, ref_logprobs=b.ref_logprobs, behavior_logprobs=None, loss_mask=None,
            normalizer=None, config=config,
        )
        logits = b.hidden @ b.weight.T
        if reference_style or config.temperature != 1.0:
            logits = logits / config.temperature
        logp = torch.log_softmax(logits, dim=-1)
        del logits
        lp = logp.gather(-1, b.targets.unsqueeze(-1)).squeeze(-1)
        entropy = -(logp.exp() * logp).sum(-1) if reference_style or config.entropy_coef != 0 else None
        del logp
        seq = None
        if config.ratio_level == "sequence":
            seq = sequence_log_ratio(lp, tok.old_logprobs, tok.seq_start, tok.mask, lp.shape[0])
        loss_t, _ = token_losses(
            lp, entropy, advantages=tok.advantages, is_expert=tok.is_expert, old_logprobs=tok.old_logprobs,
            ref_logprobs=tok.ref_logprobs, behavior_logprobs=None, config=config, seq_log_ratio=seq,
        )
        loss = (loss_t * tok.agg_weight).sum()
        del entropy  # the reference drops it when it returns, before the caller's backward()
        loss.backward()
        return loss.detach()

    return run


def run_liger(config: LossConfig) -> Callable[[Batch], torch.Tensor]:
    from liger_kernel.chunked_loss.grpo_loss import LigerFusedLinearGRPOLoss

    module = LigerFusedLinearGRPOLoss(
        beta=config.beta, epsilon_low=config.eps_low, epsilon_high=config.eps_high, loss_type="dapo",
        temperature=config.temperature, use_ref_model=True, compiled=True, chunk_size=1,
        importance_sampling_level=config.ratio_level,
    )

    def run(b: Batch) -> torch.Tensor:
        shape = (b.num_seqs, SEQ_LEN)
        loss, _ = module(
            b.hidden.view(b.num_seqs, SEQ_LEN, HIDDEN), b.weight, b.targets.view(shape),
            torch.ones(shape, dtype=torch.long), b.advantages,
            ref_per_token_logps=b.ref_logprobs.view(shape), old_per_token_logps=b.old_logprobs.view(shape),
        )
        loss.backward()
        return loss.detach()

    return run


def _status_kib(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1))


def clear_grads(batch: Batch) -> None:
    batch.hidden.grad = None
    batch.weight.grad = None


def measure_once(run: Callable[[Batch], torch.Tensor], batch: Batch) -> dict:
    """Wall and CPU time, peak extra memory and workspace of one forward + backward."""
    clear_grads(batch)
    before = _status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    wall, cpu = time.perf_counter(), time.process_time()
    loss = run(batch)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    peak = (_status_kib("VmHWM") - before) * 1024
    grads = sum(t.grad.numel() * t.grad.element_size() for t in (batch.hidden, batch.weight))
    clear_grads(batch)
    return {"time_s": wall, "cpu_s": cpu, "peak_extra_bytes": peak, "workspace_bytes": peak - grads,
            "loss": float(loss)}


def measure(methods: dict[str, Callable[[Batch], torch.Tensor]], batch: Batch, repeats: int) -> dict[str, dict]:
    """Medians of time, maxima of memory; the methods take turns in every repeat, so that a load that
    comes and goes on a shared machine falls on all of them alike."""
    for run in methods.values():
        measure_once(run, batch)  # warm-up: JIT build, torch.compile, first-touch of the inputs
    samples: dict[str, list[dict]] = {name: [] for name in methods}
    for _ in range(repeats):
        for name, run in methods.items():
            samples[name].append(measure_once(run, batch))
    return {
        name: {
            "time_s": statistics.median(s["time_s"] for s in runs),
            "time_min_s": min(s["time_s"] for s in runs),
            "cpu_s": statistics.median(s["cpu_s"] for s in runs),
            "peak_extra_bytes": max(s["peak_extra_bytes"] for s in runs),
            "workspace_bytes": max(s["workspace_bytes"] for s in runs),
            "loss": runs[-1]["loss"],
            "times_s": [round(s["time_s"], 3) for s in runs],
        }
        for name, runs in samples.items()
    }


def git_commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True,
            cwd=Path(__file__).resolve().parent,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def materialised_fits(n: int) -> bool:
    """The materialised paths hold up to about four fp32 [N, V] tensors; skip them if those cannot fit."""
    import psutil

    return 4 * n * VOCAB * 4 < 0.8 * psutil.virtual_memory().available


def main(argv: Optional[list[str]] = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="256,1024,4096", help="comma-separated token counts N (multiples of 128)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=THREADS)
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {METHODS}")
    parser.add_argument("--ratio-level", choices=("token", "sequence"), default="token",
                        help="the importance ratio per token (default) or per sequence (GSPO)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    config = replace(TOKEN_LEVEL, ratio_level=args.ratio_level)

    ctypes.CDLL("libc.so.6").mallopt(_M_MMAP_THRESHOLD, 64 * 1024)
    torch.set_num_threads(args.threads)
    factories = {
        "ekipl cpu": lambda: run_ekipl("cpu", config),
        "reference-style": lambda: run_materialised(True, config),
        "materialised": lambda: run_materialised(False, config),
        "ekipl chunked": lambda: run_ekipl("chunked", config),
        "liger": lambda: run_liger(config),
    }
    methods = {name: factories[name]() for name in args.methods.split(",")}
    load_before = os.getloadavg()
    rows = []
    for n in (int(s) for s in args.sizes.split(",")):
        batch = make_batch(n)
        active = {name: run for name, run in methods.items() if name not in BASELINES or materialised_fits(n)}
        if len(active) < len(methods):
            print(f"N={n}: skipping the materialised paths (not enough free memory)")
        results = measure(active, batch, args.repeats)
        for name, r in results.items():
            print(f"N={n} {name}: {r}", flush=True)
        for name, r in results.items():
            row = {"N": n, "method": name, **r}
            for base_name in BASELINES:
                base = results.get(base_name)
                for key in ("time_s", "time_min_s", "peak_extra_bytes", "workspace_bytes"):
                    row[f"{key}_vs_{base_name}"] = r[key] / base[key] if base else None
            rows.append(row)
        del batch

    report = {
        "benchmark": "bench_loss_cpu",
        "machine": cpu_model(),
        "threads": args.threads,
        "load_average_before_after": [round(x, 2) for x in (load_before[0], os.getloadavg()[0])],
        "torch": torch.__version__,
        "commit": git_commit(),
        "date": time.strftime("%Y-%m-%d"),
        "shape": {"H": HIDDEN, "V": VOCAB, "seq_len": SEQ_LEN, "dtype": "float32"},
        "config": config.__dict__,
        "rows": rows,
    }
    print(format_table(rows))
    print(f"1-minute load average before/after: {report['load_average_before_after']}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    return report


def format_table(rows: list[dict]) -> str:
    def ratio(r: dict, key: str, base: str) -> str:
        x = r[f"{key}_vs_{base}"]
        return "-" if x is None else f"{x:.2f}x"

    lines = [
        "| N | method | fwd+bwd s (median / best) | CPU s | peak extra MiB | workspace MiB | time vs reference-style "
        "| time vs materialised | workspace vs reference-style | workspace vs materialised | loss |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['N']} | {r['method']} | {r['time_s']:.2f} / {r['time_min_s']:.2f} | {r['cpu_s']:.2f} | "
            f"{r['peak_extra_bytes'] / 2**20:.0f} | {r['workspace_bytes'] / 2**20:.0f} | "
            f"{ratio(r, 'time_s', 'reference-style')} | {ratio(r, 'time_s', 'materialised')} | "
            f"{ratio(r, 'workspace_bytes', 'reference-style')} | {ratio(r, 'workspace_bytes', 'materialised')} | "
            f"{r['loss']:.6f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
