"""The verl adapter vs a hand-written restatement of verl's actor loss on verl-layout tensors.

The oracle restates, in fp64 on materialised logits, what verl's actor computes for one micro-batch:
``compute_policy_loss_vanilla`` (clipped ratio, dual clip, rollout IS weights, ``agg_loss`` with
``global_batch_info``), minus ``entropy_coeff`` times the aggregated entropy, plus ``kl_loss_coef``
times the aggregated ``kl_penalty``. It shares no code with ekipl_kernels.
"""

from types import SimpleNamespace

import pytest
import torch

from ekipl_kernels.integrations.verl import FusedLogProbInputs, compute_policy_loss_fused

B, T, H, V = 5, 9, 16, 37
AGG_MODES = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")


def verl_agg(loss_mat, mask, mode, dp_size=1, batch_num_tokens=None, global_batch_size=None, loss_scale_factor=None):
    if mode == "token-mean":
        tokens = mask.sum() if batch_num_tokens is None else batch_num_tokens
        return (loss_mat * mask).sum() / tokens * dp_size
    nonempty = (mask.sum(-1) > 0).double()
    sequences = nonempty.sum() if global_batch_size is None else global_batch_size
    if mode == "seq-mean-token-sum":
        return ((loss_mat * mask).sum(-1) * nonempty).sum() / sequences * dp_size
    if mode == "seq-mean-token-mean":
        seq_means = (loss_mat * mask).sum(-1) / (mask.sum(-1) + 1e-8)
        return (seq_means * nonempty).sum() / sequences * dp_size
    return (loss_mat * mask).sum() / (mask.shape[-1] if loss_scale_factor is None else loss_scale_factor)


def verl_kl(lp, ref, kind):
    if kind in ("kl", "k1"):
        return lp - ref
    if kind in ("mse", "k2"):
        return 0.5 * (lp - ref) ** 2
    d = (ref - lp).clamp(-20, 20)
    return (torch.exp(d) - d - 1).clamp(-10, 10)


def verl_actor_loss(old, hidden, weight, responses, adv, mask, mode, cfg, is_weights, ref, temperature, bias=None):
    """fp64 oracle: returns (loss, metrics) as verl's actor would form them."""
    logits = hidden.double() @ weight.double().T + (0.0 if bias is None else bias.double())
    logp = torch.log_softmax(logits / temperature, dim=-1)
    lp = logp.gather(-1, responses.unsqueeze(-1)).squeeze(-1)
    entropy = -(logp.exp() * logp).sum(-1)
    mask = mask.double()
    old = lp.detach() if old is None else old.double()
    log_ratio = (lp - old).clamp(-20, 20)
    ratio = torch.exp(log_ratio)
    low = cfg.clip_ratio_low if cfg.clip_ratio_low is not None else cfg.clip_ratio
    high = cfg.clip_ratio_high if cfg.clip_ratio_high is not None else cfg.clip_ratio
    loss1 = -adv * ratio
    loss2 = -adv * ratio.clamp(1 - low, 1 + high)
    clip1 = torch.maximum(loss1, loss2)
    loss3 = -adv * cfg.clip_ratio_c
    pg = torch.where(adv < 0, torch.minimum(loss3, clip1), clip1)
    if is_weights is not None:
        pg = pg * is_weights
    info = cfg.global_batch_info
    loss = verl_agg(pg, mask, mode, **info)
    loss = loss - cfg.entropy_coeff * verl_agg(entropy, mask, mode, **info)
    if cfg.use_kl_loss:
        loss = loss + cfg.kl_loss_coef * verl_agg(verl_kl(lp, ref.double(), cfg.kl_loss_type), mask, mode, **info)
    masked_mean = lambda x: (x.double() * mask).sum() / mask.sum()  # noqa: E731
    metrics = {
        "actor/pg_clipfrac": masked_mean(loss2 > loss1),
        "actor/ppo_kl": masked_mean(-log_ratio),
        "actor/pg_clipfrac_lower": masked_mean((clip1 > loss3) & (adv < 0)),
    }
    return loss, {k: float(v.detach()) for k, v in metrics.items()}


def actor_config(**overrides):
    settings = dict(
        clip_ratio=0.2, clip_ratio_low=None, clip_ratio_high=None, clip_ratio_c=3.0, entropy_coeff=0.0,
        use_kl_loss=False, kl_loss_coef=0.001, kl_loss_type="low_var_kl", global_batch_info={},
    )
    settings.update(overrides)
    return SimpleNamespace(**settings)


def verl_batch(seed, dtype=torch.float32, temperature=1.0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g, dtype=dtype)
    weight = (torch.randn(V, H, generator=g) * 0.5).to(dtype)
    responses = torch.randint(0, V, (B, T), generator=g)
    lengths = torch.tensor([T, 4, 0, 1, 7])  # a full, a short, an empty and a one-token response
    mask = (torch.arange(T) < lengths[:, None]).float()
    with torch.no_grad():
        logits = hidden.double() @ weight.double().T / temperature
        lp = torch.log_softmax(logits, -1).gather(-1, responses[..., None])[..., 0]
    # old and ref near the policy: verl's clamps stay inactive (see test_matches_verl_where_its_clamps_act)
    return dict(
        hidden=hidden, weight=weight, responses=responses, mask=mask,
        advantages=torch.randn(B, 1, generator=g).expand(B, T) + 0.3 * torch.randn(B, T, generator=g),
        old=(lp + 0.6 * torch.randn(B, T, generator=g)).float(),  # wide enough for clipping on both sides
        ref=(lp + 0.5 * torch.randn(B, T, generator=g)).float(),
        is_weights=torch.rand(B, T, generator=g) * 2.0,
    )


def compare(mode, cfg, batch, *, temperature=1.0, use_old=True, use_is=False, bias=None):
    """``bias``: an LM-head bias ``[V]``, whose gradient is compared too."""
    hidden = batch["hidden"].clone().requires_grad_(True)
    weight = batch["weight"].clone().requires_grad_(True)
    lm_bias = None if bias is None else bias.clone().requires_grad_(True)
    old = batch["old"] if use_old else None
    is_weights = batch["is_weights"] if use_is else None
    head = FusedLogProbInputs(hidden, weight, batch["responses"], temperature=temperature, ref_log_prob=batch["ref"],
                              backend="chunked", lm_head_bias=lm_bias)
    loss, metrics = compute_policy_loss_fused(old, head, batch["advantages"], batch["mask"], mode, cfg, is_weights)
    loss.backward()

    hidden_ref = batch["hidden"].double().requires_grad_(True)
    weight_ref = batch["weight"].double().requires_grad_(True)
    bias_ref = None if bias is None else bias.double().requires_grad_(True)
    expected, expected_metrics = verl_actor_loss(
        old, hidden_ref, weight_ref, batch["responses"], batch["advantages"].double(), batch["mask"], mode, cfg,
        is_weights, batch["ref"], temperature, bias_ref,
    )
    expected.backward()
    torch.testing.assert_close(loss.double(), expected.detach(), rtol=1e-5, atol=1e-7)
    pairs = [(hidden.grad, hidden_ref.grad), (weight.grad, weight_ref.grad)]
    if bias is not None:
        pairs.append((lm_bias.grad, bias_ref.grad))
    for got, want in pairs:
        assert ((got.double() - want).norm() / want.norm()) < 1e-4
    for name, value in expected_metrics.items():
        assert metrics[name] == pytest.approx(value, abs=1e-6), name
    return metrics


def test_lm_head_bias():
    """A biased LM head: verl's logits include the bias; the loss and every gradient, the bias's, match."""
    bias = torch.randn(V, generator=torch.Generator().manual_seed(5))
    cfg = actor_config(clip_ratio_high=0.28, use_kl_loss=True, entropy_coeff=0.01)
    metrics = compare("token-mean", cfg, verl_batch(0), temperature=0.8, bias=bias)
    assert metrics["actor/pg_clipfrac"] > 0


@pytest.mark.parametrize("mode", AGG_MODES)
def test_matches_verl_per_agg_mode(mode):
    metrics = compare(mode, actor_config(clip_ratio_high=0.28), verl_batch(0))
    assert metrics["actor/pg_clipfrac"] > 0  # the batch exercises clipping


@pytest.mark.parametrize("mode", AGG_MODES)
def test_matches_verl_with_global_batch_info_kl_entropy_and_is_weights(mode):
    info = dict(dp_size=2, batch_num_tokens=41, global_batch_size=9, loss_scale_factor=12)
    cfg = actor_config(
        clip_ratio_low=0.1, clip_ratio_high=0.3, clip_ratio_c=1.5, entropy_coeff=0.01, use_kl_loss=True,
        kl_loss_coef=0.05, global_batch_info=info,
    )
    metrics = compare(mode, cfg, verl_batch(2, temperature=0.8), temperature=0.8, use_is=True)
    assert metrics["actor/pg_clipfrac_lower"] > 0  # the dual clip is active


@pytest.mark.parametrize("kl_type", ["kl", "k1", "mse", "k2", "low_var_kl", "k3"])
def test_kl_loss_types(kl_type):
    cfg = actor_config(use_kl_loss=True, kl_loss_coef=0.1, kl_loss_type=kl_type)
    compare("seq-mean-token-mean", cfg, verl_batch(2))


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean"])
def test_matches_verl_where_its_clamps_act(mode):
    """Old log-probs 30 nats away (log-ratio clamped at 20) and reference 4-6 nats away (k3 clamped at 10)."""
    batch = verl_batch(7)
    g = torch.Generator().manual_seed(8)
    far = (torch.rand(B, T, generator=g) < 0.3) * torch.where(torch.rand(B, T, generator=g) < 0.5, 30.0, -30.0)
    batch["old"] = batch["old"] + far
    batch["ref"] = batch["ref"] + (torch.rand(B, T, generator=g) < 0.3) * (4.0 + 2 * torch.rand(B, T, generator=g))
    cfg = actor_config(use_kl_loss=True, kl_loss_coef=0.1, kl_loss_type="low_var_kl", clip_ratio_c=1e9)
    with torch.no_grad():
        lp = torch.log_softmax(batch["hidden"].double() @ batch["weight"].double().T, -1)
        lp = lp.gather(-1, batch["responses"][..., None])[..., 0]
        active = batch["mask"].bool()
        assert ((lp - batch["old"]).abs() > 20)[active].any()
        assert (verl_kl(lp, batch["ref"].double(), "k3") >= 10)[active].any()
    compare(mode, cfg, batch)


def test_on_policy_without_old_log_prob():
    compare("token-mean", actor_config(entropy_coeff=0.02), verl_batch(3), use_old=False)


def test_dict_config_and_bf16_inputs():
    batch = verl_batch(4, dtype=torch.bfloat16)
    head = FusedLogProbInputs(batch["hidden"], batch["weight"].float(), batch["responses"], backend="chunked")
    cfg = {"clip_ratio": 0.2, "clip_ratio_c": 3.0, "global_batch_info": {}}
    loss, _ = compute_policy_loss_fused(batch["old"], head, batch["advantages"], batch["mask"], "token-mean", cfg)
    expected, _ = verl_actor_loss(batch["old"], batch["hidden"], batch["weight"], batch["responses"],
                                  batch["advantages"].double(), batch["mask"], "token-mean", actor_config(), None,
                                  None, 1.0)
    assert abs(float(loss) - float(expected)) < 1e-2 * max(1.0, abs(float(expected)))


def test_expert_tokens_under_shaped_mode_change_only_expert_terms():
    batch = verl_batch(5)
    origin = torch.tensor([0, 1, 0, 0, 2])
    cfg = actor_config()
    common = dict(ref_log_prob=batch["ref"], backend="chunked")
    plain, _ = compute_policy_loss_fused(
        batch["old"], FusedLogProbInputs(batch["hidden"], batch["weight"], batch["responses"], **common),
        batch["advantages"], batch["mask"], "seq-mean-token-sum", cfg)
    shaped, metrics = compute_policy_loss_fused(
        batch["old"], FusedLogProbInputs(batch["hidden"], batch["weight"], batch["responses"], origin=origin,
                                         expert_mode="shaped", **common),
        batch["advantages"], batch["mask"], "seq-mean-token-sum", cfg)
    assert metrics["ekipl/tokens_expert"] == batch["mask"][[1, 4]].sum()
    # LUFFY's shaping on the expert rows: -A p / (p + 0.1), summed, over the non-empty sequence count (4)
    with torch.no_grad():
        lp = torch.log_softmax(batch["hidden"].double() @ batch["weight"].double().T, -1)
        lp = lp.gather(-1, batch["responses"][..., None])[..., 0]
        expert_rows = torch.zeros(B, T, dtype=torch.bool)
        expert_rows[[1, 4]] = True
        keep = batch["mask"].bool()
        adv, p = batch["advantages"].double(), lp.exp()
        old = batch["old"].double()
        ratio = torch.exp(lp - old)
        clip1 = torch.maximum(-adv * ratio, -adv * ratio.clamp(0.8, 1.2))
        pg = torch.where(adv < 0, torch.minimum(-adv * 3.0, clip1), clip1)
        pg_shaped = torch.where(expert_rows, -adv * p / (p + 0.1), pg)
        expected_shift = ((pg_shaped - pg) * keep).sum() / 4
    torch.testing.assert_close((shaped - plain).double(), expected_shift, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("bad,match", [
    (dict(mode="seq-sum"), "loss_agg_mode='seq-sum'"),
    (dict(cfg=actor_config(use_kl_loss=True, kl_loss_type="k3+")), "kl_loss_type='k3\\+'"),
    (dict(cfg=actor_config(clip_ratio=None)), "clip_ratio is required"),
    (dict(cfg=None), "config is required"),
    (dict(drop_ref=True, cfg=actor_config(use_kl_loss=True)), "ref_log_prob"),
    (dict(short_advantages=True), "advantages must have verl's response layout"),
])
def test_bad_inputs_are_named(bad, match):
    batch = verl_batch(6)
    head = FusedLogProbInputs(batch["hidden"], batch["weight"], batch["responses"],
                              ref_log_prob=None if bad.get("drop_ref") else batch["ref"], backend="chunked")
    advantages = batch["advantages"][:, :-1] if bad.get("short_advantages") else batch["advantages"]
    with pytest.raises(ValueError, match=match):
        compute_policy_loss_fused(batch["old"], head, advantages, batch["mask"], bad.get("mode", "token-mean"),
                                  bad["cfg"] if "cfg" in bad else actor_config())
