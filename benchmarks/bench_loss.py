"""GPU benchmark of the fused GRPO loss: forward + backward time, peak extra memory and numerics.

bf16 inputs at (N, H, V) = (8192, 4096, 131072), (16384, 3584, 152064), (4096, 1536, 151936), packed
as sequences of 1024 tokens (one in eight from an expert, the last 5% of each masked). One loss for
all: clipped ratio to old log-probs (eps 0.2), k3 KL (beta 0.04) to reference log-probs, token-mean,
temperature 1 (Liger's ``loss_type="bnpo"``). Implementations, from hidden states unless marked:

* ``gemm floor``: the three bare GEMMs of the fused loss (``h W^T``, ``dz W``, ``dz^T h``) in bf16.
* ``ekipl rows`` / ``ekipl vocab``: :func:`ekipl_kernels.fused_linear_grpo_loss` with the Triton
  backend and ``KernelOptions(schedule="rows")`` (3 GEMMs) or ``"vocab"`` (4 GEMMs, least memory).
* ``ekipl budget 2GB``: ``schedule="auto"`` under ``memory_budget_mb`` = 2 GB (the schedule it picks).
* ``torch materialised``: ``h @ W.T`` in bf16, then log-softmax and the loss in fp32 with autograd.
* ``liger fused-linear``: Liger-Kernel's ``LigerFusedLinearGRPOLoss`` (torch.compile'd, one sequence
  per chunk).
* ``ekipl grpo_loss +gemm`` / ``liger grpo_loss +gemm``: materialised ``h @ W.T`` then ekipl's or
  Liger's Triton loss over the logits (Liger wants ``[B, T+1, V]``: one extra row per sequence).
* ``... (logits only)``: the same two loss kernels alone, the logits being the input.
* Log-probs passes (no gradient): ``gemm (one)``, the bare ``h W^T`` in bf16, their floor; ``ekipl
  logprobs fused`` and ``ekipl logprobs cublas``, :func:`ekipl_kernels.fused_linear_logprobs` with either
  ``KernelOptions.logprobs_path``. The report names the faster path (``logprobs_path_faster``).

Time: median of ``--repeats`` runs after ``--warmup`` (CUDA events around forward + backward); TFLOP/s
counts the useful FLOPs (``6 N H V`` for a loss, ``2 N H V`` for log-probs). Memory: ``peak extra`` =
``torch.cuda.max_memory_allocated`` during the run minus what was allocated before it (inputs);
``workspace`` = ``peak extra`` minus the gradients left afterwards (every method must return them, so
what remains is what it adds). Numerics: each method on the first sequence alone against the fp64
reference on the same bf16 inputs (relative errors of log-probs and gradients).

On CUDA it first asks how the Triton backend's GEMMs run and exits with status 2, timing nothing, when
they would upcast to fp32 (the slow path; see ``kernels/triton/gemm.py``).

``--quick`` runs two tiny shapes on the CPU (Triton kernels through the interpreter), only to prove the
script end to end. Prints one table; writes ``benchmarks/results/bench_loss_gpu_<card>.json`` (or
``bench_loss_gpu_quick.json``) and a PNG plot of time and memory against N beside it.
"""

from __future__ import annotations

import argparse
import gc
import json
import re
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Optional

import torch

from ekipl_kernels import KernelOptions, LossConfig, fused_linear_grpo_loss, fused_linear_logprobs, grpo_loss
from ekipl_kernels.inputs import prepare_token_inputs
from ekipl_kernels.reference import token_losses
from ekipl_kernels.testing import random_batch

GPU_SHAPES = [(8192, 4096, 131072), (16384, 3584, 152064), (4096, 1536, 151936)]
QUICK_SHAPES = [(256, 64, 1001), (512, 64, 2003)]
CONFIG = LossConfig(beta=0.04, kl="k3", eps_low=0.2, eps_high=0.2)
RESULTS = Path(__file__).resolve().parent / "results"
BUDGET_BYTES = 2_000_000_000
GOALS = {"vs_floor": 1.15, "vs_liger_fused": 2.0, "extra_gb_at_16k": BUDGET_BYTES / 1e9, "logprobs_vs_gemm": 1.1,
         "lp_err": 2e-3, "grad_err": 1e-2}


@dataclass
class Problem:
    hidden: torch.Tensor  # [N, H] bf16 leaf
    weight: torch.Tensor  # [V, H] bf16 leaf
    targets: torch.Tensor
    advantages: torch.Tensor  # [S]
    cu_seqlens: torch.Tensor
    origin: torch.Tensor
    mask: torch.Tensor
    old_logprobs: torch.Tensor
    ref_logprobs: torch.Tensor
    seq_len: int

    @property
    def num_seqs(self) -> int:
        return self.advantages.shape[0]

    def keywords(self) -> dict:
        return dict(advantages=self.advantages, cu_seqlens=self.cu_seqlens, origin=self.origin,
                    old_logprobs=self.old_logprobs, ref_logprobs=self.ref_logprobs, loss_mask=self.mask,
                    config=CONFIG)

    def per_seq(self, t: torch.Tensor) -> torch.Tensor:
        return t.view(self.num_seqs, self.seq_len, *t.shape[1:])

    def first_seqs(self, count: int) -> "Problem":
        rows = count * self.seq_len
        leaf = lambda t: t.detach()[:rows].clone().requires_grad_()  # noqa: E731
        return Problem(leaf(self.hidden), self.weight.detach().clone().requires_grad_(), self.targets[:rows],
                       self.advantages[:count], self.cu_seqlens[: count + 1], self.origin[:rows], self.mask[:rows],
                       self.old_logprobs[:rows], self.ref_logprobs[:rows], self.seq_len)

    def clear_grads(self) -> None:
        self.hidden.grad = None
        self.weight.grad = None


def make_problem(n: int, h: int, v: int, seq_len: int, device: torch.device, seed: int = 0) -> Problem:
    """Sequences of ``seq_len`` tokens from the shared generator of the tests (``ekipl_kernels.testing``), then
    this benchmark's layout of origins and mask."""
    num_seqs = n // seq_len
    batch = random_batch(lengths=(seq_len,) * num_seqs, vocab=v, hidden_size=h, dtype=torch.bfloat16, device=device,
                         seed=seed, adversarial=False)
    kw = batch.keywords
    origin, mask = kw["origin"], kw["loss_mask"]
    origin.view(num_seqs, seq_len)[::8] = 1  # one sequence in eight from an expert
    mask.view(num_seqs, seq_len)[:, seq_len - max(1, seq_len // 20):] = 0.0
    return Problem(batch.hidden.requires_grad_(), batch.weight.requires_grad_(), batch.targets, kw["advantages"],
                   kw["cu_seqlens"], origin, mask, kw["old_logprobs"], kw["ref_logprobs"], seq_len)


# --------------------------------------------------------------------------------------------------
# The implementations: each builds a step (forward + backward) for a problem; ``timed`` is False for the
# one-sequence numerics check. A linear step leaves the gradients in problem.hidden.grad and
# problem.weight.grad and returns (loss, logprobs or None).

Step = Callable[[], tuple]


def ekipl_linear(options: KernelOptions) -> Callable[[Problem, bool], Step]:
    def build(p: Problem, timed: bool = True) -> Step:
        def step():
            out = fused_linear_grpo_loss(p.hidden, p.weight, p.targets, backend="triton", options=options,
                                         **p.keywords())
            out.loss.backward()
            return out.loss.detach(), out.logprobs

        return step

    return build


def ekipl_logprobs(path: str) -> Callable[[Problem, bool], Step]:
    options = KernelOptions(backend="triton", logprobs_path=path)

    def build(p: Problem, timed: bool = True) -> Step:
        def step():
            lp = fused_linear_logprobs(p.hidden, p.weight, p.targets, options=options)
            return lp.sum(), lp

        return step

    return build


def gemm_once(p: Problem, timed: bool = True) -> Step:
    h, w = p.hidden.detach(), p.weight.detach()

    def step():
        logits = h @ w.T
        return logits[0, 0], None

    return step


def torch_materialised(p: Problem, timed: bool = True) -> Step:
    tok = prepare_token_inputs(p.hidden.shape[0], p.hidden.device, advantages=p.advantages, cu_seqlens=p.cu_seqlens,
                               origin=p.origin, old_logprobs=p.old_logprobs, ref_logprobs=p.ref_logprobs,
                               behavior_logprobs=None, loss_mask=p.mask, normalizer=None, config=CONFIG)

    def step():
        logits = (p.hidden @ p.weight.T).float()
        lp = torch.log_softmax(logits, dim=-1).gather(-1, p.targets[:, None]).squeeze(-1)
        del logits
        loss_t, _ = token_losses(lp, None, advantages=tok.advantages, is_expert=tok.is_expert,
                                 old_logprobs=tok.old_logprobs, ref_logprobs=tok.ref_logprobs, behavior_logprobs=None,
                                 config=CONFIG)
        loss = (loss_t * tok.agg_weight).sum()
        loss.backward()
        return loss.detach(), lp.detach()

    return step


def liger_fused_linear(p: Problem, timed: bool = True) -> Step:
    from liger_kernel.chunked_loss.grpo_loss import LigerFusedLinearGRPOLoss

    # torch.compile'd as Liger intends for the timing; the numerics check runs the same math eagerly,
    # sparing another compilation.
    module = LigerFusedLinearGRPOLoss(beta=CONFIG.beta, epsilon_low=CONFIG.eps_low, epsilon_high=CONFIG.eps_high,
                                      loss_type="bnpo", temperature=CONFIG.temperature, use_ref_model=True,
                                      compiled=timed and p.hidden.is_cuda, chunk_size=1)
    ids, mask = p.per_seq(p.targets), p.per_seq(p.mask).long()
    old, ref = p.per_seq(p.old_logprobs), p.per_seq(p.ref_logprobs)

    def step():
        loss, _ = module(p.per_seq(p.hidden), p.weight, ids, mask, p.advantages, ref_per_token_logps=ref,
                         old_per_token_logps=old)
        loss.backward()
        return loss.detach(), None

    return step


def ekipl_logits_gemm(p: Problem, timed: bool = True) -> Step:
    def step():
        logits = p.hidden @ p.weight.T
        out = grpo_loss(logits, p.targets, backend="triton", **p.keywords())
        out.loss.backward()
        return out.loss.detach(), out.logprobs

    return step


def _liger_triton_loss():
    if not torch.cuda.is_available():
        raise RuntimeError("Liger's Triton grpo_loss needs CUDA")
    from liger_kernel.transformers.grpo_loss import triton_grpo_loss

    return triton_grpo_loss


def _liger_triton_call(p: Problem, logits_ext: torch.Tensor):
    loss, _ = _liger_triton_loss()(
        logits_ext, p.per_seq(p.old_logprobs), p.per_seq(p.ref_logprobs), p.per_seq(p.targets), p.advantages,
        completion_mask=p.per_seq(p.mask).long().contiguous(), temperature=CONFIG.temperature, beta=CONFIG.beta,
        eps_low=CONFIG.eps_low, eps_high=CONFIG.eps_high, inplace=True, loss_type="bnpo", reduce=True,
    )
    return loss


def liger_logits_gemm(p: Problem, timed: bool = True) -> Step:
    _liger_triton_loss()
    # Liger reads logits [B, T+1, V] and drops the last position: give each sequence one more row.
    extra = torch.randn(p.num_seqs, 1, p.hidden.shape[1], device=p.hidden.device, dtype=p.hidden.dtype)

    def step():
        hidden_ext = torch.cat([p.per_seq(p.hidden), extra], dim=1)
        loss = _liger_triton_call(p, hidden_ext @ p.weight.T)
        loss.backward()
        return loss.detach(), None

    return step


class LogitsOnly:
    """A loss over logits that are the input: they are built (and counted as inputs) before the run."""

    def __init__(self, which: str):
        self.which = which

    def __call__(self, p: Problem, timed: bool = True) -> Step:
        with torch.no_grad():
            logits = p.hidden @ p.weight.T
        if self.which == "liger":
            _liger_triton_loss()
            logits = torch.cat([p.per_seq(logits), p.per_seq(logits)[:, :1]], dim=1)
        leaf = logits.requires_grad_()
        p.logits_leaf = leaf  # kept alive (and counted) as an input

        def step():
            leaf.grad = None
            if self.which == "liger":
                loss = _liger_triton_call(p, leaf)
                logprobs = None
            else:
                out = grpo_loss(leaf, p.targets, backend="triton", **p.keywords())
                loss, logprobs = out.loss, out.logprobs
            loss.backward()
            return loss.detach(), logprobs

        return step


def gemm_floor(p: Problem, timed: bool = True) -> Step:
    n, v = p.hidden.shape[0], p.weight.shape[0]
    grad_logits = torch.randn(n, v, device=p.hidden.device, dtype=p.hidden.dtype) * 1e-4
    h, w = p.hidden.detach(), p.weight.detach()

    def step():
        logits = h @ w.T
        d_hidden = grad_logits @ w
        d_weight = grad_logits.T @ h
        return logits[0, 0] + d_hidden[0, 0] + d_weight[0, 0], None

    return step


IMPLEMENTATIONS = {
    "gemm floor": (gemm_floor, "floor"),
    "ekipl rows": (ekipl_linear(KernelOptions(schedule="rows")), "linear"),
    "ekipl vocab": (ekipl_linear(KernelOptions(schedule="vocab")), "linear"),
    "ekipl budget 2GB": (ekipl_linear(KernelOptions(memory_budget_mb=BUDGET_BYTES / 2**20)), "linear"),
    "torch materialised": (torch_materialised, "linear"),
    "liger fused-linear": (liger_fused_linear, "linear"),
    "ekipl grpo_loss +gemm": (ekipl_logits_gemm, "linear"),
    "liger grpo_loss +gemm": (liger_logits_gemm, "linear"),
    "ekipl grpo_loss (logits only)": (LogitsOnly("ekipl"), "logits"),
    "liger grpo_loss (logits only)": (LogitsOnly("liger"), "logits"),
    "gemm (one)": (gemm_once, "logprobs floor"),
    "ekipl logprobs fused": (ekipl_logprobs("fused"), "logprobs"),
    "ekipl logprobs cublas": (ekipl_logprobs("cublas"), "logprobs"),
}
# Useful FLOPs of each kind, in units of N H V.
FLOPS = {"floor": 6, "linear": 6, "logits": 0, "logprobs floor": 2, "logprobs": 2}


# --------------------------------------------------------------------------------------------------
# Measurement


class Clock:
    """CUDA events on the GPU, the wall clock elsewhere."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def time_ms(self, fn: Callable[[], object]) -> float:
        if not self.cuda:
            start = time.perf_counter()
            fn()
            return (time.perf_counter() - start) * 1e3
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        fn()
        end.record()
        end.synchronize()
        return begin.elapsed_time(end)


def _grad_bytes(p: Problem) -> int:
    return sum(t.grad.numel() * t.grad.element_size() for t in (p.hidden, p.weight) if t.grad is not None)


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def measure(step: Step, p: Problem, clock: Clock, warmup: int, repeats: int) -> dict:
    for _ in range(warmup):
        p.clear_grads()
        step()
    times = []
    for _ in range(repeats):
        p.clear_grads()
        times.append(clock.time_ms(step))
    result = {"time_ms": statistics.median(times)}
    if clock.cuda:
        p.clear_grads()
        _free()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        loss, _ = step()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
        result.update(peak_extra_gb=peak / 1e9, workspace_gb=(peak - _grad_bytes(p)) / 1e9)
    else:
        loss, _ = step()
    result["loss"] = float(loss)
    p.clear_grads()
    return result


def reference_on(p: Problem) -> dict:
    """fp64 log-probs and gradients of the loss on a (small) problem."""
    out = fused_linear_grpo_loss(p.hidden, p.weight, p.targets, backend="reference", **p.keywords())
    out.loss.backward()
    ref = {"loss": float(out.loss), "logprobs": out.logprobs, "d_hidden": p.hidden.grad.double(),
           "d_weight": p.weight.grad.double()}
    p.clear_grads()
    return ref


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.detach().double(), ref.detach().double()
    if not torch.isfinite(out).all():
        return float("nan")
    return float((out - ref).norm() / ref.norm())


def numerics(build: Callable[[Problem, bool], Step], p: Problem, ref: dict, kind: str) -> dict:
    step = build(p, False)
    loss, logprobs = step()
    if kind == "logprobs":
        return {"logprobs_rel_err": rel_err(logprobs, ref["logprobs"])}
    result = {"loss_rel_err": abs(float(loss) - ref["loss"]) / max(abs(ref["loss"]), 1e-6),
              "d_hidden_rel_err": rel_err(p.hidden.grad, ref["d_hidden"]),
              "d_weight_rel_err": rel_err(p.weight.grad, ref["d_weight"])}
    if logprobs is not None:
        result["logprobs_rel_err"] = rel_err(logprobs, ref["logprobs"])
    p.clear_grads()
    return result


def is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


def run_shape(shape, names, device, seq_len, warmup, repeats, numerics_seqs) -> list[dict]:
    n, h, v = shape
    clock = Clock(device)
    problem = make_problem(n, h, v, seq_len, device)
    subset = problem.first_seqs(min(numerics_seqs, problem.num_seqs))
    ref = reference_on(subset)
    rows = []
    for name in names:
        build, kind = IMPLEMENTATIONS[name]
        row = {"n": n, "h": h, "v": v, "impl": name, "kind": kind}
        print(f"  {name} ...", file=sys.stderr, flush=True)
        try:
            row.update(measure(build(problem), problem, clock, warmup, repeats))
            if kind in ("linear", "logprobs"):
                row["numerics"] = numerics(build, subset, ref, kind)
            if FLOPS[kind]:
                row["tflops"] = FLOPS[kind] * n * h * v / (row["time_ms"] * 1e9)
        except Exception as exc:  # noqa: BLE001 - an implementation that fails is reported, not fatal
            row["note"] = "OOM" if is_oom(exc) else f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
        problem.clear_grads()
        subset.clear_grads()
        problem.__dict__.pop("logits_leaf", None)
        _free()
        rows.append(row)
    floors = {kind: next((r.get("time_ms") for r in rows if r["kind"] == kind), None)
              for kind in ("floor", "logprobs floor")}
    liger = next((r.get("time_ms") for r in rows if r["impl"] == "liger fused-linear"), None)
    for row in rows:
        floor = floors["logprobs floor" if row["kind"].startswith("logprobs") else "floor"]
        if "time_ms" in row and floor:
            row["vs_floor"] = row["time_ms"] / floor
        if "time_ms" in row and liger and row["kind"] == "linear":
            row["liger_fused_over_this"] = liger / row["time_ms"]
    del problem, subset
    _free()
    return rows


# --------------------------------------------------------------------------------------------------
# Report


def _fmt(x: Optional[float], spec: str) -> str:
    width = int(spec.split(".")[0])
    return "-".rjust(width) if x is None else format(x, spec)


def table(rows: list[dict]) -> str:
    head = (f"{'N':>6} {'H':>5} {'V':>7}  {'implementation':<30} {'ms':>9} {'TFLOP/s':>8} {'x floor':>8} "
            f"{'liger/x':>8} {'extra GB':>9} {'work GB':>8} {'lp err':>8} {'dh err':>8} {'dW err':>8}  note")
    lines = [head, "-" * len(head)]
    for r in rows:
        num = r.get("numerics", {})
        lines.append(
            f"{r['n']:>6} {r['h']:>5} {r['v']:>7}  {r['impl']:<30} {_fmt(r.get('time_ms'), '9.2f')} "
            f"{_fmt(r.get('tflops'), '8.0f')} {_fmt(r.get('vs_floor'), '8.2f')} "
            f"{_fmt(r.get('liger_fused_over_this'), '8.2f')} "
            f"{_fmt(r.get('peak_extra_gb'), '9.2f')} {_fmt(r.get('workspace_gb'), '8.2f')} "
            f"{_fmt(num.get('logprobs_rel_err'), '8.1e')} {_fmt(num.get('d_hidden_rel_err'), '8.1e')} "
            f"{_fmt(num.get('d_weight_rel_err'), '8.1e')}  {r.get('note', '')}"
        )
    return "\n".join(lines)


def goals(rows: list[dict]) -> list[str]:
    """The issue's goals, checked per shape: the ekipl losses' time against the floor and their errors (the
    budget row's peak memory at N = 16384), the log-probs passes' time against one GEMM."""
    out = []
    for r in rows:
        if not r["impl"].startswith("ekipl ") or r["kind"] not in ("linear", "logprobs") or "time_ms" not in r:
            continue
        num = r.get("numerics", {})
        checks = {f"lp err <= {GOALS['lp_err']}": num.get("logprobs_rel_err", float("inf")) <= GOALS["lp_err"]}
        if r["kind"] == "logprobs":
            checks[f"<= {GOALS['logprobs_vs_gemm']}x one GEMM"] = (
                r.get("vs_floor", float("inf")) <= GOALS["logprobs_vs_gemm"])
        else:
            checks.update({
                f"<= {GOALS['vs_floor']}x floor": r.get("vs_floor", float("inf")) <= GOALS["vs_floor"],
                f">= {GOALS['vs_liger_fused']}x faster than liger fused-linear":
                    r.get("liger_fused_over_this", 0.0) >= GOALS["vs_liger_fused"],
                f"grad err <= {GOALS['grad_err']}": max(num.get("d_hidden_rel_err", float("inf")),
                                                        num.get("d_weight_rel_err", float("inf"))) <= GOALS["grad_err"],
            })
        if r["impl"] == "ekipl budget 2GB" and r["n"] == 16384 and "peak_extra_gb" in r:
            checks[f"peak extra <= {GOALS['extra_gb_at_16k']} GB"] = r["peak_extra_gb"] <= GOALS["extra_gb_at_16k"]
        verdict = ", ".join(f"{'PASS' if ok else 'FAIL'} {what}" for what, ok in checks.items())
        out.append(f"{r['impl']:<24} N={r['n']:<6} {verdict}")
    return out


def faster_logprobs_path(rows: list[dict]) -> dict:
    """Per shape, the log-probs path that ran faster (the choice for ``KernelOptions.logprobs_path``)."""
    choice = {}
    for n, h, v in dict.fromkeys((r["n"], r["h"], r["v"]) for r in rows):
        timed = {r["impl"].rsplit(" ", 1)[1]: r["time_ms"] for r in rows
                 if (r["n"], r["h"], r["v"]) == (n, h, v) and r["kind"] == "logprobs" and "time_ms" in r}
        if len(timed) == 2:
            choice[f"{n}x{h}x{v}"] = min(timed, key=timed.get)
    return choice


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_time, ax_mem) = plt.subplots(1, 2, figsize=(13, 5))
    axes = [(ax_time, "forward + backward (ms)")]
    for impl in dict.fromkeys(r["impl"] for r in rows):
        points = sorted(((r["n"], r) for r in rows if r["impl"] == impl and "time_ms" in r), key=lambda x: x[0])
        if not points:
            continue
        ns = [n for n, _ in points]
        ax_time.plot(ns, [r["time_ms"] for _, r in points], marker="o", label=impl)
        if all("peak_extra_gb" in r for _, r in points):
            ax_mem.plot(ns, [r["peak_extra_gb"] for _, r in points], marker="o", label=impl)
    if ax_mem.lines:
        axes.append((ax_mem, "peak extra memory (GB)"))
    else:
        ax_mem.text(0.5, 0.5, "memory is measured on CUDA only", ha="center", transform=ax_mem.transAxes)
        ax_mem.set_axis_off()
    shapes = sorted({(r["n"], r["h"], r["v"]) for r in rows})
    for ax, label in axes:
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks([n for n, _, _ in shapes], [f"N={n}\nH={h}\nV={v}" for n, h, v in shapes])
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
    ax_time.legend(fontsize=7)
    fig.suptitle("GRPO loss, bf16 inputs")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def environment(device: torch.device) -> dict:
    env = {"torch": torch.__version__, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
           "command": " ".join([Path(sys.executable).name, *sys.argv])}
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        pass
    try:
        from importlib.metadata import version

        env["liger_kernel"] = version("liger-kernel")
    except Exception:  # noqa: BLE001 - optional
        pass
    env["device"] = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    if device.type == "cuda":
        from ekipl_kernels.triton_backend import kernel_package

        env["gemm_path"] = kernel_package(interpreted=False).gemm.cuda_path(device)
    try:
        env["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                       check=True, cwd=Path(__file__).resolve().parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        env["commit"] = "unknown"
    return env


def parse_shapes(text: str) -> list[tuple[int, int, int]]:
    return [tuple(int(x) for x in item.split("x")) for item in text.split(",") if item]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes on the CPU (interpreter), end-to-end check")
    parser.add_argument("--shapes", type=parse_shapes, help="NxHxV,... (default: the three issue shapes)")
    parser.add_argument("--impls", help="comma-separated subset of: " + ", ".join(IMPLEMENTATIONS))
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--seq-len", type=int, default=None)
    parser.add_argument("--numerics-seqs", type=int, default=1, help="sequences compared against fp64")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (the PNG goes beside it)")
    args = parser.parse_args(argv)

    if args.quick:
        device = torch.device("cpu")
        shapes, seq_len, warmup, repeats = QUICK_SHAPES, 64, 1, 1
    else:
        if not torch.cuda.is_available():
            parser.error("no CUDA device: run on a GPU, or pass --quick for the CPU end-to-end check")
        device = torch.device("cuda")
        shapes, seq_len, warmup, repeats = GPU_SHAPES, 1024, 2, 10
    shapes = args.shapes or shapes
    seq_len = args.seq_len or seq_len
    warmup = warmup if args.warmup is None else args.warmup
    repeats = repeats if args.repeats is None else args.repeats
    names = list(IMPLEMENTATIONS) if not args.impls else [s.strip() for s in args.impls.split(",")]
    unknown = [name for name in names if name not in IMPLEMENTATIONS]
    if unknown:
        parser.error(f"unknown implementations {unknown}; choose from {list(IMPLEMENTATIONS)}")
    for n, _, _ in shapes:
        if n % seq_len:
            parser.error(f"N={n} must be a multiple of --seq-len {seq_len}")

    report = {**environment(device), "config": CONFIG.__dict__, "seq_len": seq_len, "warmup": warmup,
              "repeats": repeats, "goals": GOALS, "rows": []}
    if report.get("gemm_path") == "upcast":
        print(f"FAIL: torch {torch.__version__} refuses bf16 GEMMs with fp32 results; the Triton backend would upcast "
              "the LM head to fp32 (the slow path). Nothing timed.", file=sys.stderr)
        return 2
    card = re.sub(r"[^a-z0-9]+", "-", report["device"].lower()).strip("-")
    out = args.out or RESULTS / ("bench_loss_gpu_quick.json" if args.quick else f"bench_loss_gpu_{card}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    for shape in shapes:
        print(f"shape N={shape[0]} H={shape[1]} V={shape[2]}", file=sys.stderr, flush=True)
        report["rows"] += run_shape(shape, names, device, seq_len, warmup, repeats, args.numerics_seqs)
        # Written after every shape, so that a run cut short still leaves what it measured.
        report["goal_checks"] = goals(report["rows"])
        report["logprobs_path_faster"] = faster_logprobs_path(report["rows"])
        out.write_text(json.dumps(report, indent=2))
        plot(report["rows"], out.with_suffix(".png"))
        print(table(report["rows"]), file=sys.stderr, flush=True)
    rows = report["rows"]
    print(f"# {report['device']}, torch {report['torch']}, triton {report.get('triton')}, "
          f"liger {report.get('liger_kernel')}, GEMM path {report.get('gemm_path', '-')}, commit {report['commit']}, "
          f"{report['date']}")
    print(table(rows))
    if device.type == "cuda":
        print("\n".join(["# goals"] + report["goal_checks"]))
    print(f"# faster log-probs path: {report['logprobs_path_faster'] or '-'}")
    print(f"# wrote {out} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
