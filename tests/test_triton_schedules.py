"""The Triton path's host side and what its compiled code does, checked without a GPU.

* The in-place 16-bit logit gradient: the kernels compiled for sm_90a (PTX, no GPU needed) order every
  warp's loads of a tile before any store into it, and in the interpreter the in-place gradient equals the
  one written to a separate buffer, bit for bit.
* The GEMM path: probed once on tiny tensors, ``addmm(out_dtype=)`` refused falls back to chunk-sized
  ``mm`` + ``add_``, and a failing GEMM of the loss raises instead of switching paths.
* Memory: the schedules' allocations measured on CPU tensors against :func:`linear_loss.peak_bytes`, the
  chunk freed before the weight gradient is cast, and the plan under a memory budget.
* The "cublas" log-probs path against the fp64 reference, over several chunks.
"""

from __future__ import annotations

import contextlib
import json
import re
import subprocess
import sys
import weakref
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from ekipl_kernels import KernelOptions, LossConfig, fused_linear_grpo_loss, fused_linear_logprobs
from ekipl_kernels.inputs import prepare_token_inputs
from ekipl_kernels.loss_scalars import loss_scalars

triton = pytest.importorskip("triton")
triton_backend = pytest.importorskip("ekipl_kernels.triton_backend")

interpreted = triton_backend.kernel_package(interpreted=True)
linear_loss = interpreted.linear_loss
gemm = interpreted.gemm


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.detach().double(), ref.detach().double()
    assert torch.isfinite(out).all()
    return float((out - ref).norm() / ref.norm())


def problem(n=48, h=32, v=1001, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=gen).to(dtype)
    weight = (torch.randn(v, h, generator=gen) / h**0.5).to(dtype)
    targets = torch.randint(0, v, (n,), generator=gen)
    mask = torch.ones(n)
    mask[-5:] = 0.0
    lp = torch.log_softmax(hidden.double() @ weight.double().T, -1).gather(1, targets[:, None]).squeeze(1).float()
    keywords = dict(advantages=torch.randn(3, generator=gen), cu_seqlens=torch.tensor([0, 7, 30, n]),
                    origin=torch.randint(0, 2, (n,), generator=gen), loss_mask=mask,
                    old_logprobs=lp + 0.3 * torch.randn(n, generator=gen), ref_logprobs=lp - 0.2)
    return hidden, weight, targets, keywords


def token_args(hidden, config, keywords):
    """The kernels' token arguments for ``keywords`` (as the op entry points build them)."""
    tok = prepare_token_inputs(hidden.shape[0], hidden.device, config=config, **keywords)
    return interpreted.token_loss.token_args(
        tok.advantages, tok.agg_weight, tok.is_expert, tok.old_logprobs, tok.ref_logprobs, tok.behavior_logprobs,
        loss_scalars(config))


# ----------------------------------------------------------------------------------------------------------
# 1. The in-place 16-bit gradient


_INT_ARGS = {"stride_logits": "i64", "stride_grad": "i64", "N": "i32", "V": "i32", "n_cols": "i32",
             "col_offset": "i32", "has_old": "i32"}


def hopper_ptx(kernel, constexprs: dict) -> str:
    """PTX of ``kernel`` for sm_90a with bf16 gradients, 8 warps and a 4096-wide tile, as on an H100/H200."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature = {}
    for param in kernel.params:
        name = param.name
        if param.is_constexpr:
            signature[name] = "constexpr"
        elif name == "grad_ptr":
            signature[name] = "*bf16"
        elif name in ("targets_ptr", "expert_ptr"):
            signature[name] = "*i64" if name == "targets_ptr" else "*u8"
        elif name.endswith(("_ptr", "_out")):
            signature[name] = "*fp32"
        else:
            signature[name] = _INT_ARGS.get(name, "fp32")
    source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 8}).asm["ptx"]


def store_blocks_synchronised(ptx: str) -> list[bool]:
    """For each basic block that stores 16-bit values: whether a CTA barrier sits between its last global load
    and its first 16-bit store."""
    blocks, current = [], []
    for line in ptx.splitlines():
        text = line.strip()
        if re.match(r"\$L__BB\d+_\d+:", text):
            blocks.append(current)
            current = []
        elif text and not text.startswith(("$L__tmp", "//", ".loc", ".file")):
            current.append(text)
    blocks.append(current)
    verdicts = []
    for block in blocks:
        stores = [i for i, text in enumerate(block) if "st.global.b16" in text]
        if not stores:
            continue
        before = block[: stores[0]]
        loads = [i for i, text in enumerate(before) if "ld.global" in text]
        assert loads, "the store loop loads its logits tile first"
        verdicts.append(any(re.search(r"\b(bar|barrier)\.sync", text) for text in before[loads[-1]:]))
    return verdicts


def barrier_verdicts() -> dict:
    """For each kernel that writes the logit gradient, and ``SYNC_TILES`` on and off: whether its compiled
    16-bit store loops wait for every warp's loads (:func:`store_blocks_synchronised`)."""
    compiled = triton_backend.kernel_package(interpreted=False)
    kernels = {
        "logit_grad": (compiled.logit_grad._logit_grad_kernel, {"ROWS": 1, "BLOCK_V": 4096}),
        "logits_loss": (compiled.logits_loss._logits_loss_kernel,
                        {"ROWS": 1, "BLOCK_V": 4096, "WITH_LOSS": True, "WRITE_GRAD": True}),
    }
    return {f"{name} sync={sync}": store_blocks_synchronised(hopper_ptx(kernel, {**constexprs, "SYNC_TILES": sync}))
            for name, (kernel, constexprs) in kernels.items() for sync in (True, False)}


@pytest.mark.skipif(triton_backend.kernel_package(interpreted=False).tuning.INTERPRET,
                    reason="TRITON_INTERPRET=1: every kernel is interpreted, none can be compiled")
def test_compiled_in_place_gradient_stores_only_after_every_warp_loaded_the_tile():
    # In a fresh process: while interpreted kernels run, the interpreter patches triton.language, which
    # the compiler must see as it is.
    script = (f"import json, sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
              "from test_triton_schedules import barrier_verdicts; print(json.dumps(barrier_verdicts()))")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    verdicts = json.loads(done.stdout.strip().splitlines()[-1])
    for name in ("logit_grad", "logits_loss"):
        assert verdicts[f"{name} sync=True"] == [True], name
        # The analysis sees the race: without the barrier a warp may store before another one has loaded.
        assert verdicts[f"{name} sync=False"] == [False], name


def test_barrier_is_asked_for_exactly_when_the_gradient_overwrites_wider_logits():
    narrower_in_place = interpreted.logit_grad.narrower_in_place
    logits = torch.empty(4, 8)
    assert narrower_in_place(logits, logits.view(torch.bfloat16)[:, :8])
    assert not narrower_in_place(logits, logits)  # same width: each thread overwrites only what it loaded
    assert not narrower_in_place(logits, torch.empty(4, 8, dtype=torch.bfloat16))


def test_in_place_16_bit_gradient_equals_a_separate_buffer_bit_for_bit():
    """fp16 (bf16 arithmetic is wrong in the interpreter): logits_loss and logit_grad over chunks whose
    gradient shares the fp32 logits' bytes give exactly the gradient written to a fresh buffer."""
    hidden, weight, targets, keywords = problem(n=40, v=1001, dtype=torch.float16, seed=1)
    args = token_args(hidden, LossConfig(beta=0.04, entropy_coef=0.01), keywords)
    logits = hidden.float() @ weight.float().T
    with triton_backend._library_interpretable():
        fresh = torch.empty(logits.shape, dtype=torch.float16)
        linear_loss.logits_loss(logits.clone(), targets, args, 1.0, grad=fresh)
        buffer, view = linear_loss._scratch(*logits.shape, torch.float16, logits.device)
        buffer.copy_(logits)
        linear_loss.logits_loss(buffer, targets, args, 1.0, grad=view)
        assert torch.equal(view, fresh)

        stats = interpreted.token_finish.token_finish(
            interpreted.linear_stats.linear_stats(hidden, weight, targets, 1.0), 1.0, args)
        fresh = torch.empty(logits.shape, dtype=torch.float16)
        interpreted.logit_grad.logit_grad(logits.clone(), fresh, targets, 0, stats, 1.0)
        buffer.copy_(logits)
        interpreted.logit_grad.logit_grad(buffer, view, targets, 0, stats, 1.0)
        assert torch.equal(view, fresh)


# ----------------------------------------------------------------------------------------------------------
# 2. The GEMM path


class FakeCudaBlas:
    """torch.mm / torch.addmm with ``out_dtype`` on CPU tensors, as a given torch build behaves on CUDA."""

    def __init__(self, monkeypatch, mm_takes_out_dtype=True, addmm="adds"):
        self.mm_calls = 0
        self.real_mm, self.real_addmm = torch.mm, torch.addmm
        self.mm_takes_out_dtype, self.addmm = mm_takes_out_dtype, addmm
        monkeypatch.setattr(torch, "mm", self.mm)
        monkeypatch.setattr(torch, "addmm", self.addmm_)
        monkeypatch.setattr(gemm, "_low_precision_cuda", lambda a: a.dtype != torch.float32)
        monkeypatch.setattr(gemm, "_path", None)

    def _product(self, a, b, out_dtype):
        return self.real_mm(a.double(), b.double()).to(out_dtype)

    def mm(self, a, b, *, out_dtype=None, out=None):
        if out_dtype is None:
            return self.real_mm(a, b) if out is None else self.real_mm(a, b, out=out)
        if not self.mm_takes_out_dtype:
            raise TypeError("mm() got an unexpected keyword argument 'out_dtype'")
        self.mm_calls += 1
        return out.copy_(self._product(a, b, out_dtype))

    def addmm_(self, acc, a, b, *, out_dtype=None, out=None):
        if self.addmm == "refuses":
            raise RuntimeError("self and mat2 must have the same dtype, but got Float and BFloat16")
        if a.shape[1] != b.shape[0]:
            raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")
        product = self._product(a, b, out_dtype)
        return out.copy_(product if self.addmm == "overwrites" else acc + product)


@pytest.mark.parametrize("mm_ok,addmm,expected", [
    (True, "adds", "direct"), (True, "refuses", "mm+add"), (True, "overwrites", "mm+add"),
    (False, "adds", "upcast"),
])
def test_gemm_path_is_probed_once_on_tiny_tensors(mm_ok, addmm, expected, monkeypatch):
    blas = FakeCudaBlas(monkeypatch, mm_takes_out_dtype=mm_ok, addmm=addmm)
    probes = []
    real_probe = gemm._probe
    monkeypatch.setattr(gemm, "_probe", lambda device: probes.append(device) or real_probe(device))
    with pytest.warns(UserWarning, match="upcasts GEMM operands") if expected == "upcast" else contextlib.nullcontext():
        assert gemm.cuda_path(torch.device("cpu")) == expected
    assert gemm.cuda_path(torch.device("cpu")) == expected and len(probes) == 1
    a, b = torch.randn(5, 7).bfloat16(), torch.randn(7, 3).bfloat16()
    out = gemm.mm_fp32(a, b, torch.empty(5, 3))
    assert torch.allclose(out, a.float() @ b.float())
    assert blas.mm_calls == (0 if expected == "upcast" else 2)  # the probe's and this one, with out_dtype


def test_accumulation_without_addmm_runs_in_pieces_and_adds(monkeypatch):
    blas = FakeCudaBlas(monkeypatch, addmm="refuses")
    acc = torch.randn(300, 16)
    a, b = torch.randn(300, 9).bfloat16(), torch.randn(9, 16).bfloat16()
    expected = acc.double() + a.double() @ b.double()
    monkeypatch.setattr(gemm, "ADD_PIECE_BYTES", 4 * 16 * 64)  # 64 rows a piece: 5 pieces
    gemm.addmm_fp32_(acc, a, b)
    assert gemm.cuda_path(acc.device) == "mm+add"
    assert blas.mm_calls == 1 + 5  # the probe, then one mm per piece
    assert torch.allclose(acc.double(), expected, rtol=1e-6, atol=1e-6)


def test_a_failing_gemm_raises_and_keeps_the_path(monkeypatch):
    FakeCudaBlas(monkeypatch)
    acc = torch.zeros(4, 4)
    with pytest.raises(RuntimeError, match="cannot be multiplied"):
        gemm.addmm_fp32_(acc, torch.randn(4, 3).bfloat16(), torch.randn(2, 4).bfloat16())
    assert gemm.cuda_path(acc.device) == "direct"


# ----------------------------------------------------------------------------------------------------------
# 6. Memory


class Allocations(TorchDispatchMode):
    """Live and peak bytes of the storages that torch ops create while active (earlier tensors not counted),
    and the fills and in-place products run on tensors of ``watch`` elements. Inside :meth:`uncounted` new
    storages are not counted: the GEMM wrappers, whose CPU upcasts a CUDA GEMM does not make."""

    def __init__(self, watch: int = -1):
        super().__init__()
        self.owners: dict[int, list] = {}  # storage address -> [live tensors, bytes]
        self.live = self.peak = 0
        self.paused = False
        self.watch, self.watched = watch, []

    def _release(self, key: int) -> None:
        entry = self.owners[key]
        entry[0] -= 1
        if entry[0] == 0:
            self.live -= entry[1]
            del self.owners[key]

    @contextlib.contextmanager
    def uncounted(self):
        self.paused, before = True, self.paused
        try:
            yield
        finally:
            self.paused = before

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if name in ("zero_", "fill_", "zeros", "mul_", "mul") and getattr(out, "numel", int)() == self.watch:
            self.watched.append(name)
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0]
                  if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            key = t.untyped_storage().data_ptr()
            if key in self.owners:
                self.owners[key][0] += 1
            elif self.paused or key == 0 or key in inputs:  # a view or an out= result of an older tensor
                continue
            else:
                self.owners[key] = [1, t.untyped_storage().nbytes()]
                self.live += self.owners[key][1]
                self.peak = max(self.peak, self.live)
            weakref.finalize(t, self._release, key)
        return out


def measured_run(monkeypatch, hidden, weight, targets, keywords, options, watch=-1):
    """Peak bytes the loss allocates beyond its inputs (its GEMMs counted as a CUDA GEMM: nothing extra)."""
    tracker = Allocations(watch)
    for name in ("mm_fp32", "addmm_fp32_"):
        real = getattr(linear_loss, name)

        def uncounted(*args, _real=real, **kwargs):
            with tracker.uncounted():
                return _real(*args, **kwargs)

        monkeypatch.setattr(linear_loss, name, uncounted)
    hidden, weight = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    with tracker:
        out = fused_linear_grpo_loss(hidden, weight, targets, config=LossConfig(beta=0.04), options=options,
                                     **keywords)
        out.loss.backward()
    return tracker, out, hidden.grad, weight.grad


PER_TOKEN_SLACK = 512  # bytes per token: token inputs, log-probs, partial states, statistics


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("schedule,chunk_rows", [("rows", 64), ("rows", 24), ("vocab", 0)])
def test_schedules_allocate_what_peak_bytes_says(schedule, chunk_rows, dtype, monkeypatch):
    n, h, v = 64, 128, 1000
    hidden, weight, targets, keywords = problem(n=n, h=h, v=v, dtype=dtype, seed=2)
    scratch = 4 * v * chunk_rows if schedule == "rows" else 4 * n * 300
    options = KernelOptions(backend="triton", schedule=schedule, chunk_mb=scratch / 2**20)
    tracker, out, d_hidden, d_weight = measured_run(monkeypatch, hidden, weight, targets, keywords, options)
    estimate = linear_loss.peak_bytes(schedule, n, h, v, dtype, True, True, scratch)
    assert estimate - 16 * n <= tracker.peak <= estimate + PER_TOKEN_SLACK * n, (tracker.peak, estimate)
    assert torch.isfinite(d_weight).all() and torch.isfinite(d_hidden).all()


def test_rows_frees_the_chunk_before_casting_the_weight_gradient(monkeypatch):
    """One chunk as large as the fp16 weight gradient: holding it during the cast would add it to the peak."""
    n, h, v = 64, 128, 1000
    hidden, weight, targets, keywords = problem(n=n, h=h, v=v, dtype=torch.float16, seed=3)
    options = KernelOptions(backend="triton", schedule="rows", chunk_mb=4 * v * n / 2**20)
    tracker, *_ = measured_run(monkeypatch, hidden, weight, targets, keywords, options)
    accumulator, chunk, cast = 4 * v * h, 4 * v * n, 2 * v * h
    assert tracker.peak < accumulator + chunk + cast


@pytest.mark.parametrize("dtype,scaled", [(torch.bfloat16, False), (torch.float16, True)])
def test_rows_writes_the_weight_gradient_without_zero_fill_and_scales_only_fp16(dtype, scaled, monkeypatch):
    n, h, v = 40, 32, 1001
    hidden, weight, targets, keywords = problem(n=n, h=h, v=v, dtype=dtype, seed=4)
    options = KernelOptions(backend="triton", schedule="rows", chunk_mb=4 * v * 16 / 2**20)  # 3 chunks
    tracker, out, _, d_weight = measured_run(monkeypatch, hidden, weight, targets, keywords, options, watch=v * h)
    assert tracker.watched == (["mul_"] if scaled else [])  # no zero fill; fp16's scale put back once
    ref = fused_linear_grpo_loss(hidden.clone().requires_grad_(), w := weight.clone().requires_grad_(), targets,
                                 config=LossConfig(beta=0.04), backend="reference", **keywords)
    ref.loss.backward()
    assert rel_err(d_weight, w.grad) < 1e-2


GIB = 1 << 30


def test_plan_picks_vocab_under_a_budget_and_fits_it():
    shape = (16384, 3584, 152064)
    bf16 = torch.bfloat16
    assert linear_loss.plan(*shape, bf16, True, True, "auto") == ("rows", 1024 << 20)
    rows_peak = linear_loss.peak_bytes("rows", *shape, bf16, True, True, 1024 << 20)
    assert 3.2e9 < rows_peak < 3.6e9  # fp32 dW accumulator + its bf16 cast + dh; the chunk gone by then
    schedule, scratch = linear_loss.plan(*shape, bf16, True, True, "auto", budget_bytes=2_000_000_000)
    assert schedule == "vocab"
    assert linear_loss.peak_bytes("vocab", *shape, bf16, True, True, scratch) <= 2_000_000_000
    # Slices never narrower than H by default, so hidden and dh are re-read at most V / H times.
    assert scratch // (4 * shape[0]) >= shape[1]
    # A budget that holds rows with chunks of at least MIN_ROWS_CHUNK rows keeps rows, its chunk capped.
    schedule, scratch = linear_loss.plan(*shape, bf16, True, True, "auto", budget_bytes=4 * GIB)
    assert schedule == "rows" and scratch < 1024 << 20
    assert linear_loss.peak_bytes("rows", *shape, bf16, True, True, scratch) <= 4 * GIB
    # Explicit schedules keep their name; the budget still caps the scratch.
    assert linear_loss.plan(*shape, bf16, True, True, "vocab", scratch_bytes=64 << 20) == ("vocab", 64 << 20)
    schedule, scratch = linear_loss.plan(*shape, bf16, True, True, "rows", budget_bytes=4 * GIB)
    assert schedule == "rows" and linear_loss.peak_bytes("rows", *shape, bf16, True, True, scratch) <= 4 * GIB
    # A budget below vocab's least still runs, with the narrowest slices.
    assert linear_loss.plan(*shape, bf16, True, True, "auto", budget_bytes=GIB)[0] == "vocab"


def test_memory_budget_option_switches_the_schedule(monkeypatch):
    """Through the public API: a budget below rows' need runs vocab (same loss), within the budget."""
    n, h, v = 64, 128, 1000
    hidden, weight, targets, keywords = problem(n=n, h=h, v=v, dtype=torch.float16, seed=5)
    runs = {}
    for name, options in {"rows": KernelOptions(backend="triton"),
                          "budget": KernelOptions(backend="triton", memory_budget_mb=0.6)}.items():
        runs[name] = measured_run(monkeypatch, hidden, weight, targets, keywords, options)
    rows_peak = linear_loss.peak_bytes("rows", n, h, v, torch.float16, True, True, 1024 << 20)
    assert rows_peak > 0.6 * 2**20 >= runs["budget"][0].peak
    assert rel_err(runs["budget"][3], runs["rows"][3]) < 1e-2 and rel_err(runs["budget"][2], runs["rows"][2]) < 1e-2


# ----------------------------------------------------------------------------------------------------------
# 9. The two log-probs paths


@pytest.mark.parametrize("path", ["fused", "cublas"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_logprobs_paths_match_the_reference(path, dtype, monkeypatch):
    hidden, weight, targets, _ = problem(n=50, h=40, v=1001, dtype=dtype, seed=6)
    hidden = hidden * 3  # logits of spread ~3
    options = KernelOptions(backend="triton", logprobs_path=path, chunk_mb=4 * 1001 * 16 / 2**20)  # 4 chunks
    real_empty = torch.empty

    def poisoned(*args, **kwargs):  # every element the path leaves unwritten would show as NaN
        out = real_empty(*args, **kwargs)
        return out.fill_(float("nan")) if out.is_floating_point() else out

    monkeypatch.setattr(torch, "empty", poisoned)
    lp, entropy = fused_linear_logprobs(hidden, weight, targets, temperature=0.7, return_entropy=True,
                                        options=options)
    monkeypatch.undo()
    ref_lp, ref_entropy = fused_linear_logprobs(hidden, weight, targets, temperature=0.7, return_entropy=True,
                                                backend="reference")
    assert rel_err(lp, ref_lp) < 1e-4 and rel_err(entropy, ref_entropy) < 1e-4


def test_logprobs_path_is_passed_to_the_op(monkeypatch):
    """The option reaches the kernels: the cublas path never launches the fused GEMM kernel."""
    hidden, weight, targets, _ = problem(n=20, v=300, seed=7)
    launched = []
    real = interpreted.entry.linear_stats
    monkeypatch.setattr(interpreted.entry, "linear_stats", lambda *a: launched.append(1) or real(*a))
    fused_linear_logprobs(hidden, weight, targets, options=KernelOptions(backend="triton", logprobs_path="cublas"))
    assert launched == []
    fused_linear_logprobs(hidden, weight, targets, options=KernelOptions(backend="triton"))
    assert launched == [1]
