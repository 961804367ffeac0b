"""Sequence-level truncated importance sampling (``LossConfig.tis_level="sequence"``): one weight per sequence,
``min(exp(sum over its unmasked policy tokens of old - behavior), tis_cap)``, as TRL 1.16's
``vllm_importance_sampling_mode="sequence_truncate"``; checked against that formula, then every backend against
the fp64 reference."""

from __future__ import annotations

import pytest
import torch

from ekipl_kernels import LossConfig, fused_linear_grpo_loss, grpo_loss
from ekipl_kernels.backends import BackendUnavailable, load_backend
from ekipl_kernels.reference import token_losses
from ekipl_kernels.testing import random_batch


def _available(name: str):
    try:
        load_backend(name)
    except BackendUnavailable as exc:
        return pytest.param(name, marks=pytest.mark.skip(reason=str(exc)))
    return name


BACKENDS = [_available(name) for name in ("chunked", "cpu", "triton")]
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 1e-2}


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


CONFIGS = {
    "clip-kl": LossConfig(tis_cap=2.0, tis_level="sequence", beta=0.05, entropy_coef=0.01),
    "is-experts": LossConfig(tis_cap=1.5, tis_level="sequence", expert_mode="is", is_cap=3.0),
    "gspo-cispo": LossConfig(tis_cap=2.0, tis_level="sequence", ratio_level="sequence", policy_loss="cispo"),
}
ENTRY_POINTS = {
    "linear": (fused_linear_grpo_loss, lambda b: (b.hidden, b.weight)),
    "logits": (grpo_loss, lambda b: (b.logits(),)),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("entry", sorted(ENTRY_POINTS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_backends_match_the_reference(backend, entry, name, dtype):
    loss_fn, inputs_of = ENTRY_POINTS[entry]
    batch = random_batch(seed=29, logit_scale=2.0, dtype=dtype)
    config = CONFIGS[name]

    def run(inputs, backend):
        inputs = [x.detach().clone().requires_grad_() for x in inputs]
        out = loss_fn(*inputs, batch.targets, config=config, backend=backend, **batch.keywords)
        return out, torch.autograd.grad(out.loss, inputs)

    out, grads = run(inputs_of(batch), backend)
    ref, ref_grads = run([x.double() for x in inputs_of(batch)], "reference")
    rel = lambda a, b: float((a.double() - b.double()).norm() / b.double().norm())  # noqa: E731
    for got, want in ((out.loss, ref.loss), (out.logprobs, ref.logprobs), *zip(grads, ref_grads)):
        assert bool(torch.isfinite(got).all()) and rel(got, want) < TOLERANCE[dtype]


def test_config_and_inputs_are_checked():
    with pytest.raises(ValueError, match="tis_level.*tis_cap"):
        LossConfig(tis_level="sequence")
    with pytest.raises(ValueError, match="tis_level"):
        LossConfig(tis_cap=2.0, tis_level="sentence")
    batch = random_batch(seed=1)
    keywords = {**batch.keywords, "old_logprobs": None}
    with pytest.raises(ValueError, match="tis_level='sequence'.*old_logprobs"):
        fused_linear_grpo_loss(batch.hidden, batch.weight, batch.targets, backend="chunked",
                               config=LossConfig(tis_cap=2.0, tis_level="sequence"), **keywords)
