"""Every fast backend (chunked, the C++ op, Triton, interpreted on CPU tensors) against the fp64 reference,
through the public functions, on the shared random batches of ``ekipl_kernels.testing``.

Uninitialised memory is poisoned with NaN (deterministic mode fills every ``empty`` tensor, the C++ op's outputs
and buffers included), so an element a backend forgets to write shows up as NaN. Relative error
``||out - ref|| / ||ref||``: fp32 < 1e-4, bf16 and fp16 < 1e-2, fp64 < 1e-10 (chunked, which computes in fp32,
1e-4; Triton takes no fp64). Triton runs in its interpreter here, so its cases use vocabularies of a few
thousand where the others use Qwen's.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from ekipl_kernels import (KernelOptions, LossConfig, fused_linear_grpo_loss, fused_linear_logprobs, grpo_loss,
                           normalizer_count, stats_as_floats)
from ekipl_kernels.backends import BackendUnavailable, load_backend
from ekipl_kernels.reference import token_losses
from ekipl_kernels.testing import random_batch

TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 1e-2, torch.float16: 1e-2, torch.float64: 1e-10}


def _available(name: str):
    try:
        load_backend(name)
    except BackendUnavailable as exc:
        return pytest.param(name, marks=pytest.mark.skip(reason=str(exc)))
    return name


BACKENDS = [_available(name) for name in ("chunked", "cpu", "triton")]


pytestmark = pytest.mark.usefixtures("poisoned_uninitialized_memory")


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.detach().double(), ref.detach().double()
    assert out.shape == ref.shape and bool(torch.isfinite(out).all())
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


def run(loss_fn, inputs, batch, config, backend, **extra):
    """Loss output and the gradients of ``inputs`` (hidden and weight, or logits)."""
    inputs = [x.detach().clone().requires_grad_() for x in inputs]
    out = loss_fn(*inputs, batch.targets, config=config, backend=backend, **batch.keywords, **extra)
    return out, torch.autograd.grad(out.loss, inputs)


ENTRY_POINTS = {
    "linear": (fused_linear_grpo_loss, lambda b: (b.hidden, b.weight)),
    "logits": (grpo_loss, lambda b: (b.logits(),)),
}


@pytest.mark.parametrize("entry", sorted(ENTRY_POINTS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_entropy_is_returned_for_logging_without_changing_the_loss(backend, entry):
    """return_entropy=True with entropy_coef == 0: the reference's entropies and entropy_mean, the loss and its
    gradients those of return_entropy=False (the entropy is detached, not part of the objective)."""
    loss_fn, inputs_of = ENTRY_POINTS[entry]
    batch = random_batch(seed=3, logit_scale=2.0)
    config = LossConfig(beta=0.05, temperature=0.8)
    out, grads = run(loss_fn, inputs_of(batch), batch, config, backend, return_entropy=True)
    plain, plain_grads = run(loss_fn, inputs_of(batch), batch, config, backend)
    ref, _ = run(loss_fn, [x.double() for x in inputs_of(batch)], batch, config, "reference", return_entropy=True)

    assert plain.entropy is None and "entropy_mean" not in plain.stats
    assert out.entropy.dtype == torch.float32 and not out.entropy.requires_grad
    assert rel_err(out.entropy, ref.entropy) < TOLERANCE[batch.hidden.dtype]
    assert float(out.stats["entropy_mean"]) == pytest.approx(float(ref.stats["entropy_mean"]), rel=1e-4)
    assert out.stats.keys() == ref.stats.keys()
    torch.testing.assert_close(out.loss, plain.loss, rtol=0, atol=0)
    for g, p in zip(grads, plain_grads):
        torch.testing.assert_close(g, p, rtol=0, atol=0)
    mask = batch.keywords["loss_mask"] != 0
    expected = ref.entropy[mask].double().mean()
    assert stats_as_floats(out.stats)["entropy_mean"] == pytest.approx(float(expected), rel=1e-4)


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_normalizer_count_is_the_loss_default(agg):
    """Passing normalizer_count(...) as the normaliser gives the loss without one; packed and padded agree."""
    batch = random_batch(seed=5)
    config = LossConfig(agg=agg, max_len=20 if agg == "seq-mean-token-sum-norm" else None)
    kw = batch.keywords
    count = normalizer_count(config, kw["cu_seqlens"], kw["loss_mask"])
    expected = {"token-mean": kw["loss_mask"].sum(), "seq-mean-token-mean": 5.0, "seq-mean-token-sum-norm": 6.0}[agg]
    assert float(count) == float(expected)  # one of the six sequences is fully masked
    plain = fused_linear_grpo_loss(batch.hidden, batch.weight, batch.targets, config=config, backend="reference", **kw)
    given = fused_linear_grpo_loss(batch.hidden, batch.weight, batch.targets, config=config, backend="reference",
                                   normalizer=count, **kw)
    torch.testing.assert_close(given.loss, plain.loss)
    lengths = kw["cu_seqlens"].diff()
    padded = torch.zeros(len(lengths), int(lengths.max()))
    for row, (start, length) in enumerate(zip(kw["cu_seqlens"][:-1].tolist(), lengths.tolist())):
        padded[row, :length] = kw["loss_mask"][start:start + length]
    assert float(normalizer_count(agg, None, padded)) == float(count)


def assert_matches_reference(loss_fn, inputs, batch, config, backend, tol=None, **extra):
    """Loss, log-probs, entropy (when the config or return_entropy asks for it, else None), the statistics (their
    names; for fp32 their values) and the gradients of every input of a fast backend within the inputs' dtype's
    tolerance (or ``tol``) of the fp64 reference's; the outputs' dtypes and autograd flags."""
    out, grads = run(loss_fn, inputs, batch, config, backend, **extra)
    ref, ref_grads = run(loss_fn, [x.double() for x in inputs], batch, config, "reference", **{
        key: value.double() if isinstance(value, torch.Tensor) and value.is_floating_point() else value
        for key, value in extra.items() if key != "options"})
    dtype = inputs[0].dtype
    tol = TOLERANCE[dtype] if tol is None else tol
    assert out.loss.dtype == torch.float32 and out.loss.dim() == 0 and out.loss.requires_grad
    assert rel_err(out.loss, ref.loss) < tol
    assert out.logprobs.dtype == torch.float32 and not out.logprobs.requires_grad
    assert rel_err(out.logprobs, ref.logprobs) < tol
    if config.entropy_coef != 0 or extra.get("return_entropy"):
        assert rel_err(out.entropy, ref.entropy) < tol
    else:
        assert out.entropy is None
    for g, r in zip(grads, ref_grads):
        assert g.dtype == dtype
        assert rel_err(g, r) < tol
    assert out.stats.keys() == ref.stats.keys()
    if dtype == torch.float32:
        assert stats_as_floats(out.stats) == pytest.approx(stats_as_floats(ref.stats), rel=1e-3, abs=1e-5)
    return out, ref


SCHEDULES = {"chunked": [None], "cpu": [None], "triton": ["rows", "vocab"]}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backend", BACKENDS)
def test_lm_head_bias(backend, dtype):
    """logits = h W^T + b: loss, log-probs and the gradients of h, W and b against the reference (every Triton
    schedule), the no-gradient path, and fused_linear_logprobs (every Triton path)."""
    from ekipl_kernels import KernelOptions, fused_linear_logprobs

    batch = random_batch(seed=11, dtype=dtype, with_bias=True, logit_scale=2.0)
    config = LossConfig(beta=0.05, temperature=0.9, entropy_coef=0.01)
    inputs = (batch.hidden, batch.weight)
    for schedule in SCHEDULES[backend]:
        options = KernelOptions(backend=backend, **({"schedule": schedule} if schedule else {}))
        bias = batch.bias.detach().clone().requires_grad_()
        out, ref = assert_matches_reference(fused_linear_grpo_loss, inputs, batch, config, backend, bias=bias,
                                            options=options)
        (d_bias,) = torch.autograd.grad(
            fused_linear_grpo_loss(*inputs, batch.targets, bias=bias, config=config, options=options,
                                   **batch.keywords).loss, bias)
        ref_bias = batch.bias.double().requires_grad_()
        (ref_d_bias,) = torch.autograd.grad(
            fused_linear_grpo_loss(*(x.double() for x in inputs), batch.targets, bias=ref_bias, config=config,
                                   backend="reference", **batch.keywords).loss, ref_bias)
        assert d_bias.dtype == dtype and rel_err(d_bias, ref_d_bias) < TOLERANCE[dtype]
    # Only the bias wants a gradient: the loss still forms it.
    bias = batch.bias.detach().clone().requires_grad_()
    alone = fused_linear_grpo_loss(*inputs, batch.targets, bias=bias, config=config, backend=backend, **batch.keywords)
    (d_alone,) = torch.autograd.grad(alone.loss, bias)
    assert rel_err(d_alone, ref_d_bias) < TOLERANCE[dtype]
    assert rel_err(alone.loss, ref.loss) < TOLERANCE[dtype]

    ref_lp = fused_linear_logprobs(*inputs, batch.targets, bias=batch.bias, temperature=0.9, backend="reference")
    for path in ("fused", "cublas") if backend == "triton" else ("fused",):
        lp, ent = fused_linear_logprobs(*inputs, batch.targets, bias=batch.bias, temperature=0.9, return_entropy=True,
                                        options=KernelOptions(backend=backend, logprobs_path=path))
        assert rel_err(lp, ref_lp) < TOLERANCE[dtype] and rel_err(ent, out.entropy) < TOLERANCE[dtype]
    with pytest.raises(ValueError, match="bias must be a tensor of shape"):
        fused_linear_grpo_loss(*inputs, batch.targets, bias=batch.bias[:-1], config=config, backend=backend,
                               **batch.keywords)


POLICY_LOSS_CONFIGS = {
    "cispo": LossConfig(policy_loss="cispo", cispo_cap=1.1, beta=0.05, temperature=0.9),
    "cispo-is-experts": LossConfig(policy_loss="cispo", cispo_cap=0.9, expert_mode="is", is_cap=2.0, tis_cap=1.5),
    "sapo": LossConfig(policy_loss="sapo", beta=0.05, entropy_coef=0.01),
    "sapo-shaped-experts": LossConfig(policy_loss="sapo", sapo_temperature_pos=0.5, sapo_temperature_neg=2.0,
                                      expert_mode="shaped", agg="seq-mean-token-mean"),
}


@pytest.mark.parametrize("name", sorted(POLICY_LOSS_CONFIGS))
@pytest.mark.parametrize("entry", sorted(ENTRY_POINTS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_policy_loss_modes(backend, entry, name):
    """CISPO and SAPO (with either expert rule beside them): values and gradients against the reference."""
    loss_fn, inputs_of = ENTRY_POINTS[entry]
    batch = random_batch(seed=13, logit_scale=2.0)
    out, ref = assert_matches_reference(loss_fn, inputs_of(batch), batch, POLICY_LOSS_CONFIGS[name], backend)
    assert float(out.stats["clip_frac"]) == pytest.approx(float(ref.stats["clip_frac"]), abs=1e-6)


def test_policy_loss_definitions():
    """The reference's CISPO and SAPO are TRL 1.16's formulas, token by token."""
    gen = torch.Generator().manual_seed(0)
    lp = (-torch.rand(50, generator=gen, dtype=torch.float64) * 3).requires_grad_()
    old = lp.detach() + 0.5 * torch.randn(50, generator=gen, dtype=torch.float64)
    adv = torch.randn(50, generator=gen, dtype=torch.float64)
    common = dict(advantages=adv, is_expert=torch.zeros(50, dtype=torch.bool), old_logprobs=old, ref_logprobs=None,
                  behavior_logprobs=None)
    ratio = torch.exp(lp - old)
    cispo, _ = token_losses(lp, None, config=LossConfig(policy_loss="cispo", cispo_cap=1.2), **common)
    expected = -torch.clamp(ratio, max=1.2).detach() * adv * lp
    torch.testing.assert_close(cispo, expected)
    torch.testing.assert_close(*(torch.autograd.grad(x.sum(), lp)[0] for x in (cispo, expected)))
    sapo, _ = token_losses(lp, None, config=LossConfig(policy_loss="sapo"), **common)
    tau = torch.where(adv > 0, 1.0, 1.05)
    expected = -torch.sigmoid(tau * (ratio - 1)) * 4 / tau * adv
    torch.testing.assert_close(sapo, expected)
    torch.testing.assert_close(*(torch.autograd.grad(x.sum(), lp)[0] for x in (sapo, expected)))


def test_policy_loss_config_is_checked():
    with pytest.raises(ValueError, match="policy_loss"):
        LossConfig(policy_loss="gpg")
    with pytest.raises(ValueError, match="dual_clip"):
        LossConfig(policy_loss="cispo", dual_clip=3.0)
    for name in ("cispo_cap", "sapo_temperature_pos", "sapo_temperature_neg"):
        with pytest.raises(ValueError, match=name):
            LossConfig(**{name: 0.0})


KL_CORRECTION_CONFIGS = {
    "k3": LossConfig(beta=0.2, kl_bias_correction=True),
    "k2-is-experts": LossConfig(beta=0.2, kl="k2", kl_bias_correction=True, expert_mode="is", policy_loss="sapo"),
    "k3-clamped": LossConfig(beta=0.2, kl_bias_correction=True, log_ratio_clamp=0.3, kl_clamp=0.05),
}


@pytest.mark.parametrize("name", sorted(KL_CORRECTION_CONFIGS))
@pytest.mark.parametrize("entry", sorted(ENTRY_POINTS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_kl_bias_correction(backend, entry, name):
    """The ratio-weighted KL: values and gradients against the reference, with and without old log-probs (on
    policy the value is the plain KL's, the gradient is not)."""
    loss_fn, inputs_of = ENTRY_POINTS[entry]
    batch = random_batch(seed=17, logit_scale=2.0)
    config = KL_CORRECTION_CONFIGS[name]
    assert_matches_reference(loss_fn, inputs_of(batch), batch, config, backend)
    on_policy = random_batch(seed=17, logit_scale=2.0)
    on_policy.keywords["old_logprobs"] = None
    assert_matches_reference(loss_fn, inputs_of(on_policy), on_policy, config, backend)
    out, grads = run(loss_fn, inputs_of(on_policy), on_policy, config, backend)
    plain, plain_grads = run(loss_fn, inputs_of(on_policy), on_policy, replace(config, kl_bias_correction=False),
                             backend)
    if config.expert_mode != "is":  # "is" experts' ratio is to the behaviour log-probs, not 1
        assert float(out.loss.detach()) == pytest.approx(float(plain.loss.detach()), rel=1e-5)
    assert rel_err(grads[0], plain_grads[0]) > 1e-3


def test_kl_bias_correction_is_trls():
    """TRL 1.16: per_token_kl = (exp(ref - lp) - (ref - lp) - 1) * exp(lp - old), the ratio differentiated."""
    gen = torch.Generator().manual_seed(1)
    lp = (-torch.rand(40, generator=gen, dtype=torch.float64) * 3).requires_grad_()
    old = lp.detach() + 0.5 * torch.randn(40, generator=gen, dtype=torch.float64)
    ref = lp.detach() + 0.5 * torch.randn(40, generator=gen, dtype=torch.float64)
    adv = torch.zeros(40, dtype=torch.float64)  # the surrogate vanishes: the loss is beta * kl
    config = LossConfig(beta=1.0, kl_bias_correction=True, log_ratio_clamp=None, kl_clamp=None)
    loss, _ = token_losses(lp, None, advantages=adv, is_expert=torch.zeros(40, dtype=torch.bool), old_logprobs=old,
                           ref_logprobs=ref, behavior_logprobs=None, config=config)
    expected = (torch.exp(ref - lp) - (ref - lp) - 1) * torch.exp(lp - old)
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(*(torch.autograd.grad(x.sum(), lp)[0] for x in (loss, expected)))


SEQUENCE_LEVEL_CONFIGS = {
    "gspo": LossConfig(ratio_level="sequence", eps_low=3e-4, eps_high=4e-4, beta=0.05, entropy_coef=0.01),
    "gspo-seq-mean-kl-corrected": LossConfig(ratio_level="sequence", eps_low=0.05, eps_high=0.05, beta=0.1,
                                             kl_bias_correction=True, agg="seq-mean-token-mean"),
    "sapo-sequence-shaped-experts": LossConfig(ratio_level="sequence", policy_loss="sapo", expert_mode="shaped"),
}


@pytest.mark.parametrize("name", sorted(SEQUENCE_LEVEL_CONFIGS))
@pytest.mark.parametrize("entry", sorted(ENTRY_POINTS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_sequence_level_ratio(backend, entry, name):
    """GSPO's sequence ratio against the reference (the C++ and Triton names run the chunked two passes), in one
    chunk and across many (a sequence split between chunks), per-sequence and per-token advantages."""
    import ekipl_kernels.chunked as chunked

    loss_fn, inputs_of = ENTRY_POINTS[entry]
    config = SEQUENCE_LEVEL_CONFIGS[name]
    for per_token in (False, True):
        batch = random_batch(seed=19, logit_scale=2.0, per_token_advantages=per_token)
        assert_matches_reference(loss_fn, inputs_of(batch), batch, config, backend)
    budget = chunked.CHUNK_BYTES
    try:
        chunked.CHUNK_BYTES = 4 * 1001 * 5  # five rows a chunk
        out, ref = assert_matches_reference(loss_fn, inputs_of(batch), batch, config, backend)
    finally:
        chunked.CHUNK_BYTES = budget
    assert float(out.stats["ratio_mean"]) == pytest.approx(float(ref.stats["ratio_mean"]), rel=1e-5)


@pytest.mark.parametrize("entry", sorted(ENTRY_POINTS))
@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "chunked"])
def test_sequence_level_ratio_runs_on_the_named_backends_kernels(backend, entry, monkeypatch):
    """GSPO on "cpu"/"triton" runs both passes through that backend (no chunked fallback) and still matches."""
    import ekipl_kernels.chunked as chunked

    def refuse(*args, **kwargs):
        raise AssertionError("the chunked backend ran")

    for name in ("linear_loss", "logits_loss", "linear_logprobs"):
        monkeypatch.setattr(chunked, name, refuse)
    loss_fn, inputs_of = ENTRY_POINTS[entry]
    batch = random_batch(seed=19, logit_scale=2.0)
    assert_matches_reference(loss_fn, inputs_of(batch), batch, SEQUENCE_LEVEL_CONFIGS["gspo"], backend)


def test_sequence_level_ratio_is_trls():
    """TRL 1.16 (importance_sampling_level="sequence"): exp of the masked mean of lp - old over each sequence,
    broadcast to its tokens, the gradient reaching every token."""
    from ekipl_kernels.reference import sequence_log_ratio

    lp = torch.randn(7, dtype=torch.float64).requires_grad_()
    old = torch.randn(7, dtype=torch.float64)
    mask = torch.tensor([1.0, 0, 1, 1, 1, 0, 0])
    seq_start = torch.tensor([0, 0, 0, 3, 3, 5, 5])  # sequences [0, 3), [3, 5), [5, 7) (all masked)
    padded = lambda x: torch.stack([x[0:3], torch.cat([x[3:5], x.new_zeros(1)]), torch.cat([x[5:7], x.new_zeros(1)])])  # noqa: E731
    pmask = padded(mask)
    trl = ((padded(lp - old) * pmask).sum(-1) / pmask.sum(-1).clamp(min=1.0))[[0, 0, 0, 1, 1, 2, 2]]
    ours = sequence_log_ratio(lp, old, seq_start, mask, 7)
    torch.testing.assert_close(ours, trl)
    weights = torch.randn(7, dtype=torch.float64)
    torch.testing.assert_close(*(torch.autograd.grad((x.exp() * weights).sum(), lp)[0] for x in (ours, trl)))
    with pytest.raises(ValueError, match="ratio_level"):
        LossConfig(ratio_level="sequence", expert_mode="is")


# ----------------------------------------------------------------------------------------------------------
# Every mode, dtype and awkward input, from hidden states and from logits (moved from tests/test_cpu_op.py)

# Expert and masked tokens at random positions besides the adversarial layout.
MIXED = dict(expert_fraction=0.4, masked_fraction=0.15)
DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16")]


def big_vocab(backend: str) -> int:
    """Qwen's vocabulary plus one; 4099 for interpreted Triton (past every interpreted block and split, a multiple
    of none), whose cost grows with V."""
    return 4099 if backend == "triton" else 151937


def linear_inputs(batch):
    return ENTRY_POINTS["linear"][1](batch)


MODE_CONFIGS = {
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
                               {"per_token_advantages": True}),
    "no-old-logprobs": (LossConfig(tis_cap=2.0, beta=0.04), {"with_old": False}),
    "normalizer": (LossConfig(expert_mode="shaped"), {"normalizer": 100.0}),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", list(MODE_CONFIGS))
def test_modes_match_reference(name, dtype, backend):
    config, options = MODE_CONFIGS[name]
    extra = {"normalizer": options["normalizer"]} if "normalizer" in options else {}
    batch_options = {k: v for k, v in options.items() if k != "normalizer"}
    batch = random_batch(vocab=1000, hidden_size=32, dtype=dtype, seed=list(MODE_CONFIGS).index(name), **MIXED,
                         **batch_options)
    assert_matches_reference(fused_linear_grpo_loss, linear_inputs(batch), batch, config, backend, **extra)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [pytest.param(torch.float16, id="fp16"), pytest.param(torch.float64, id="fp64")])
def test_other_dtypes_match_reference(dtype, backend):
    """fp16, and fp64 to 1e-10 on the C++ op. The fast backends share fp32 aggregation weights (TokenInputs), the
    reference divides in fp64: 32 unmasked tokens make 1 / 32 exact in both. The chunked backend computes in fp32
    whatever its inputs' dtype, so fp64 holds it to fp32's tolerance."""
    if backend == "triton" and dtype == torch.float64:
        pytest.skip("Triton takes fp32, bf16 and fp16; fp64 runs on the chunked backend (backend=None picks it)")
    batch = random_batch(vocab=333, hidden_size=16, dtype=dtype, seed=9, **MIXED)
    assert float(batch.keywords["loss_mask"].sum()) == 32
    config = LossConfig(beta=0.1, entropy_coef=0.01, expert_mode="is")
    tol = TOLERANCE[torch.float32] if backend == "chunked" and dtype == torch.float64 else None
    assert_matches_reference(fused_linear_grpo_loss, linear_inputs(batch), batch, config, backend, tol=tol)


ADVERSARIAL_CONFIG = LossConfig(beta=0.04, entropy_coef=0.01, expert_mode="shaped", temperature=0.9)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_vocab_not_a_multiple_of_any_block(dtype, backend):
    batch = random_batch(lengths=(1, 4, 1, 3, 8, 7), vocab=big_vocab(backend), hidden_size=8, dtype=dtype, seed=1,
                         **MIXED)
    assert_matches_reference(fused_linear_grpo_loss, linear_inputs(batch), batch, ADVERSARIAL_CONFIG, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_large_logits(backend):
    batch = random_batch(vocab=4099, hidden_size=16, logit_scale=50.0, seed=2, **MIXED)
    assert float(batch.logits().abs().max()) > 100
    assert_matches_reference(fused_linear_grpo_loss, linear_inputs(batch), batch, ADVERSARIAL_CONFIG, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_many_chunks(backend, monkeypatch):
    """1 MiB of scratch (63 rows of V=4099 in fp32) splits 151 rows into three chunks: the C++ op's rows into 51, 51
    and 49, chunked's into 63, 63 and 25. Interpreted Triton gets a quarter of both (63 rows of V=1031): its rows
    schedule 51, 51 and 49 rows, its vocab schedule slices of 384, 384 and 263 columns."""
    import ekipl_kernels.chunked as chunked

    vocab, megabytes = (1031, 0.25) if backend == "triton" else (4099, 1)
    monkeypatch.setenv("EKIPL_CPU_CHUNK_MB", str(megabytes))
    monkeypatch.setenv("EKIPL_TRITON_CHUNK_MB", str(megabytes))
    monkeypatch.setattr(chunked, "CHUNK_BYTES", int(megabytes * 2**20))
    batch = random_batch(lengths=(40, 1, 59, 1, 30, 20), vocab=vocab, hidden_size=24, seed=3, **MIXED)
    config = LossConfig(beta=0.04, entropy_coef=0.01, agg="seq-mean-token-mean")
    for schedule in SCHEDULES[backend]:
        options = KernelOptions(backend=backend, **({"schedule": schedule} if schedule else {}))
        assert_matches_reference(fused_linear_grpo_loss, linear_inputs(batch), batch, config, backend,
                                 options=options)


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_masked_gives_zero_loss_and_zero_gradients(backend):
    batch = random_batch(vocab=500, hidden_size=8, seed=4, **MIXED)
    batch.keywords["loss_mask"] = torch.zeros_like(batch.keywords["loss_mask"])
    for agg in ("token-mean", "seq-mean-token-mean"):
        out, grads = run(fused_linear_grpo_loss, linear_inputs(batch), batch,
                         LossConfig(agg=agg, beta=0.1, entropy_coef=0.1), backend)
        assert float(out.loss.detach()) == 0.0
        assert bool(torch.isfinite(out.logprobs).all())
        assert not any(g.any() for g in grads)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kl", ["k1", "k2", "k3"])
def test_huge_log_ratios_stay_finite_and_match_the_reference(kl, backend):
    """Old, reference and behaviour log-probs 60 nats away: without the clamps exp() would overflow."""
    batch = random_batch(vocab=500, hidden_size=16, seed=11, **MIXED)
    n = batch.hidden.shape[0]
    far = torch.tensor([60.0, -60.0, 0.0]).repeat(n // 3 + 1)[:n]
    kw = batch.keywords
    kw.update(old_logprobs=kw["old_logprobs"] + far, ref_logprobs=kw["ref_logprobs"] - far,
              behavior_logprobs=kw["behavior_logprobs"] + far.roll(1))
    for config in (LossConfig(expert_mode="is", beta=0.1, kl=kl, dual_clip=3.0),
                   LossConfig(expert_mode="is", is_cap=5.0, beta=0.1, kl=kl, tis_cap=2.0, agg="seq-mean-token-mean")):
        assert_matches_reference(fused_linear_grpo_loss, linear_inputs(batch), batch, config, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("per_token", [True, False], ids=["token-advantages", "sequence-advantages"])
def test_masked_tokens_reach_neither_loss_nor_gradient_whatever_they_hold(per_token, backend):
    """NaN and inf on every masked token (hidden rows, log-probs, advantages): the clean batch's reference."""
    clean = random_batch(vocab=300, hidden_size=16, seed=12, per_token_advantages=per_token, **MIXED)
    batch = random_batch(vocab=300, hidden_size=16, seed=12, per_token_advantages=per_token, masked_garbage=True,
                         **MIXED)
    config = LossConfig(expert_mode="is", beta=0.1, entropy_coef=0.01, tis_cap=2.0, agg="seq-mean-token-mean")
    out, (d_hidden, d_weight) = run(fused_linear_grpo_loss, linear_inputs(batch), batch, config, backend)
    ref, (ref_hidden, ref_weight) = run(fused_linear_grpo_loss, [x.double() for x in linear_inputs(clean)], clean,
                                        config, "reference")
    masked = batch.keywords["loss_mask"] == 0
    assert not torch.isfinite(batch.hidden[masked]).any()
    assert rel_err(out.loss, ref.loss) < 1e-4
    assert rel_err(d_weight, ref_weight) < 1e-4
    assert rel_err(d_hidden, ref_hidden) < 1e-4
    assert not d_hidden[masked].any()
    assert rel_err(out.logprobs[~masked], ref.logprobs[~masked]) < 1e-4
    assert stats_as_floats(out.stats) == pytest.approx(stats_as_floats(ref.stats), rel=1e-3, abs=1e-5)


def logits_loss_and_grad(logits, batch, config, backend):
    x = logits.detach().clone().requires_grad_()
    out = grpo_loss(x, batch.targets, config=config, backend=backend, **batch.keywords)
    out.loss.backward()
    return out, x.grad


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("entropy_coef", [0.0, 0.05])
def test_grpo_loss_with_masked_garbage_rows_and_minus_inf_vocabulary(entropy_coef, backend):
    batch = random_batch(vocab=203, hidden_size=8, seed=13, per_token_advantages=True, logit_scale=3.0,
                         masked_garbage=True, minus_inf_fraction=0.3, **MIXED)
    logits = batch.logits()
    masked = batch.keywords["loss_mask"] == 0
    assert not torch.isfinite(logits[masked]).all(dim=1).any()
    config = LossConfig(beta=0.04, entropy_coef=entropy_coef, expert_mode="is", temperature=0.9)
    out, grad = logits_loss_and_grad(logits, batch, config, backend)
    ref, ref_grad = logits_loss_and_grad(logits.double(), batch, config, "reference")
    assert rel_err(out.loss, ref.loss) < 1e-4
    assert rel_err(grad, ref_grad) < 1e-4
    assert not grad[masked].any() and not grad[batch.absent].any()
    assert rel_err(out.logprobs[~masked], ref.logprobs[~masked]) < 1e-4
    if entropy_coef:
        assert rel_err(out.entropy[~masked], ref.entropy[~masked]) < 1e-4


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES + [pytest.param(torch.float16, id="fp16")])
def test_grpo_loss_over_logits(dtype, backend):
    batch = random_batch(vocab=5003, hidden_size=16, logit_scale=3.0, seed=5, **MIXED)
    logits = batch.logits().to(dtype)
    out, grad = logits_loss_and_grad(logits, batch, ADVERSARIAL_CONFIG, backend)
    ref, ref_grad = logits_loss_and_grad(logits.double(), batch, ADVERSARIAL_CONFIG, "reference")
    tol = TOLERANCE[dtype]
    assert grad.dtype == dtype
    assert rel_err(out.loss, ref.loss) < tol
    assert rel_err(out.logprobs, ref.logprobs) < tol
    assert rel_err(out.entropy, ref.entropy) < tol
    assert rel_err(grad, ref_grad) < tol


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_linear_logprobs_under_no_grad(dtype, backend):
    batch = random_batch(lengths=(13, 4), vocab=big_vocab(backend), hidden_size=8, dtype=dtype, seed=6,
                         adversarial=False)
    hidden = batch.hidden.clone().requires_grad_()
    ref_lp, ref_entropy = fused_linear_logprobs(batch.hidden.double(), batch.weight.double(), batch.targets,
                                                temperature=0.8, return_entropy=True, backend="reference")
    ref_lp_only = fused_linear_logprobs(batch.hidden.double(), batch.weight.double(), batch.targets,
                                        backend="reference")
    tol = TOLERANCE[dtype]
    for path in ("fused", "cublas") if backend == "triton" else ("fused",):
        options = KernelOptions(backend=backend, logprobs_path=path)
        with torch.no_grad():
            lp, entropy = fused_linear_logprobs(hidden, batch.weight, batch.targets, temperature=0.8,
                                                return_entropy=True, options=options)
            lp_only = fused_linear_logprobs(hidden, batch.weight, batch.targets, options=options)
        assert lp.dtype == torch.float32 and not lp.requires_grad
        assert rel_err(lp, ref_lp) < tol  # at temperature 0.8
        assert rel_err(entropy, ref_entropy) < tol
        assert rel_err(lp_only, ref_lp_only) < tol


@pytest.mark.parametrize("backend", BACKENDS)
def test_backend_names_agree_on_the_batch_statistics(backend):
    batch = random_batch(lengths=(5, 5), vocab=64, hidden_size=8, seed=10, adversarial=False, expert_fraction=0.4)
    assert bool((batch.keywords["loss_mask"] == 1).all())
    config = LossConfig(beta=0.1, entropy_coef=0.02)
    stats = [run(fused_linear_grpo_loss, linear_inputs(batch), batch, config, name)[0].stats
             for name in (backend, "reference")]
    assert stats[0].keys() == stats[1].keys() >= {"clip_frac", "ratio_mean", "kl_mean", "entropy_mean",
                                                    "tokens_policy", "tokens_expert"}
    assert stats[0]["tokens_policy"] + stats[0]["tokens_expert"] == 10
    assert 0 < stats[0]["tokens_expert"] == stats[1]["tokens_expert"]


TIS_LEVEL_CONFIGS = {
    "clip-kl": LossConfig(tis_cap=2.0, tis_level="sequence", beta=0.05, entropy_coef=0.01),
    "is-experts": LossConfig(tis_cap=1.5, tis_level="sequence", expert_mode="is", is_cap=3.0),
    "gspo-cispo": LossConfig(tis_cap=2.0, tis_level="sequence", ratio_level="sequence", policy_loss="cispo"),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", sorted(TIS_LEVEL_CONFIGS))
@pytest.mark.parametrize("entry", sorted(ENTRY_POINTS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_sequence_level_tis(backend, entry, name, dtype):
    """Sequence-level truncated IS (LossConfig.tis_level="sequence", TRL's vLLM "sequence_truncate") against the
    reference, whose weight test_sequence_weight_is_trls_sequence_truncate checks against TRL's formula."""
    loss_fn, inputs_of = ENTRY_POINTS[entry]
    batch = random_batch(seed=29, logit_scale=2.0, dtype=dtype)
    assert_matches_reference(loss_fn, inputs_of(batch), batch, TIS_LEVEL_CONFIGS[name], backend)


def test_sequence_weight_is_trls_sequence_truncate():
    """The loss and logit gradient equal the per-token surrogate times TRL's per-sequence weight, written out."""
    batch = random_batch(seed=23, logit_scale=2.0)
    kw = batch.keywords
    # old - behaviour small enough that some sequences' weights stay under the cap and others are truncated
    kw["behavior_logprobs"] = kw["old_logprobs"] + 0.15 * torch.randn(kw["old_logprobs"].shape,
                                                                       generator=torch.Generator().manual_seed(4))
    config = LossConfig(tis_cap=1.2, tis_level="sequence", beta=0.0)
    logits = batch.logits().double().requires_grad_()
    out = grpo_loss(logits, batch.targets, config=config, backend="reference", **kw)
    (grad,) = torch.autograd.grad(out.loss, logits)

    logits_trl = batch.logits().double().requires_grad_()
    lp = torch.log_softmax(logits_trl, -1).gather(1, batch.targets[:, None]).squeeze(1)
    cu = kw["cu_seqlens"]
    seq_index = torch.repeat_interleave(torch.arange(len(cu) - 1), cu.diff())
    is_expert, mask = kw["origin"] > 0, kw["loss_mask"].double()
    pg, _ = token_losses(lp, None, advantages=kw["advantages"][seq_index].double(), is_expert=is_expert,
                         old_logprobs=kw["old_logprobs"].double(), ref_logprobs=None, behavior_logprobs=None,
                         config=LossConfig(beta=0.0))
    log_weight = torch.zeros(len(cu) - 1, dtype=torch.float64).index_add(
        0, seq_index, (kw["old_logprobs"] - kw["behavior_logprobs"]).double() * mask * (~is_expert))
    weight = torch.exp(log_weight).clamp(max=1.2)[seq_index]
    assert bool((weight < 1.2).any()) and bool((weight == 1.2).any())  # both sides of the cap
    trl = (torch.where(is_expert, pg, pg * weight) * mask).sum() / mask.sum()
    (trl_grad,) = torch.autograd.grad(trl, logits_trl)
    torch.testing.assert_close(out.loss.double(), trl.detach().float().double(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(grad, trl_grad, rtol=1e-6, atol=1e-9)
    token_level = grpo_loss(batch.logits().double(), batch.targets, config=LossConfig(tis_cap=1.2),
                            backend="reference", **kw)
    assert abs(float(token_level.loss) - float(out.loss)) > 1e-4  # the level matters on this batch


def test_one_token_sequences_have_the_same_weight_at_either_level():
    batch = random_batch(lengths=(1, 1, 1, 1), adversarial=False, seed=2)
    token = fused_linear_grpo_loss(batch.hidden, batch.weight, batch.targets, config=LossConfig(tis_cap=1.5),
                                   backend="reference", **batch.keywords)
    sequence = fused_linear_grpo_loss(batch.hidden, batch.weight, batch.targets, backend="reference",
                                      config=LossConfig(tis_cap=1.5, tis_level="sequence"), **batch.keywords)
    torch.testing.assert_close(sequence.loss, token.loss)


def test_tis_level_config_and_inputs_are_checked():
    with pytest.raises(ValueError, match="tis_level.*tis_cap"):
        LossConfig(tis_level="sequence")
    with pytest.raises(ValueError, match="tis_level"):
        LossConfig(tis_cap=2.0, tis_level="sentence")
    batch = random_batch(seed=1)
    keywords = {**batch.keywords, "old_logprobs": None}
    with pytest.raises(ValueError, match="tis_level='sequence'.*old_logprobs"):
        fused_linear_grpo_loss(batch.hidden, batch.weight, batch.targets, backend="chunked",
                               config=LossConfig(tis_cap=2.0, tis_level="sequence"), **keywords)
