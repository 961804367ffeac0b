"""The plain pure-torch GRPO loss: the oracle of every test and benchmark.

Everything runs in fp64 on materialised ``[N, V]`` logits and follows DESIGN.md ("The loss") line by
line; gradients come from autograd. Keep it obviously correct rather than fast.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Optional, Union

import torch

from .config import LossConfig, LossOutput
from .inputs import TokenInputs, check_logits_inputs, check_matrix_inputs, prepare_token_inputs


def _clamp(x: torch.Tensor, bound: Optional[float]) -> torch.Tensor:
    return x if bound is None else torch.clamp(x, -bound, bound)


def token_losses(
    logprobs: torch.Tensor,
    entropy: Optional[torch.Tensor],
    *,
    advantages: torch.Tensor,
    is_expert: torch.Tensor,
    old_logprobs: Optional[torch.Tensor],
    ref_logprobs: Optional[torch.Tensor],
    behavior_logprobs: Optional[torch.Tensor],
    config: LossConfig,
    seq_log_ratio: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-token loss ``l_t = pg_t + beta * kl_t - alpha * H_t`` (differentiable in logprobs, entropy).

    All inputs are ``[N]``; ``advantages`` per token; ``seq_log_ratio`` (``ratio_level="sequence"`` only) each
    token's sequence log-ratio, from :func:`sequence_log_ratio`. Returns the loss and per-token diagnostics
    (``ratio``, ``clipped`` (bool), ``ppo`` (bool: the token takes the clipped surrogate), ``kl``) used
    for the statistics.
    """
    lp = logprobs
    adv = advantages.to(lp.dtype)
    old = lp.detach() if old_logprobs is None else old_logprobs.to(lp.dtype)
    beh = None if behavior_logprobs is None else behavior_logprobs.to(lp.dtype)

    # One ratio per token, to the expert's log-probs where "is" applies: no branch exponentiates a
    # log-ratio that its token does not use (an overflow there would poison the gradient of the other).
    importance = is_expert & (config.expert_mode == "is")
    base = torch.where(importance, beh, old) if config.expert_mode == "is" else old
    if config.ratio_level == "sequence" and seq_log_ratio is None:
        raise ValueError("ratio_level='sequence' needs seq_log_ratio (see sequence_log_ratio)")
    log_ratio = _clamp(seq_log_ratio if config.ratio_level == "sequence" else lp - base, config.log_ratio_clamp)
    ratio = torch.exp(log_ratio)
    if config.policy_loss == "clip":
        unclipped = -ratio * adv
        clipped = -torch.clamp(ratio, 1.0 - config.eps_low, 1.0 + config.eps_high) * adv
        pg = torch.maximum(unclipped, clipped)
        was_clipped = clipped > unclipped
        if config.dual_clip is not None:
            cap = -config.dual_clip * adv
            dual = (adv < 0) & (cap < pg)
            pg = torch.where(dual, cap, pg)
            was_clipped = was_clipped | dual
    elif config.policy_loss == "cispo":
        pg = -torch.clamp(ratio, max=config.cispo_cap).detach() * adv * lp
        was_clipped = (ratio > config.cispo_cap) & (adv > 0)  # TRL's cispo_clip_ratio
    else:  # sapo
        tau = torch.where(adv > 0, config.sapo_temperature_pos, config.sapo_temperature_neg)
        pg = -torch.sigmoid(tau * (ratio - 1.0)) * 4.0 / tau * adv
        was_clipped = torch.zeros_like(is_expert)
    if config.tis_cap is not None:
        tis = torch.clamp(torch.exp(old - beh), max=config.tis_cap).detach()
        pg = torch.where(is_expert, pg, pg * tis)

    if config.expert_mode == "is":
        if config.is_cap is None:
            is_pg = -adv * ratio
        else:  # value -min(rho, cap) A, gradient -min(rho, cap) A dlp: a truncated importance weight
            is_pg = -adv * torch.clamp(ratio, max=config.is_cap).detach() * torch.exp(log_ratio - log_ratio.detach())
        pg = torch.where(importance, is_pg, pg)
    if config.expert_mode == "shaped":
        prob = torch.exp(lp)
        shaped = -adv * prob / (prob + config.shaping_gamma)
        pg = torch.where(is_expert, shaped, pg)
    ppo = ~is_expert if config.expert_mode in ("is", "shaped") else torch.ones_like(is_expert)

    loss = pg
    kl = None
    if config.beta > 0:
        d = ref_logprobs.to(lp.dtype) - lp
        if config.kl == "k1":
            kl = -d
        elif config.kl == "k2":
            kl = 0.5 * d * d
        else:
            d = _clamp(d, config.log_ratio_clamp)
            kl = _clamp(torch.exp(d) - d - 1.0, config.kl_clamp)
        if config.kl_bias_correction:
            kl = kl * ratio
        loss = loss + config.beta * kl
    if config.entropy_coef != 0:
        loss = loss - config.entropy_coef * entropy
    diagnostics = {"ratio": ratio.detach(), "clipped": was_clipped & ppo, "ppo": ppo}
    if kl is not None:
        diagnostics["kl"] = kl.detach()
    return loss, diagnostics


def sequence_log_ratio(
    logprobs: torch.Tensor, old_logprobs: Optional[torch.Tensor], seq_start: torch.Tensor, mask: torch.Tensor, n: int
) -> torch.Tensor:
    """Each token's sequence mean of ``lp - old`` over the sequence's unmasked tokens (GSPO), differentiable in
    ``logprobs``; ``seq_start`` indexes a buffer of ``n`` sequence slots. ``old=None``: ``stop_grad(lp)``."""
    old = logprobs.detach() if old_logprobs is None else old_logprobs.to(logprobs.dtype)
    on = mask != 0
    diff = torch.where(on, logprobs - old, 0.0)
    sums = diff.new_zeros(n).index_add(0, seq_start, diff)
    counts = diff.new_zeros(n).index_add(0, seq_start, on.to(diff.dtype))
    return sums[seq_start] / counts[seq_start].clamp(min=1.0)


def aggregate(
    loss_t: torch.Tensor,
    mask: torch.Tensor,
    cu_seqlens: torch.Tensor,
    normalizer: Union[float, torch.Tensor, None],
    config: LossConfig,
) -> torch.Tensor:
    """Reduces per-token losses to the scalar loss, straight from the definitions."""
    mask = mask.to(loss_t.dtype)
    if config.agg == "token-mean":
        denom = mask.sum() if normalizer is None else torch.as_tensor(normalizer, dtype=loss_t.dtype)
        return (loss_t * mask).sum() / denom if float(denom) != 0 else (loss_t * mask).sum() * 0
    bounds = cu_seqlens.tolist()
    if config.agg == "seq-mean-token-mean":
        seq_means = []
        for start, end in zip(bounds[:-1], bounds[1:]):
            count = mask[start:end].sum()
            if float(count) > 0:
                seq_means.append((loss_t[start:end] * mask[start:end]).sum() / count)
        if not seq_means:
            return (loss_t * mask).sum() * 0
        denom = len(seq_means) if normalizer is None else torch.as_tensor(normalizer, dtype=loss_t.dtype)
        return torch.stack(seq_means).sum() / denom
    num_seqs = len(bounds) - 1 if normalizer is None else torch.as_tensor(normalizer, dtype=loss_t.dtype)
    return (loss_t * mask).sum() / (num_seqs * config.max_len)


def logprobs_and_entropy(logits: torch.Tensor, targets: torch.Tensor, temperature: float):
    """Log-probs of ``targets`` and entropies of ``softmax(logits / temperature)``, in the dtype of ``logits``.

    A -inf logit is an absent vocabulary entry: it adds nothing to the entropy and gets no gradient.
    """
    logp = torch.log_softmax(logits / temperature, dim=-1)
    lp = logp.gather(-1, targets.long().unsqueeze(-1)).squeeze(-1)
    p = logp.exp()
    entropy = -(p * torch.where(p > 0, logp, 0.0)).sum(-1)
    return lp, entropy


@dataclass
class ActiveTokens:
    """What :func:`active_token_losses` returns."""

    index: torch.Tensor  # [A] positions of the unmasked tokens
    loss: torch.Tensor  # [A] their l_t, differentiable through their logits
    diagnostics: dict[str, torch.Tensor]  # [A] each (see token_losses)
    logprobs: torch.Tensor  # [N] every token's, detached
    entropy: torch.Tensor  # [N] every token's, detached


def active_token_losses(
    logits_of: Callable[[torch.Tensor], torch.Tensor], targets: torch.Tensor, tok: TokenInputs, config: LossConfig
) -> ActiveTokens:
    """Per-token losses of the unmasked tokens (``mask != 0``), log-probs and entropies of all tokens.

    ``logits_of(index)`` returns the logits of the rows ``index``. Masked rows are computed apart, without
    gradient, so whatever they or their per-token inputs hold (NaN, inf) reaches neither loss nor gradient.
    """
    on = (tok.mask != 0).nonzero().squeeze(1)
    off = (tok.mask == 0).nonzero().squeeze(1)
    lp_on, entropy_on = logprobs_and_entropy(logits_of(on), targets[on], config.temperature)
    with torch.no_grad():
        lp_off, entropy_off = logprobs_and_entropy(logits_of(off), targets[off], config.temperature)
    loss, diagnostics = unmasked_token_losses(lp_on, entropy_on, on, tok, config)
    every = lambda a, b: a.new_empty(tok.mask.shape).index_copy_(0, on, a.detach()).index_copy_(0, off, b)  # noqa: E731
    return ActiveTokens(on, loss, diagnostics, every(lp_on, lp_off), every(entropy_on, entropy_off))


def unmasked_token_losses(lp_on: torch.Tensor, entropy_on: torch.Tensor, on: torch.Tensor, tok: TokenInputs,
                          config: LossConfig) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """:func:`token_losses` of the unmasked tokens ``on`` (their log-probs and entropies given), sequence
    log-ratios formed over them."""
    active = tok.select(on)
    seq = None
    if config.ratio_level == "sequence":
        seq = sequence_log_ratio(lp_on, active.old_logprobs, active.seq_start, active.mask, tok.mask.shape[0])
    return token_losses(
        lp_on, entropy_on, advantages=active.advantages, is_expert=active.is_expert, old_logprobs=active.old_logprobs,
        ref_logprobs=active.ref_logprobs, behavior_logprobs=active.behavior_logprobs, config=config,
        seq_log_ratio=seq,
    )


def sequence_level_derivatives(logprobs: torch.Tensor, entropy: Optional[torch.Tensor], tok: TokenInputs,
                               config: LossConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The loss ``sum_t w_t l_t`` of given log-probs and entropies (``[N]``, entropy None when
    ``config.entropy_coef == 0``) and its derivative with respect to each log-prob, ``[N]``, 0 on masked tokens: what
    a sequence-level ratio couples. Masked tokens are selected out, whatever their inputs hold."""
    on = (tok.mask != 0).nonzero().squeeze(1)
    with torch.enable_grad():
        lp_on = logprobs[on].detach().requires_grad_()
        loss_t, _ = unmasked_token_losses(lp_on, None if entropy is None else entropy[on], on, tok, config)
        loss = (loss_t * tok.agg_weight[on]).sum()
        (d_lp,) = torch.autograd.grad(loss, lp_on, materialize_grads=True)
    return loss.detach(), torch.zeros_like(logprobs).index_copy_(0, on, d_lp.to(logprobs.dtype))


def _loss(
    logits_of: Callable[[torch.Tensor], torch.Tensor],
    n: int,
    device: torch.device,
    targets: torch.Tensor,
    *,
    cu_seqlens: torch.Tensor,
    normalizer: Union[float, torch.Tensor, None] = None,
    config: LossConfig = LossConfig(),
    return_entropy: bool = False,
    **keywords,
) -> LossOutput:
    tok = prepare_token_inputs(n, device, cu_seqlens=cu_seqlens, normalizer=normalizer, config=config, **keywords)
    act = active_token_losses(logits_of, targets, tok, config)
    loss_t = act.loss.new_zeros(n).index_add(0, act.index, act.loss)  # masked tokens: exactly 0
    loss = aggregate(loss_t, tok.mask, cu_seqlens, normalizer, config)
    keep_entropy = return_entropy or config.entropy_coef != 0
    return LossOutput(
        loss=loss.float(),
        logprobs=act.logprobs.float(),
        entropy=act.entropy.float() if keep_entropy else None,
        stats=summarize(tok.mask[act.index], tok.is_expert[act.index], act.diagnostics,
                        act.entropy[act.index] if keep_entropy else None),
    )


def grpo_loss(logits: torch.Tensor, targets: torch.Tensor, **keywords) -> LossOutput:
    """The GRPO loss over materialised logits ``[N, V]``, in fp64; the keywords of ``ekipl_kernels.grpo_loss``."""
    check_logits_inputs(logits, targets)
    return _loss(lambda rows: logits[rows].double(), logits.shape[0], logits.device, targets, **keywords)


def _linear(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], rows) -> torch.Tensor:
    logits = hidden[rows].double() @ weight.double().T
    return logits if bias is None else logits + bias.double()


def fused_linear_grpo_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                           bias: Optional[torch.Tensor] = None, **keywords) -> LossOutput:
    """The GRPO loss of ``logits = hidden @ weight.T + bias``, materialised in fp64; same keywords as
    :func:`grpo_loss`."""
    check_matrix_inputs(hidden, weight, targets, bias)
    return _loss(lambda rows: _linear(hidden, weight, bias, rows), hidden.shape[0], hidden.device, targets,
                 **keywords)


def fused_linear_logprobs(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *, bias: Optional[torch.Tensor] = None,
    temperature: float = 1.0, return_entropy: bool = False,
):
    """fp64 log-probs (and entropies) of ``targets`` under ``softmax((hidden @ weight.T + bias) / temperature)``."""
    check_matrix_inputs(hidden, weight, targets, bias)
    lp, entropy = logprobs_and_entropy(_linear(hidden, weight, bias, slice(None)), targets, temperature)
    return (lp.float(), entropy.float()) if return_entropy else lp.float()


def statistics(
    logprobs: torch.Tensor, entropy: Optional[torch.Tensor], tok: TokenInputs, config: LossConfig
) -> dict[str, torch.Tensor]:
    """The batch statistics of a fast backend's per-token log-probs (and entropies), on their device.

    Every token goes through the elementwise :func:`token_losses`; :func:`summarize` selects the unmasked
    ones with ``torch.where``, so nothing here waits for the device (no ``nonzero``, no ``float()``)."""
    with torch.no_grad():
        seq = None
        if config.ratio_level == "sequence":
            seq = sequence_log_ratio(logprobs, tok.old_logprobs, tok.seq_start, tok.mask, tok.mask.shape[0])
        _, diagnostics = token_losses(
            logprobs, None, advantages=tok.advantages, is_expert=tok.is_expert, old_logprobs=tok.old_logprobs,
            ref_logprobs=tok.ref_logprobs, behavior_logprobs=tok.behavior_logprobs,
            config=replace(config, entropy_coef=0.0), seq_log_ratio=seq,
        )
    return summarize(tok.mask, tok.is_expert, diagnostics, entropy)


def summarize(
    mask: torch.Tensor, is_expert: torch.Tensor, diag: dict[str, torch.Tensor], entropy: Optional[torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Masked means of the per-token diagnostics as 0-dim fp32 tensors on their device (0 over no token);
    PPO statistics over the PPO tokens. Masked tokens are selected out, whatever NaN they hold."""
    mask = mask.float()
    active = mask != 0

    def masked_mean(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        total = m.sum()
        weighted = (torch.where(m != 0, x.float(), 0.0) * m).sum()
        return torch.where(total > 0, weighted / torch.where(total > 0, total, 1.0), 0.0)

    ppo_mask = mask * diag["ppo"].float()
    stats = {
        "clip_frac": masked_mean(diag["clipped"], ppo_mask),
        "ratio_mean": masked_mean(diag["ratio"], ppo_mask),
        "tokens_policy": (active & ~is_expert).sum().float(),
        "tokens_expert": (active & is_expert).sum().float(),
    }
    if "kl" in diag:
        stats["kl_mean"] = masked_mean(diag["kl"], mask)
    if entropy is not None:
        stats["entropy_mean"] = masked_mean(entropy, mask)
    return stats
