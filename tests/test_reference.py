"""The fp64 reference against hand calculations, its gradients, and the input validation.

The hand calculations follow DESIGN.md ("The loss (normative)") one scalar at a time in plain Python
floats; they never call ``token_losses`` or ``aggregate``.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Optional

import pytest
import torch

from ekipl_kernels import LossConfig, fused_linear_grpo_loss, fused_linear_logprobs, grpo_loss, reference
from ekipl_kernels.inputs import prepare_token_inputs

LENGTHS = [3, 1, 5]  # a one-token sequence between two longer ones
VOCAB = 7


# ----------------------------------------------------------------------------- hand calculations


def hand_softmax(row: list[float], target: int, temperature: float) -> tuple[float, float]:
    """Log-prob of ``target`` and entropy of softmax(row / temperature)."""
    z = [x / temperature for x in row]
    top = max(z)
    lse = top + math.log(sum(math.exp(v - top) for v in z))
    probs = [math.exp(v - lse) for v in z]
    return z[target] - lse, -sum(p * (v - lse) for p, v in zip(probs, z))


def clamp(x: float, bound: Optional[float]) -> float:
    return x if bound is None else min(max(x, -bound), bound)


def hand_token_loss(cfg: LossConfig, lp, entropy, adv, expert, old, ref, beh) -> float:
    old_value = lp if old is None else old
    if expert and cfg.expert_mode == "shaped":
        p = math.exp(lp)
        pg = -adv * p / (p + cfg.shaping_gamma)
    elif expert and cfg.expert_mode == "is":
        rho = math.exp(clamp(lp - beh, cfg.log_ratio_clamp))
        pg = -adv * (rho if cfg.is_cap is None else min(rho, cfg.is_cap))
    else:
        ratio = math.exp(clamp(lp - old_value, cfg.log_ratio_clamp))
        pg = max(-ratio * adv, -min(max(ratio, 1 - cfg.eps_low), 1 + cfg.eps_high) * adv)
        if cfg.dual_clip is not None and adv < 0:
            pg = min(pg, -cfg.dual_clip * adv)
        if cfg.tis_cap is not None and not expert:
            pg *= min(math.exp(old_value - beh), cfg.tis_cap)
    kl = 0.0
    if cfg.beta > 0:
        d = ref - lp
        if cfg.kl == "k3":
            d = clamp(d, cfg.log_ratio_clamp)
            kl = clamp(math.exp(d) - d - 1, cfg.kl_clamp)
        else:
            kl = {"k1": -d, "k2": d * d / 2}[cfg.kl]
    return pg + cfg.beta * kl - cfg.entropy_coef * entropy


def hand_aggregate(cfg: LossConfig, losses, mask, lengths, normalizer) -> float:
    total = sum(l * m for l, m in zip(losses, mask))
    if cfg.agg == "token-mean":
        count = sum(mask) if normalizer is None else normalizer
        return total / count if count else 0.0
    if cfg.agg == "seq-mean-token-mean":
        means, start = [], 0
        for length in lengths:
            m = mask[start:start + length]
            if sum(m) > 0:
                means.append(sum(l * k for l, k in zip(losses[start:start + length], m)) / sum(m))
            start += length
        count = len(means) if normalizer is None else normalizer
        return sum(means) / count if means else 0.0
    return total / ((len(lengths) if normalizer is None else normalizer) * cfg.max_len)


# ----------------------------------------------------------------------------- inputs


def tiny_batch(seed: int, per_token_adv: bool = False, with_old: bool = True):
    gen = torch.Generator().manual_seed(seed)
    n = sum(LENGTHS)
    logits = torch.randn(n, VOCAB, generator=gen, dtype=torch.float64) * 2
    targets = torch.randint(0, VOCAB, (n,), generator=gen)
    lp = torch.log_softmax(logits, -1).gather(-1, targets[:, None])[:, 0]
    # Offsets that put some ratios above 1 + eps, some below 1 - eps and some inside the range.
    offsets = torch.tensor([-0.5, 0.5, 0.05, -0.6, 0.4, -0.05, 0.7, -0.3, 0.1], dtype=torch.float64)
    # Expert ratios to the behaviour log-probs (tokens 3, 5, 8 are unmasked experts): 1.65, 0.95, 0.5.
    behavior_offsets = torch.tensor([0.3, -0.6, 0.5, -0.5, 0.2, 0.05, 0.8, 0.1, 0.7], dtype=torch.float64)
    adv_shape = n if per_token_adv else len(LENGTHS)
    advantages = torch.randn(adv_shape, generator=gen, dtype=torch.float64)
    advantages[0] = -abs(advantages[0]) - 0.5  # at least one negative advantage for the dual clip
    return dict(
        logits=logits,
        targets=targets,
        advantages=advantages.float(),
        cu_seqlens=torch.tensor([0, 3, 4, 9]),
        origin=torch.tensor([0, 0, 1, 2, 0, 1, 1, 0, 2]),
        old_logprobs=(lp + offsets).float() if with_old else None,
        ref_logprobs=(lp + 0.3 * torch.randn(n, generator=gen, dtype=torch.float64)).float(),
        behavior_logprobs=(lp + behavior_offsets).float(),
        loss_mask=torch.tensor([1, 1, 0, 1, 1, 1, 0, 1, 1], dtype=torch.bool),
    )


CASES = {
    "ratio-default": (LossConfig(), {}),
    "ratio-k1": (LossConfig(beta=0.1, kl="k1"), {}),
    "ratio-k2": (LossConfig(beta=0.1, kl="k2"), {}),
    "ratio-k3-clip-higher": (LossConfig(beta=0.1, kl="k3", eps_high=0.28), {}),
    "is-expert": (LossConfig(expert_mode="is"), {}),
    "is-cap": (LossConfig(expert_mode="is", is_cap=1.1, dual_clip=1.5), {}),
    "tight-clamps": (LossConfig(expert_mode="is", beta=0.5, kl="k3", log_ratio_clamp=0.3, kl_clamp=0.02), {}),
    "shaped-expert": (LossConfig(expert_mode="shaped", shaping_gamma=0.2), {}),
    "dual-clip": (LossConfig(dual_clip=1.5), {}),
    "tis-cap": (LossConfig(tis_cap=1.1), {}),
    "entropy-temperature": (LossConfig(entropy_coef=0.05, temperature=0.7), {}),
    "seq-mean-token-mean": (LossConfig(agg="seq-mean-token-mean", beta=0.05), {}),
    "seq-mean-token-sum-norm": (LossConfig(agg="seq-mean-token-sum-norm", max_len=6), {}),
    "per-token-advantages": (LossConfig(expert_mode="shaped", beta=0.02), {"per_token_adv": True}),
    "no-old-logprobs": (LossConfig(tis_cap=2.0, beta=0.05), {"with_old": False}),
    "normalizer-token-mean": (LossConfig(), {"normalizer": 20.0}),
    "normalizer-seq-mean": (LossConfig(agg="seq-mean-token-mean"), {"normalizer": 4.0}),
    "everything": (
        LossConfig(eps_low=0.1, eps_high=0.3, dual_clip=2.0, beta=0.07, kl="k2", temperature=1.3, entropy_coef=0.01,
                   expert_mode="is", tis_cap=1.5, agg="seq-mean-token-mean"),
        {"per_token_adv": True},
    ),
}


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_reference_matches_hand_calculation(case):
    cfg, options = CASES[case]
    normalizer = options.get("normalizer")
    batch = tiny_batch(seed=list(CASES).index(case), per_token_adv=options.get("per_token_adv", False),
                       with_old=options.get("with_old", True))
    logits, targets = batch.pop("logits"), batch.pop("targets")
    out = reference.grpo_loss(logits, targets, **batch, normalizer=normalizer, config=cfg)

    n = sum(LENGTHS)
    seq_of = [s for s, length in enumerate(LENGTHS) for _ in range(length)]
    adv = batch["advantages"].tolist()
    value = lambda name, t: None if batch[name] is None else float(batch[name][t])  # noqa: E731
    losses, lps, entropies = [], [], []
    for t in range(n):
        lp, entropy = hand_softmax(logits[t].tolist(), int(targets[t]), cfg.temperature)
        lps.append(lp)
        entropies.append(entropy)
        losses.append(hand_token_loss(
            cfg, lp, entropy, adv[t] if len(adv) == n else adv[seq_of[t]], bool(batch["origin"][t] > 0),
            value("old_logprobs", t), value("ref_logprobs", t), value("behavior_logprobs", t),
        ))
    expected = hand_aggregate(cfg, losses, batch["loss_mask"].float().tolist(), LENGTHS, normalizer)

    assert out.loss.dtype == torch.float32 and out.loss.dim() == 0
    assert float(out.loss) == pytest.approx(expected, rel=1e-6, abs=1e-7)
    assert out.logprobs.tolist() == pytest.approx(lps, rel=1e-6)
    if cfg.entropy_coef != 0:
        assert out.entropy.tolist() == pytest.approx(entropies, rel=1e-6)
    else:
        assert out.entropy is None
    assert out.stats["tokens_policy"] == 4 and out.stats["tokens_expert"] == 3
    assert ("kl_mean" in out.stats) == (cfg.beta > 0)


def test_token_losses_known_values():
    """A few numbers worked out on paper (A = advantage, r = ratio)."""
    log = math.log

    def one(cfg, lp, *, adv, old=0.0, ref=None, beh=None, expert=False, entropy=None):
        t = lambda v: None if v is None else torch.tensor([v], dtype=torch.float64)  # noqa: E731
        loss, _ = reference.token_losses(
            t(lp), t(entropy), advantages=t(adv), is_expert=torch.tensor([expert]), old_logprobs=t(old),
            ref_logprobs=t(ref), behavior_logprobs=t(beh), config=cfg,
        )
        return float(loss)

    base = LossConfig()
    assert one(base, log(1.5), adv=1.0) == pytest.approx(-1.2)  # r = 1.5 clipped to 1.2
    assert one(base, log(1.5), adv=-1.0) == pytest.approx(1.5)  # A < 0: the larger, unclipped term
    assert one(base, log(0.5), adv=-1.0) == pytest.approx(0.8)  # r = 0.5 clipped up to 0.8
    assert one(LossConfig(dual_clip=1.3), log(1.5), adv=-1.0) == pytest.approx(1.3)  # capped at c * |A|
    assert one(LossConfig(expert_mode="shaped"), log(0.5), adv=2.0, expert=True) == pytest.approx(-2 * 0.5 / 0.6)
    # "is": the unclipped ratio to the expert's log-probs, r = 0.6 / 0.25 = 2.4, optionally capped
    assert one(LossConfig(expert_mode="is"), log(0.6), adv=1.0, beh=log(0.25), expert=True) == pytest.approx(-2.4)
    assert one(LossConfig(expert_mode="is", dual_clip=1.5), log(0.6), adv=-1.0, beh=log(0.25),
               expert=True) == pytest.approx(2.4)  # no dual clip either
    assert one(LossConfig(expert_mode="is", is_cap=1.5), log(0.6), adv=1.0, beh=log(0.25),
               expert=True) == pytest.approx(-1.5)
    # Log-ratios clamped to +-20 before exp, k3 clamped to 10 (verl's values, the defaults)
    assert one(base, 30.0, adv=-1.0) == pytest.approx(math.exp(20))
    assert one(replace(base, log_ratio_clamp=None), 30.0, adv=-1.0) == pytest.approx(math.exp(30))
    assert one(LossConfig(expert_mode="is"), -1.0, adv=1.0, beh=-40.0, expert=True) == pytest.approx(-math.exp(20))
    assert one(LossConfig(beta=1.0), 0.0, adv=0.0, ref=5.0) == pytest.approx(10.0)
    assert one(LossConfig(beta=1.0, kl_clamp=None), 0.0, adv=0.0, ref=5.0) == pytest.approx(math.exp(5) - 6)
    assert one(LossConfig(beta=1.0, kl_clamp=None), 0.0, adv=0.0, ref=25.0) == pytest.approx(math.exp(20) - 21)
    assert one(LossConfig(tis_cap=3.0), log(1.1), adv=1.0, beh=log(0.5)) == pytest.approx(-1.1 * 2.0)
    assert one(LossConfig(tis_cap=1.5), log(1.1), adv=1.0, beh=log(0.5)) == pytest.approx(-1.1 * 1.5)
    d = log(2.0)  # ref - lp
    assert one(LossConfig(beta=1.0, kl="k1"), 0.0, adv=0.0, ref=d) == pytest.approx(-d)
    assert one(LossConfig(beta=1.0, kl="k2"), 0.0, adv=0.0, ref=d) == pytest.approx(d * d / 2)
    assert one(LossConfig(beta=1.0, kl="k3"), 0.0, adv=0.0, ref=d) == pytest.approx(2 - d - 1)
    assert one(LossConfig(entropy_coef=0.5), 0.0, adv=0.0, entropy=2.0) == pytest.approx(-1.0)


# ----------------------------------------------------------------------------- gradients


def _token_gradient(cfg: LossConfig, lp: float, **values) -> float:
    """d l / d lp of one token, by autograd through the reference."""
    t = lambda v: None if v is None else torch.tensor([float(v)], dtype=torch.float64)  # noqa: E731
    leaf = t(lp).requires_grad_()
    loss, _ = reference.token_losses(
        leaf, None, advantages=t(values["adv"]), is_expert=torch.tensor([values.get("expert", False)]),
        old_logprobs=t(values.get("old")), ref_logprobs=t(values.get("ref")), behavior_logprobs=t(values.get("beh")),
        config=cfg,
    )
    loss.sum().backward()
    return float(leaf.grad)


def test_is_gradient_is_the_truncated_importance_weight():
    """pg = -w A with w = min(rho, cap): the gradient is -w A d(lp), also where the cap is active."""
    log = math.log
    expert = dict(adv=2.0, beh=log(0.25), expert=True)
    assert _token_gradient(LossConfig(expert_mode="is"), log(0.6), **expert) == pytest.approx(-2.0 * 2.4)
    assert _token_gradient(LossConfig(expert_mode="is", is_cap=1.5), log(0.6), **expert) == pytest.approx(-2.0 * 1.5)
    assert _token_gradient(LossConfig(expert_mode="is", is_cap=3.0), log(0.6), **expert) == pytest.approx(-2.0 * 2.4)
    # Beyond the log-ratio clamp the value is frozen: no gradient (as torch.clamp, as verl).
    assert _token_gradient(LossConfig(expert_mode="is"), -1.0, adv=1.0, beh=-40.0, expert=True) == 0.0
    # Policy tokens keep the clipped ratio: r = 2.4 > 1.2 with A > 0 is clipped, no gradient.
    assert _token_gradient(LossConfig(expert_mode="is"), log(0.6), adv=2.0, old=log(0.25), beh=0.0) == 0.0


def test_clamped_terms_carry_no_gradient():
    assert _token_gradient(LossConfig(), 30.0, adv=-1.0, old=0.0) == 0.0
    assert _token_gradient(LossConfig(log_ratio_clamp=None), 3.0, adv=-1.0, old=0.0) == pytest.approx(math.exp(3))
    assert _token_gradient(LossConfig(beta=1.0), 0.0, adv=0.0, ref=5.0) == 0.0  # k3 = e^5 - 6 > 10
    assert _token_gradient(LossConfig(beta=1.0), 0.0, adv=0.0, ref=2.0) == pytest.approx(1 - math.exp(2))




def _fp64_loss(hidden, weight, targets, cfg, **kwargs):
    """The reference loss kept in fp64 (its public functions return fp32), from its own pieces."""
    tok = prepare_token_inputs(hidden.shape[0], hidden.device, config=cfg, normalizer=None, **kwargs)
    lp, entropy = reference.logprobs_and_entropy(hidden @ weight.T, targets, cfg.temperature)
    loss_t, _ = reference.token_losses(
        lp, entropy, advantages=tok.advantages.double(), is_expert=tok.is_expert, old_logprobs=tok.old_logprobs,
        ref_logprobs=tok.ref_logprobs, behavior_logprobs=tok.behavior_logprobs, config=cfg,
    )
    return reference.aggregate(loss_t, tok.mask, kwargs["cu_seqlens"], None, cfg)


@pytest.mark.parametrize("cfg", [
    LossConfig(beta=0.1, kl="k3", entropy_coef=0.1, temperature=0.8, expert_mode="shaped", tis_cap=1.3),
    LossConfig(beta=0.2, kl="k2", expert_mode="is", dual_clip=1.5, agg="seq-mean-token-mean"),
], ids=["shaped-tis-entropy", "is-dual-seqmean"])
def test_reference_gradcheck(cfg):
    gen = torch.Generator().manual_seed(3)
    n, width = sum(LENGTHS), 3
    hidden = torch.randn(n, width, generator=gen, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(VOCAB, width, generator=gen, dtype=torch.float64, requires_grad=True)
    batch = tiny_batch(seed=5)
    batch.pop("logits")
    targets = batch.pop("targets")
    assert torch.autograd.gradcheck(lambda h, w: _fp64_loss(h, w, targets, cfg, **batch), (hidden, weight))


def test_no_old_logprobs_gradient_is_minus_advantage_times_dlogprob():
    """old = stop_grad(lp): the ratio is 1 but d(ratio)/d(lp) = 1, which finite differences cannot see."""
    batch = tiny_batch(seed=11, with_old=False)
    logits, targets = batch.pop("logits").requires_grad_(), batch.pop("targets")
    temperature = 0.9
    reference.grpo_loss(logits, targets, **batch, config=LossConfig(temperature=temperature)).loss.backward()

    mask = batch["loss_mask"].float().tolist()
    seq_of = [s for s, length in enumerate(LENGTHS) for _ in range(length)]
    for t in range(sum(LENGTHS)):
        z = [x / temperature for x in logits[t].tolist()]
        total = sum(math.exp(v - max(z)) for v in z)
        probs = [math.exp(v - max(z)) / total for v in z]
        coef = -float(batch["advantages"][seq_of[t]]) * mask[t] / sum(mask) / temperature
        y = int(targets[t])
        expected = [coef * ((v == y) - p) for v, p in enumerate(probs)]
        assert logits.grad[t].tolist() == pytest.approx(expected, abs=1e-7)


def test_reference_logprobs_match_hand_softmax():
    gen = torch.Generator().manual_seed(2)
    hidden = torch.randn(4, 3, generator=gen, dtype=torch.float64)
    weight = torch.randn(VOCAB, 3, generator=gen, dtype=torch.float64)
    targets = torch.tensor([0, 6, 3, 3])
    lp, entropy = fused_linear_logprobs(hidden, weight, targets, temperature=1.7, return_entropy=True,
                                        backend="reference")
    logits = hidden @ weight.T
    for t in range(4):
        hand_lp, hand_entropy = hand_softmax(logits[t].tolist(), int(targets[t]), 1.7)
        assert float(lp[t]) == pytest.approx(hand_lp, rel=1e-6)
        assert float(entropy[t]) == pytest.approx(hand_entropy, rel=1e-6)


# ----------------------------------------------------------------------------- masked tokens, masked vocabulary

GARBAGE_CONFIG = LossConfig(beta=0.1, entropy_coef=0.05, expert_mode="is", tis_cap=1.5, agg="seq-mean-token-mean")


def _loss_and_logit_grad(logits, targets, batch, config=GARBAGE_CONFIG):
    leaf = logits.clone().requires_grad_()
    out = reference.grpo_loss(leaf, targets, **batch, config=config)
    out.loss.backward()
    return out, leaf.grad


def test_masked_tokens_reach_neither_loss_nor_gradient_whatever_they_hold():
    batch = tiny_batch(seed=12, per_token_adv=True)
    logits, targets = batch.pop("logits"), batch.pop("targets")
    clean, clean_grad = _loss_and_logit_grad(logits, targets, batch)
    masked = ~batch["loss_mask"]
    poisoned = {**batch}
    for name in ("advantages", "old_logprobs", "ref_logprobs", "behavior_logprobs"):
        poisoned[name] = batch[name].masked_fill(masked, float("nan"))
    bad_logits = logits.clone()
    bad_logits[masked.nonzero()[0, 0]] = float("nan")
    bad_logits[masked.nonzero()[1, 0]] = float("inf")
    out, grad = _loss_and_logit_grad(bad_logits, targets, poisoned)
    assert float(out.loss.detach()) == float(clean.loss.detach())
    assert torch.equal(grad, clean_grad) and not grad[masked].any()
    assert out.stats == clean.stats


def test_minus_inf_logits_are_an_absent_vocabulary_entry():
    """-inf logits (a masked vocabulary) give what the same rows without those columns give."""
    batch = tiny_batch(seed=13)
    logits, targets = batch.pop("logits"), batch.pop("targets")
    absent = torch.zeros_like(logits, dtype=torch.bool)
    absent[:, 2] = True
    absent[4, 5] = True
    absent[torch.arange(len(targets)), targets] = False  # never the target
    with_inf = logits.masked_fill(absent, float("-inf"))
    out, grad = _loss_and_logit_grad(with_inf, targets, batch)
    assert torch.isfinite(out.loss) and torch.isfinite(grad).all() and not grad[absent].any()
    # The same rows with the absent entries at -1000: exp underflows to exactly 0 in fp64.
    far, far_grad = _loss_and_logit_grad(logits.masked_fill(absent, -1000.0), targets, batch)
    assert float(out.loss.detach()) == pytest.approx(float(far.loss.detach()), rel=1e-12)
    assert torch.allclose(grad, far_grad, rtol=1e-10, atol=1e-12)
    assert torch.allclose(out.entropy, far.entropy)


# ----------------------------------------------------------------------------- validation


def _linear_inputs():
    gen = torch.Generator().manual_seed(0)
    n, width = sum(LENGTHS), 4
    batch = tiny_batch(seed=0)
    batch.pop("logits")
    return dict(
        hidden=torch.randn(n, width, generator=gen), weight=torch.randn(VOCAB, width, generator=gen), **batch,
    )


def _call(backend: str = "reference", config: Optional[LossConfig] = None, **changes):
    inputs = {**_linear_inputs(), **changes}
    hidden, weight, targets = inputs.pop("hidden"), inputs.pop("weight"), inputs.pop("targets")
    return fused_linear_grpo_loss(hidden, weight, targets, **inputs, config=config or LossConfig(), backend=backend)


N = sum(LENGTHS)
BAD_INPUTS = {
    "ref-missing-with-beta": (
        dict(ref_logprobs=None, config=LossConfig(beta=0.1)),
        r"ref_logprobs \[N\]=\[9\] is required when beta > 0",
    ),
    "behavior-missing-with-is": (
        dict(behavior_logprobs=None, config=LossConfig(expert_mode="is")),
        r"behavior_logprobs .*expert_mode='is'",
    ),
    "behavior-missing-with-tis": (
        dict(behavior_logprobs=None, config=LossConfig(tis_cap=2.0)),
        r"behavior_logprobs .*tis_cap=2.0",
    ),
    "hidden-1d": (dict(hidden=torch.randn(N)), r"hidden must be a 2-D tensor \[N, H\]"),
    "weight-width": (dict(weight=torch.randn(VOCAB, 5)), r"disagree on H: weight must be \[V, 4\]"),
    "weight-dtype": (
        dict(weight=torch.randn(VOCAB, 4, dtype=torch.float64)),
        r"weight dtype torch.float64 must equal hidden dtype",
    ),
    "hidden-int": (
        dict(hidden=torch.ones(N, 4, dtype=torch.int32), weight=torch.ones(VOCAB, 4, dtype=torch.int32)),
        r"hidden must be fp32, bf16, fp16",
    ),
    "weight-device": (dict(weight=torch.randn(VOCAB, 4, device="meta")), r"weight is on meta but hidden is on cpu"),
    "targets-shape": (dict(targets=torch.zeros(N + 1, dtype=torch.long)), r"targets must be a tensor of shape \[9\]"),
    "targets-float": (dict(targets=torch.zeros(N)), r"targets must be int64"),
    "targets-range": (dict(targets=torch.full((N,), VOCAB)), r"targets must lie in \[0, 7\)"),
    "cu-seqlens-float": (dict(cu_seqlens=torch.tensor([0.0, 3.0, 9.0])), r"cu_seqlens must be int32 or int64"),
    "cu-seqlens-2d": (dict(cu_seqlens=torch.tensor([[0, 9]])), r"cu_seqlens must be a 1-D tensor \[S\+1\]"),
    "cu-seqlens-end": (dict(cu_seqlens=torch.tensor([0, 3, 8])), r"cu_seqlens must start at 0 and end at N=9"),
    "cu-seqlens-start": (dict(cu_seqlens=torch.tensor([1, 3, 9])), r"cu_seqlens must start at 0"),
    "cu-seqlens-not-monotone": (dict(cu_seqlens=torch.tensor([0, 6, 3, 9])), r"cu_seqlens must be non-decreasing"),
    "cu-seqlens-device": (
        dict(cu_seqlens=torch.tensor([0, 3, 4, 9], device="meta")),
        r"cu_seqlens is on meta; expected cpu",
    ),
    "advantages-shape": (
        dict(advantages=torch.randn(5)),
        r"advantages must have shape \[S\]=\[3\] \(per sequence\) or \[N\]=\[9\]",
    ),
    "origin-float": (dict(origin=torch.zeros(N)), r"origin must be an integer tensor of shape \[9\]"),
    "old-shape": (dict(old_logprobs=torch.randn(N, 1)), r"old_logprobs must be a tensor of shape \[9\]"),
    "old-int": (dict(old_logprobs=torch.zeros(N, dtype=torch.long)), r"old_logprobs must be a floating tensor"),
    "ref-device": (dict(ref_logprobs=torch.randn(N, device="meta")), r"ref_logprobs is on meta; expected cpu"),
    "mask-shape": (dict(loss_mask=torch.ones(N - 1)), r"loss_mask must be a tensor of shape \[9\]"),
    "normalizer-shape": (dict(normalizer=torch.ones(2)), r"normalizer must be a float or a 0-dim tensor"),
    "normalizer-zero": (dict(normalizer=0.0), r"normalizer must be a finite number > 0 .*got 0.0"),
    "normalizer-negative": (dict(normalizer=-4), r"normalizer must be a finite number > 0 .*got -4"),
    "normalizer-nan": (dict(normalizer=float("nan")), r"normalizer must be a finite number > 0 .*got nan"),
    "normalizer-inf-tensor": (
        dict(normalizer=torch.tensor(float("inf"))), r"normalizer must be a finite number > 0 .*got inf",
    ),
    "origin-negative": (dict(origin=torch.tensor([0, 0, 1, -1, 0, 1, 1, 0, 2])), r"origin must be >= 0 .*got -1"),
    # S == N with an empty sequence: per sequence and per token disagree.
    "advantages-ambiguous": (
        dict(cu_seqlens=torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 9, 9]), advantages=torch.randn(N)),
        r"advantages \[9\] is ambiguous: S = N = 9.*advantage_level='sequence' or 'token'",
    ),
    "advantage-level-name": (dict(advantage_level="seq"), r"advantage_level must be 'sequence', 'token' or None"),
    "advantage-level-shape": (
        dict(advantage_level="sequence", advantages=torch.randn(N)),
        r"advantages must have shape \[S\]=\[3\] with advantage_level='sequence'; got \[9\]",
    ),
}


@pytest.mark.parametrize("backend", ["reference", "chunked", "cpu", "triton"])
@pytest.mark.parametrize("case", list(BAD_INPUTS), ids=list(BAD_INPUTS))
def test_bad_inputs_raise_value_error_naming_the_argument(case, backend):
    changes, message = BAD_INPUTS[case]
    with pytest.raises(ValueError, match=message):
        _call(backend, **changes)


def test_bad_backend_and_temperature():
    with pytest.raises(ValueError, match=r"backend must be one of"):
        _call(backend="gpu-please")
    inputs = _linear_inputs()
    with pytest.raises(ValueError, match=r"temperature must be > 0"):
        fused_linear_logprobs(inputs["hidden"], inputs["weight"], inputs["targets"], temperature=0.0)
    with pytest.raises(ValueError, match=r"logits must be a 2-D tensor \[N, V\]"):
        grpo_loss(torch.randn(N), inputs["targets"], advantages=inputs["advantages"], cu_seqlens=inputs["cu_seqlens"])


BAD_CONFIGS = [
    ("eps_low", -0.1), ("eps_high", -0.2), ("dual_clip", 1.0), ("beta", -1.0), ("kl", "k4"), ("temperature", 0.0),
    ("expert_mode", "luffy"), ("shaping_gamma", 0.0), ("tis_cap", -1.0), ("agg", "sum"), ("is_cap", 0.0),
    ("log_ratio_clamp", -1.0), ("kl_clamp", 0.0),
    # non-finite floats, wrong types
    ("entropy_coef", float("nan")), ("temperature", float("inf")), ("beta", float("nan")), ("eps_high", float("inf")),
    ("dual_clip", float("inf")), ("tis_cap", float("nan")), ("kl_clamp", float("inf")), ("beta", "0.1"),
    ("beta", True), ("max_len", 2.5), ("max_len", True), ("max_len", "8"),
]


@pytest.mark.parametrize("field,value", BAD_CONFIGS, ids=[f"{f}={v!r}" for f, v in BAD_CONFIGS])
def test_bad_config_field_is_named(field, value):
    with pytest.raises(ValueError, match=rf"LossConfig\.{field}="):
        LossConfig(**{field: value})


def test_is_cap_needs_the_is_mode():
    with pytest.raises(ValueError, match=r"LossConfig\.is_cap=2.0 is invalid: .*expert_mode is 'ratio'"):
        LossConfig(is_cap=2.0)
    assert LossConfig(expert_mode="is", is_cap=2.0).is_cap == 2.0


def test_advantage_level_resolves_per_sequence_against_per_token():
    """S == N with an empty sequence: each explicit reading equals the loss of its per-token expansion."""
    cu = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 9, 9])
    adv = torch.randn(N, generator=torch.Generator().manual_seed(4))
    per_token_of_seq = adv[torch.repeat_interleave(torch.arange(N), cu.diff())]
    by_seq = _call(cu_seqlens=cu, advantages=adv, advantage_level="sequence")
    by_token = _call(cu_seqlens=cu, advantages=adv, advantage_level="token")
    assert float(by_seq.loss) == float(_call(cu_seqlens=cu, advantages=per_token_of_seq, advantage_level="token").loss)
    assert float(by_token.loss) != float(by_seq.loss)
    # Unambiguous shapes need no level, and one-token sequences read the same either way.
    assert float(_call(advantages=adv).loss) == float(_call(advantages=adv, advantage_level="token").loss)
    ones = torch.arange(N + 1)
    assert float(_call(cu_seqlens=ones, advantages=adv).loss) == float(
        _call(cu_seqlens=ones, advantages=adv, advantage_level="sequence").loss)


def test_sum_norm_needs_max_len():
    with pytest.raises(ValueError, match=r"LossConfig\.max_len=.*needs max_len"):
        LossConfig(agg="seq-mean-token-sum-norm")
    with pytest.raises(ValueError, match=r"LossConfig\.max_len="):
        LossConfig(max_len=0)
