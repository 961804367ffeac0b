"""``KernelOptions`` (explicit knobs, environment overrides), statistics as device tensors, no host sync on
the way to the kernels, and the CUDA ops' device guard."""

from __future__ import annotations

import contextlib
import dataclasses
import typing

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import ekipl_kernels
from ekipl_kernels import KernelOptions, LossConfig, fused_linear_grpo_loss, fused_linear_logprobs, stats_as_floats
from ekipl_kernels import api
from ekipl_kernels.inputs import values_checked
from ekipl_kernels.options import ENVIRONMENT


@pytest.fixture(autouse=True)
def no_kernel_environment(monkeypatch):
    for variable, _ in ENVIRONMENT.values():
        monkeypatch.delenv(variable, raising=False)


def batch(n=24, h=16, v=301, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=gen)
    weight = torch.randn(v, h, generator=gen) / h**0.5
    targets = torch.randint(0, v, (n,), generator=gen)
    mask = torch.ones(n)
    mask[-3:] = 0
    keywords = dict(advantages=torch.randn(2, generator=gen), cu_seqlens=torch.tensor([0, 10, n]),
                    origin=torch.randint(0, 2, (n,), generator=gen), loss_mask=mask,
                    old_logprobs=-torch.rand(n, generator=gen) * 6, ref_logprobs=-torch.rand(n, generator=gen) * 6)
    return hidden, weight, targets, keywords


CONFIG = LossConfig(beta=0.04, entropy_coef=0.01)


# ----------------------------------------------------------------------------------------------------------
# The options and their environment variables


@pytest.mark.parametrize("field,value", [
    ("backend", "gpu"), ("schedule", "columns"), ("chunk_mb", 0), ("chunk_mb", -1.0), ("chunk_mb", float("nan")),
    ("memory_budget_mb", True), ("logprobs_path", "cudnn"), ("cpu_chunk_mb", "8"), ("debug_checks", 1),
])
def test_bad_option_is_named(field, value):
    with pytest.raises(ValueError, match=rf"KernelOptions\.{field}=.* is invalid"):
        KernelOptions(**{field: value})


def test_every_field_has_an_environment_override_and_a_loadable_type():
    assert set(ENVIRONMENT) == {f.name for f in dataclasses.fields(KernelOptions)}
    hints = typing.get_type_hints(KernelOptions)  # what a trainer's typed config loader reads
    assert hints["chunk_mb"] == typing.Optional[float] and hints["debug_checks"] is bool


def test_environment_overrides_the_options(monkeypatch):
    options = KernelOptions(backend="cpu", schedule="vocab", chunk_mb=8.0, logprobs_path="cublas")
    assert options.with_env() is options
    monkeypatch.setenv("EKIPL_TRITON_SCHEDULE", "rows")
    monkeypatch.setenv("EKIPL_TRITON_CHUNK_MB", "0.5")
    monkeypatch.setenv("EKIPL_TRITON_MEMORY_MB", "2000")
    monkeypatch.setenv("EKIPL_CPU_CHUNK_MB", "3")
    monkeypatch.setenv("EKIPL_KERNEL_DEBUG", "1")
    monkeypatch.setenv("EKIPL_KERNEL_BACKEND", "")  # empty: unset
    assert options.with_env() == KernelOptions(backend="cpu", schedule="rows", chunk_mb=0.5, memory_budget_mb=2000.0,
                                               logprobs_path="cublas", cpu_chunk_mb=3.0, debug_checks=True)


@pytest.mark.parametrize("variable,raw", [("EKIPL_TRITON_CHUNK_MB", "lots"), ("EKIPL_TRITON_CHUNK_MB", "0"),
                                          ("EKIPL_KERNEL_DEBUG", "yes"), ("EKIPL_TRITON_LOGPROBS", "fast")])
def test_bad_environment_value_names_the_variable(variable, raw, monkeypatch):
    monkeypatch.setenv(variable, raw)
    with pytest.raises(ValueError, match=rf"{variable}='{raw}' is invalid"):
        KernelOptions().with_env()


def test_backend_argument_then_environment_then_options(monkeypatch):
    asked = []
    real = api.resolve_backend
    monkeypatch.setattr(api, "resolve_backend", lambda name, *rest: asked.append(name) or real(name, *rest))
    hidden, weight, targets, keywords = batch()
    options = KernelOptions(backend="chunked")
    fused_linear_grpo_loss(hidden, weight, targets, config=CONFIG, options=options, **keywords)
    monkeypatch.setenv("EKIPL_KERNEL_BACKEND", "reference")
    fused_linear_grpo_loss(hidden, weight, targets, config=CONFIG, options=options, **keywords)
    fused_linear_grpo_loss(hidden, weight, targets, config=CONFIG, options=options, backend="cpu", **keywords)
    assert asked == ["chunked", "reference", "cpu"]
    with pytest.raises(ValueError, match="options must be an ekipl_kernels.KernelOptions"):
        fused_linear_grpo_loss(hidden, weight, targets, options={"backend": "cpu"}, **keywords)


def test_cpu_chunk_reaches_the_cpu_op():
    hidden, weight, targets, keywords = batch(n=40, v=1001)
    whole = fused_linear_grpo_loss(hidden, weight, targets, config=CONFIG, backend="cpu", **keywords)
    tiny = KernelOptions(backend="cpu", cpu_chunk_mb=4 * 1001 * 16 / 2**20)  # the op's least: 16 rows a chunk
    chunked = fused_linear_grpo_loss(hidden, weight, targets, config=CONFIG, options=tiny, **keywords)
    assert torch.allclose(chunked.logprobs, whole.logprobs, atol=1e-6)
    with pytest.raises(RuntimeError, match="scratch_bytes must be >= 0"):
        torch.ops.ekipl.fused_linear_logprobs(hidden, weight, targets, 1.0, False, scratch_bytes=-1)


def test_triton_options_become_the_ops_schedule_and_scratch(monkeypatch):
    pytest.importorskip("triton")
    from ekipl_kernels import triton_backend

    entry = triton_backend.kernel_package(interpreted=True).entry
    ran = []
    real = entry.fused_linear_loss
    monkeypatch.setattr(entry, "fused_linear_loss", lambda *args: ran.append(args[-2:]) or real(*args))
    hidden, weight, targets, keywords = batch()
    hidden.requires_grad_()
    for options in (KernelOptions(backend="triton", schedule="vocab", chunk_mb=0.5), KernelOptions(backend="triton")):
        fused_linear_grpo_loss(hidden, weight, targets, config=CONFIG, options=options, **keywords)
    monkeypatch.setenv("EKIPL_TRITON_SCHEDULE", "rows")
    fused_linear_grpo_loss(hidden, weight, targets, config=CONFIG, options=KernelOptions(backend="triton",
                           schedule="vocab"), **keywords)
    assert ran == [("vocab", 1 << 19), ("rows", 1 << 30), ("rows", 1 << 30)]


# ----------------------------------------------------------------------------------------------------------
# Statistics, host syncs, input checks


@pytest.mark.parametrize("backend", ["reference", "chunked", "cpu", "triton"])
def test_statistics_are_device_tensors_that_agree_across_backends(backend):
    if backend == "triton":
        pytest.importorskip("triton")
    hidden, weight, targets, keywords = batch(seed=1)
    out = fused_linear_grpo_loss(hidden, weight, targets, config=CONFIG, backend=backend, **keywords)
    ref = fused_linear_grpo_loss(hidden, weight, targets, config=CONFIG, backend="reference", **keywords)
    assert out.stats.keys() == {"clip_frac", "ratio_mean", "kl_mean", "entropy_mean", "tokens_policy", "tokens_expert"}
    for value in out.stats.values():
        assert isinstance(value, torch.Tensor) and value.dim() == 0 and value.dtype == torch.float32
        assert value.device == hidden.device
    floats = stats_as_floats(out.stats)
    assert all(isinstance(value, float) for value in floats.values())
    assert floats == pytest.approx(stats_as_floats(ref.stats), rel=1e-4, abs=1e-6)
    assert floats["tokens_policy"] + floats["tokens_expert"] == 21


def test_stats_as_floats_reads_sums_and_numbers():
    assert stats_as_floats({"a": torch.tensor(1.5) * 2, "b": 2, "c": torch.tensor(4)}) == {"a": 3.0, "b": 2.0, "c": 4.0}
    assert stats_as_floats({}) == {}


class HostReads(TorchDispatchMode):
    """The ops that make the host wait for the device: reading a value, or an output sized by the data."""

    SYNCING = {"_local_scalar_dense", "nonzero", "is_nonzero", "equal", "item", "unique", "masked_select"}

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ in self.SYNCING:
            self.seen.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


@pytest.fixture
def as_on_an_accelerator(monkeypatch):
    """Input values are checked as on a GPU: only with debug_checks."""
    monkeypatch.setattr(api, "values_checked", lambda device, debug: debug)


@pytest.mark.parametrize("backend", ["triton", "cpu"])
def test_the_loss_reads_nothing_back_from_the_device(backend, as_on_an_accelerator):
    if backend == "triton":
        pytest.importorskip("triton")
    hidden, weight, targets, keywords = batch(seed=2)
    hidden.requires_grad_()
    weight.requires_grad_()
    with HostReads() as reads:
        out = fused_linear_grpo_loss(hidden, weight, targets, config=CONFIG, backend=backend,
                                     normalizer=torch.tensor(21.0), **keywords)
        fused_linear_logprobs(hidden, weight, targets, backend=backend)
    assert reads.seen == []
    with HostReads() as reads:
        fused_linear_grpo_loss(hidden, weight, targets, config=CONFIG, backend=backend,
                               options=KernelOptions(debug_checks=True), **keywords)
    assert "_local_scalar_dense" in reads.seen  # the checks of targets, cu_seqlens and origin
    out.loss.backward()


def test_values_are_checked_on_cpu_always_elsewhere_when_debugging(as_on_an_accelerator):
    assert values_checked(torch.device("cpu"), False) and values_checked(torch.device("cpu"), True)
    assert not values_checked(torch.device("cuda"), False) and values_checked(torch.device("cuda"), True)
    hidden, weight, targets, keywords = batch(seed=3)
    bad = targets.clone()
    bad[5] = weight.shape[0]
    bad_cu = torch.tensor([0, 10, 23])
    pytest.importorskip("triton")
    # Unchecked, an out-of-range target reads nothing outside its row: its log-prob is garbage, the rest is not.
    out = fused_linear_grpo_loss(hidden, weight, bad, config=CONFIG, backend="triton", **keywords)
    ref = fused_linear_grpo_loss(hidden, weight, targets, config=CONFIG, backend="triton", **keywords)
    others = torch.arange(len(targets)) != 5
    assert torch.isfinite(out.loss) and torch.equal(out.logprobs[others], ref.logprobs[others])
    debug = KernelOptions(debug_checks=True)
    with pytest.raises(ValueError, match=r"targets must lie in \[0, 301\)"):
        fused_linear_grpo_loss(hidden, weight, bad, config=CONFIG, backend="triton", options=debug, **keywords)
    with pytest.raises(ValueError, match=r"cu_seqlens must start at 0 and end at N=24"):
        fused_linear_grpo_loss(hidden, weight, targets, config=CONFIG, backend="triton", options=debug,
                               **{**keywords, "cu_seqlens": bad_cu})
    with pytest.raises(ValueError, match=r"normalizer must be a finite number > 0"):  # a Python number: free
        fused_linear_grpo_loss(hidden, weight, targets, config=CONFIG, backend="triton", normalizer=0.0, **keywords)


# ----------------------------------------------------------------------------------------------------------
# The CUDA ops' device guard


def test_cuda_ops_run_on_the_device_of_their_first_tensor(monkeypatch):
    triton_backend = pytest.importorskip("ekipl_kernels.triton_backend")
    entered = []

    @contextlib.contextmanager
    def device(where):
        entered.append(("enter", where))
        yield
        entered.append(("exit", where))

    class Kernels:
        @staticmethod
        def grpo_loss(logits, *args, **kwargs):
            entered.append(("run", logits.shape, args, kwargs))
            return "out"

    monkeypatch.setattr(torch.cuda, "device", device)
    monkeypatch.setattr(triton_backend, "kernel_package", lambda interpreted: Kernels)
    logits = torch.empty(2, 3, device="meta")
    assert triton_backend.on_device_of_first_tensor("grpo_loss")(logits, 7, flag=True) == "out"
    assert entered == [("enter", logits.device), ("run", (2, 3), (7,), {"flag": True}), ("exit", logits.device)]
    for name in ("fused_linear_grpo_loss", "grpo_loss", "fused_linear_logprobs"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"ekipl::{name}", "CUDA"), name


def test_package_exports_the_options():
    assert ekipl_kernels.KernelOptions is KernelOptions and "stats_as_floats" in ekipl_kernels.__all__
