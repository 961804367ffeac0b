"""The fused C++ CPU op (backend "cpu") and the chunked torch backend against the fp64 reference.

Fresh random inputs for every case; uninitialised memory is poisoned with NaN (deterministic mode fills
every ``empty`` tensor, the C++ op's outputs and buffers included), so an element the op forgets to
write shows up as NaN. Relative error ``||out - ref|| / ||ref||``: fp32 < 1e-4, bf16 < 1e-2.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

import pytest
import torch

from ekipl_kernels import (LossConfig, fused_linear_grpo_loss, fused_linear_logprobs, grpo_loss, ops, reference,
                           stats_as_floats)
from ekipl_kernels.backends import BackendUnavailable
from ekipl_kernels.op_builder import build_op, load_cpu_op

TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 1e-2, torch.float16: 1e-2, torch.float64: 1e-10}
BACKENDS = ["cpu", "chunked"]


@pytest.fixture(autouse=True)
def poison_uninitialized_memory():
    torch.use_deterministic_algorithms(True, warn_only=True)
    assert torch.utils.deterministic.fill_uninitialized_memory
    yield
    torch.use_deterministic_algorithms(False)


@pytest.fixture(scope="module", autouse=True)
def built_op():
    load_cpu_op()


# ----------------------------------------------------------------------------- inputs


@dataclass
class Batch:
    hidden: torch.Tensor
    weight: torch.Tensor
    targets: torch.Tensor
    cu_seqlens: torch.Tensor
    advantages: torch.Tensor
    origin: torch.Tensor
    old_logprobs: Optional[torch.Tensor]
    ref_logprobs: torch.Tensor
    behavior_logprobs: torch.Tensor
    loss_mask: torch.Tensor

    def keywords(self) -> dict:
        return dict(
            advantages=self.advantages, cu_seqlens=self.cu_seqlens, origin=self.origin,
            old_logprobs=self.old_logprobs, ref_logprobs=self.ref_logprobs,
            behavior_logprobs=self.behavior_logprobs, loss_mask=self.loss_mask,
        )


def make_batch(lengths, vocab, width, dtype, *, seed, scale=1.0, per_token_adv=False, with_old=True,
               origin=None, mask=None) -> Batch:
    """Random packed sequences: mixed origins, some masked tokens, old/ref/behavior log-probs near the truth."""
    gen = torch.Generator().manual_seed(seed)
    n = sum(lengths)
    hidden = (torch.randn(n, width, generator=gen) * scale).to(dtype)
    weight = (torch.randn(vocab, width, generator=gen) / width**0.5).to(dtype)
    targets = torch.randint(0, vocab, (n,), generator=gen)
    true_lp = reference.fused_linear_logprobs(hidden, weight, targets).double()
    near = lambda spread: (true_lp + spread * torch.randn(n, generator=gen, dtype=torch.float64)).float()  # noqa: E731
    return Batch(
        hidden=hidden,
        weight=weight,
        targets=targets,
        cu_seqlens=torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()]),
        advantages=torch.randn(n if per_token_adv else len(lengths), generator=gen),
        origin=(torch.randint(0, 3, (n,), generator=gen) * (torch.rand(n, generator=gen) < 0.4)
                if origin is None else origin),
        old_logprobs=near(0.3) if with_old else None,
        ref_logprobs=near(0.3),
        behavior_logprobs=near(0.5),
        loss_mask=torch.rand(n, generator=gen) > 0.15 if mask is None else mask,
    )


def run_loss(batch: Batch, config: LossConfig, backend: str, **extra):
    """Loss output and the gradients of hidden and weight; the reference runs on fp64 copies."""
    dtype = torch.float64 if backend == "reference" else batch.hidden.dtype
    hidden = batch.hidden.detach().to(dtype, copy=True).requires_grad_()
    weight = batch.weight.detach().to(dtype, copy=True).requires_grad_()
    out = fused_linear_grpo_loss(hidden, weight, batch.targets, **batch.keywords(), config=config, backend=backend,
                                 **extra)
    out.loss.backward()
    return out, hidden.grad, weight.grad


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.detach().double(), ref.detach().double()
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


def assert_close(out: torch.Tensor, ref: torch.Tensor, tol: float, what: str) -> None:
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    assert bool(torch.isfinite(out).all()), f"{what}: non-finite values"
    err = rel_err(out, ref)
    assert err < tol, f"{what}: relative error {err:.2e} >= {tol:.0e}"


def compare_with_reference(batch: Batch, config: LossConfig, backend: str, **extra) -> None:
    tol = TOLERANCE[batch.hidden.dtype]
    out, d_hidden, d_weight = run_loss(batch, config, backend, **extra)
    ref, ref_hidden, ref_weight = run_loss(batch, config, "reference", **extra)
    assert out.loss.dtype == torch.float32 and out.loss.dim() == 0 and out.loss.requires_grad
    assert_close(out.loss, ref.loss, tol, "loss")
    assert_close(out.logprobs, ref.logprobs, tol, "logprobs")
    assert out.logprobs.dtype == torch.float32 and not out.logprobs.requires_grad
    if config.entropy_coef != 0:
        assert_close(out.entropy, ref.entropy, tol, "entropy")
    else:
        assert out.entropy is None
    assert d_hidden.dtype == batch.hidden.dtype and d_weight.dtype == batch.weight.dtype
    assert_close(d_hidden, ref_hidden, tol, "grad hidden")
    assert_close(d_weight, ref_weight, tol, "grad weight")
    assert out.stats.keys() == ref.stats.keys()
    if batch.hidden.dtype == torch.float32:
        assert stats_as_floats(out.stats) == pytest.approx(stats_as_floats(ref.stats), rel=1e-3, abs=1e-5)


# ----------------------------------------------------------------------------- every mode

CONFIGS = {
    "ratio-k3": (LossConfig(beta=0.04, kl="k3"), {}),
    "is-tis-k2": (LossConfig(expert_mode="is", tis_cap=1.5, beta=0.1, kl="k2", eps_high=0.28), {}),
    # Clamps and cap active on many tokens (log-ratios spread ~0.3-0.5): their zero gradients are exact.
    "is-cap-tight-clamps": (LossConfig(expert_mode="is", is_cap=1.2, beta=0.1, kl="k3", log_ratio_clamp=0.4,
                                       kl_clamp=0.03, dual_clip=2.0), {}),
    "shaped-entropy-k1-temp": (LossConfig(expert_mode="shaped", entropy_coef=0.01, beta=0.05, kl="k1",
                                          temperature=0.7), {}),
    "dual-clip-seq-mean": (LossConfig(dual_clip=3.0, agg="seq-mean-token-mean", temperature=1.3,
                                      entropy_coef=0.003), {}),
    "sum-norm-per-token-adv": (LossConfig(agg="seq-mean-token-sum-norm", max_len=16, beta=0.02),
                               {"per_token_adv": True}),
    "no-old-logprobs": (LossConfig(tis_cap=2.0, beta=0.04), {"with_old": False}),
    "normalizer": (LossConfig(expert_mode="shaped"), {"normalizer": 100.0}),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", list(CONFIGS), ids=list(CONFIGS))
def test_modes_match_reference(name, dtype, backend):
    config, options = CONFIGS[name]
    extra = {"normalizer": options["normalizer"]} if "normalizer" in options else {}
    batch_options = {k: v for k, v in options.items() if k != "normalizer"}
    batch = make_batch([7, 1, 12, 20], vocab=1000, width=32, dtype=dtype, seed=list(CONFIGS).index(name),
                       **batch_options)
    compare_with_reference(batch, config, backend, **extra)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float64], ids=["fp16", "fp64"])
def test_other_dtypes_match_reference(dtype):
    batch = make_batch([5, 9], vocab=333, width=16, dtype=dtype, seed=7)
    compare_with_reference(batch, LossConfig(beta=0.1, entropy_coef=0.01, expert_mode="is"), "cpu")


# ----------------------------------------------------------------------------- adversarial inputs

ADVERSARIAL_CONFIG = LossConfig(beta=0.04, entropy_coef=0.01, expert_mode="shaped", temperature=0.9)


def adversarial_batch(vocab, width, dtype, *, seed, scale=1.0) -> Batch:
    """One-token sequences, a fully masked sequence, an all-expert one and mixed origins inside one."""
    lengths = [1, 6, 1, 4, 5]
    origin = torch.tensor([0, 0, 0, 0, 0, 0, 0, 2, 1, 1, 1, 1, 0, 1, 0, 2, 0])
    mask = torch.ones(sum(lengths), dtype=torch.bool)
    mask[1:7] = False  # sequence 1 fully masked
    return make_batch(lengths, vocab, width, dtype, seed=seed, scale=scale, origin=origin, mask=mask)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_vocab_not_a_multiple_of_any_block(dtype, backend):
    compare_with_reference(adversarial_batch(151937, 8, dtype, seed=1), ADVERSARIAL_CONFIG, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_large_logits(backend):
    batch = adversarial_batch(4099, 16, torch.float32, seed=2, scale=50.0)
    assert float((batch.hidden @ batch.weight.T).abs().max()) > 100
    compare_with_reference(batch, ADVERSARIAL_CONFIG, backend)


def test_many_chunks(monkeypatch):
    """A 1 MiB budget (64 rows of V=4099) splits 151 rows into chunks of 51, 51 and 49."""
    monkeypatch.setenv("EKIPL_CPU_CHUNK_MB", "1")
    batch = make_batch([40, 1, 59, 51], vocab=4099, width=24, dtype=torch.float32, seed=3)
    compare_with_reference(batch, LossConfig(beta=0.04, entropy_coef=0.01, agg="seq-mean-token-mean"), "cpu")


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_masked_gives_zero_loss_and_zero_gradients(backend):
    batch = make_batch([3, 4], vocab=500, width=8, dtype=torch.float32, seed=4, mask=torch.zeros(7))
    for agg in ("token-mean", "seq-mean-token-mean"):
        out, d_hidden, d_weight = run_loss(batch, LossConfig(agg=agg, beta=0.1, entropy_coef=0.1), backend)
        assert float(out.loss.detach()) == 0.0
        assert bool(torch.isfinite(out.logprobs).all())
        assert not d_hidden.any() and not d_weight.any()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kl", ["k1", "k2", "k3"])
def test_huge_log_ratios_stay_finite_and_match_the_reference(kl, backend):
    """Old, reference and behaviour log-probs 60 nats away: without the clamps exp() would overflow."""
    batch = make_batch([7, 1, 12, 20], vocab=500, width=16, dtype=torch.float32, seed=11)
    far = torch.tensor([60.0, -60.0, 0.0]).repeat(14)[: batch.hidden.shape[0]]
    batch = replace(batch, old_logprobs=batch.old_logprobs + far, ref_logprobs=batch.ref_logprobs - far,
                    behavior_logprobs=batch.behavior_logprobs + far.roll(1))
    for config in (LossConfig(expert_mode="is", beta=0.1, kl=kl, dual_clip=3.0),
                   LossConfig(expert_mode="is", is_cap=5.0, beta=0.1, kl=kl, tis_cap=2.0, agg="seq-mean-token-mean")):
        compare_with_reference(batch, config, backend)


def garbage_on_masked_tokens(batch: Batch) -> Batch:
    """NaN and inf in every per-token input and hidden row of the masked tokens."""
    masked = ~batch.loss_mask.bool()
    poison = lambda t, value=float("nan"): t.masked_fill(masked, value)  # noqa: E731
    hidden = batch.hidden.clone()
    rows = masked.nonzero().squeeze(1)
    hidden[rows[0::2]] = float("nan")
    hidden[rows[1::2]] = float("inf")
    return replace(batch, hidden=hidden, advantages=poison(batch.advantages), old_logprobs=poison(batch.old_logprobs),
                   ref_logprobs=poison(batch.ref_logprobs, float("inf")),
                   behavior_logprobs=poison(batch.behavior_logprobs))


@pytest.mark.parametrize("backend", BACKENDS)
def test_masked_tokens_reach_neither_loss_nor_gradient_whatever_they_hold(backend):
    clean = make_batch([7, 1, 12, 20], vocab=300, width=16, dtype=torch.float32, seed=12, per_token_adv=True)
    batch = garbage_on_masked_tokens(clean)
    config = LossConfig(expert_mode="is", beta=0.1, entropy_coef=0.01, tis_cap=2.0, agg="seq-mean-token-mean")
    out, d_hidden, d_weight = run_loss(batch, config, backend)
    ref, ref_hidden, ref_weight = run_loss(clean, config, "reference")
    masked = ~batch.loss_mask.bool()
    assert_close(out.loss, ref.loss, 1e-4, "loss")
    assert_close(d_weight, ref_weight, 1e-4, "grad weight")
    assert_close(d_hidden, ref_hidden, 1e-4, "grad hidden")
    assert not d_hidden[masked].any()
    assert_close(out.logprobs[~masked], ref.logprobs[~masked], 1e-4, "logprobs")
    assert stats_as_floats(out.stats) == pytest.approx(stats_as_floats(ref.stats), rel=1e-3, abs=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("entropy_coef", [0.0, 0.05])
def test_grpo_loss_with_masked_garbage_rows_and_minus_inf_vocabulary(entropy_coef, backend):
    batch = make_batch([5, 1, 9], vocab=203, width=8, dtype=torch.float32, seed=13, per_token_adv=True)
    logits = batch.hidden @ batch.weight.T * 3
    absent = torch.rand(logits.shape, generator=torch.Generator().manual_seed(0)) < 0.3
    absent[torch.arange(len(batch.targets)), batch.targets] = False  # a masked vocabulary never hides the target
    logits = logits.masked_fill(absent, float("-inf"))
    masked = ~batch.loss_mask.bool()
    logits[masked] = float("nan")
    config = LossConfig(beta=0.04, entropy_coef=entropy_coef, expert_mode="is", temperature=0.9)
    keywords = garbage_on_masked_tokens(batch).keywords()
    results = []
    for name, x in ((backend, logits), ("reference", logits.double())):
        x = x.detach().requires_grad_()
        out = grpo_loss(x, batch.targets, **keywords, config=config, backend=name)
        out.loss.backward()
        results.append((out, x.grad))
    (out, grad), (ref, ref_grad) = results
    assert_close(out.loss, ref.loss, 1e-4, "loss")
    assert_close(grad, ref_grad, 1e-4, "grad logits")
    assert not grad[masked].any() and not grad[absent].any()
    assert_close(out.logprobs[~masked], ref.logprobs[~masked], 1e-4, "logprobs")
    if entropy_coef:
        assert_close(out.entropy[~masked], ref.entropy[~masked], 1e-4, "entropy")


# ----------------------------------------------------------------------------- the other two ops


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_grpo_loss_over_logits(dtype, backend):
    batch = adversarial_batch(5003, 16, torch.float32, seed=5)
    logits = (batch.hidden @ batch.weight.T * 3).to(dtype)
    results = []
    for name, x in ((backend, logits), ("reference", logits.double())):
        x = x.detach().requires_grad_()
        out = grpo_loss(x, batch.targets, **batch.keywords(), config=ADVERSARIAL_CONFIG, backend=name)
        out.loss.backward()
        results.append((out, x.grad))
    (out, grad), (ref, ref_grad) = results
    tol = TOLERANCE[dtype]
    assert grad.dtype == dtype
    assert_close(out.loss, ref.loss, tol, "loss")
    assert_close(out.logprobs, ref.logprobs, tol, "logprobs")
    assert_close(out.entropy, ref.entropy, tol, "entropy")
    assert_close(grad, ref_grad, tol, "grad logits")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_fused_linear_logprobs_under_no_grad(dtype, backend):
    batch = make_batch([13, 4], vocab=151937, width=8, dtype=dtype, seed=6)
    hidden = batch.hidden.requires_grad_()
    with torch.no_grad():
        lp, entropy = fused_linear_logprobs(hidden, batch.weight, batch.targets, temperature=0.8,
                                            return_entropy=True, backend=backend)
        lp_only = fused_linear_logprobs(hidden, batch.weight, batch.targets, backend=backend)
    ref_lp, ref_entropy = fused_linear_logprobs(batch.hidden.double(), batch.weight.double(), batch.targets,
                                                temperature=0.8, return_entropy=True, backend="reference")
    ref_lp_only = fused_linear_logprobs(batch.hidden.double(), batch.weight.double(), batch.targets,
                                        backend="reference")
    tol = TOLERANCE[dtype]
    assert lp.dtype == torch.float32 and not lp.requires_grad
    assert_close(lp, ref_lp, tol, "logprobs at temperature 0.8")
    assert_close(entropy, ref_entropy, tol, "entropy")
    assert_close(lp_only, ref_lp_only, tol, "logprobs")


# ----------------------------------------------------------------------------- torch.compile


def test_torch_compile_over_the_op():
    batch = make_batch([6, 10], vocab=777, width=16, dtype=torch.float32, seed=8)
    config = LossConfig(beta=0.04, entropy_coef=0.01)

    def step(hidden, weight):
        out = fused_linear_grpo_loss(hidden, weight, batch.targets, **batch.keywords(), config=config, backend="cpu")
        return out.loss

    results = []
    for fn in (step, torch.compile(step, backend="aot_eager")):
        hidden = batch.hidden.clone().requires_grad_()
        weight = batch.weight.clone().requires_grad_()
        loss = fn(hidden, weight)
        loss.backward()
        results.append((loss.detach(), hidden.grad, weight.grad))
    for eager, compiled in zip(*results):
        assert torch.allclose(eager, compiled, rtol=1e-6, atol=1e-8)

    logprobs = torch.compile(torch.ops.ekipl.fused_linear_logprobs, backend="aot_eager", fullgraph=True)
    lp, _ = logprobs(batch.hidden, batch.weight, batch.targets, 1.0, False)
    assert torch.allclose(lp, fused_linear_logprobs(batch.hidden, batch.weight, batch.targets, backend="cpu"))


# ----------------------------------------------------------------------------- the op's own checks, the build


def test_op_rejects_bad_inputs_with_clear_messages():
    batch = make_batch([4], vocab=50, width=8, dtype=torch.float32, seed=9)
    logprobs = torch.ops.ekipl.fused_linear_logprobs
    with pytest.raises(RuntimeError, match="hidden must be float32, bfloat16, float16 or float64; got Int"):
        logprobs(batch.hidden.int(), batch.weight.int(), batch.targets, 1.0, False)
    with pytest.raises(RuntimeError, match=r"targets\[2\] = 50 is outside \[0, 50\)"):
        logprobs(batch.hidden, batch.weight, torch.tensor([0, 1, 50, 3]), 1.0, False)
    loss_op = torch.ops.ekipl.fused_linear_grpo_loss
    tokens = (torch.ones(4), torch.ones(4), torch.zeros(4, dtype=torch.bool), None, None, None)
    flags = dict(need_entropy=False, grad_hidden=True, grad_weight=True)
    with pytest.raises(RuntimeError, match="ref_logprobs is required when beta > 0"):
        loss_op(batch.hidden, batch.weight, batch.targets, *tokens, **ops.config_scalars(LossConfig(beta=0.1)), **flags)
    with pytest.raises(RuntimeError, match="the loss scalars must be finite; got nan"):
        loss_op(batch.hidden, batch.weight, batch.targets, *tokens,
                **{**ops.config_scalars(LossConfig()), "kl_clamp": float("nan")}, **flags)


def test_failed_build_quotes_the_compiler(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "extensions"))
    source = tmp_path / "broken.cpp"
    source.write_text("#error ekipl test: this source does not compile\n")
    with pytest.raises(BackendUnavailable, match="(?s)building the C\\+\\+ op 'ekipl_broken'.*does not compile"):
        build_op("ekipl_broken", [source])


def test_backend_names_agree_on_the_batch_statistics():
    batch = replace(make_batch([5, 5], vocab=64, width=8, dtype=torch.float32, seed=10), loss_mask=torch.ones(10))
    config = LossConfig(beta=0.1, entropy_coef=0.02)
    stats = [run_loss(batch, config, name)[0].stats for name in ("cpu", "reference")]
    assert stats[0].keys() == stats[1].keys() >= {"clip_frac", "ratio_mean", "kl_mean", "entropy_mean",
                                                    "tokens_policy", "tokens_expert"}
    assert stats[0]["tokens_policy"] + stats[0]["tokens_expert"] == 10
