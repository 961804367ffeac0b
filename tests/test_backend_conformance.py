"""Every fast backend (chunked, the C++ op, Triton, interpreted on CPU tensors) against the fp64 reference,
through the public functions, on the shared random batches of ``ekipl_kernels.testing``."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from ekipl_kernels import LossConfig, fused_linear_grpo_loss, grpo_loss, normalizer_count, stats_as_floats
from ekipl_kernels.backends import BackendUnavailable, load_backend
from ekipl_kernels.testing import random_batch

TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 1e-2, torch.float16: 1e-2}


def _available(name: str):
    try:
        load_backend(name)
    except BackendUnavailable as exc:
        return pytest.param(name, marks=pytest.mark.skip(reason=str(exc)))
    return name


BACKENDS = [_available(name) for name in ("chunked", "cpu", "triton")]


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


def assert_matches_reference(loss_fn, inputs, batch, config, backend, **extra):
    """Loss, log-probs and the gradients of every input of a fast backend within the dtype's tolerance of the
    fp64 reference's."""
    out, grads = run(loss_fn, inputs, batch, config, backend, **extra)
    ref, ref_grads = run(loss_fn, [x.double() for x in inputs], batch, config, "reference", **{
        key: value.double() if isinstance(value, torch.Tensor) and value.is_floating_point() else value
        for key, value in extra.items() if key != "options"})
    tol = TOLERANCE[batch.hidden.dtype]
    assert rel_err(out.loss, ref.loss) < tol
    assert rel_err(out.logprobs, ref.logprobs) < tol
    for g, r in zip(grads, ref_grads):
        assert g.dtype == batch.hidden.dtype
        assert rel_err(g, r) < tol
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
    from ekipl_kernels.reference import token_losses

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
    from ekipl_kernels.reference import token_losses

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
