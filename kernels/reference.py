"""The plain pure-torch GRPO loss: the oracle of every test and benchmark.

Everything runs in fp64 on materialised ``[N, V]`` logits and follows DESIGN.md ("The loss") line by
line; gradients come from autograd. Keep it obviously correct rather than fast.
"""

from __future__ import annotations

from typing import Optional, Union

import torch

from .config import LossConfig, LossOutput
from .inputs import check_logits_inputs, check_matrix_inputs, prepare_token_inputs


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
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-token loss ``l_t = pg_t + beta * kl_t - alpha * H_t`` (differentiable in logprobs, entropy).

    All inputs are ``[N]``; ``advantages`` per token. Returns the loss and per-token diagnostics
    (``ratio``, ``clipped`` (bool), ``kl``) used for the statistics.
    """
    lp = logprobs
    adv = advantages.to(lp.dtype)
    old = lp.detach() if old_logprobs is None else old_logprobs.to(lp.dtype)

    ratio_base = old
    if config.expert_mode == "is":
        ratio_base = torch.where(is_expert, behavior_logprobs.to(lp.dtype), old)
    ratio = torch.exp(lp - ratio_base)
    unclipped = -ratio * adv
    clipped = -torch.clamp(ratio, 1.0 - config.eps_low, 1.0 + config.eps_high) * adv
    pg = torch.maximum(unclipped, clipped)
    was_clipped = clipped > unclipped
    if config.dual_clip is not None:
        cap = -config.dual_clip * adv
        dual = (adv < 0) & (cap < pg)
        pg = torch.where(dual, cap, pg)
        was_clipped = was_clipped | dual
    if config.tis_cap is not None:
        tis = torch.clamp(torch.exp(old - behavior_logprobs.to(lp.dtype)), max=config.tis_cap).detach()
        pg = torch.where(is_expert, pg, pg * tis)

    if config.expert_mode == "shaped":
        prob = torch.exp(lp)
        shaped = -adv * prob / (prob + config.shaping_gamma)
        pg = torch.where(is_expert, shaped, pg)
        was_clipped = was_clipped & ~is_expert

    loss = pg
    kl = None
    if config.beta > 0:
        d = ref_logprobs.to(lp.dtype) - lp
        if config.kl == "k1":
            kl = -d
        elif config.kl == "k2":
            kl = 0.5 * d * d
        else:
            kl = torch.exp(d) - d - 1.0
        loss = loss + config.beta * kl
    if config.entropy_coef != 0:
        loss = loss - config.entropy_coef * entropy
    diagnostics = {"ratio": ratio.detach(), "clipped": was_clipped, "is_ratio": ~(is_expert & (config.expert_mode == "shaped"))}
    if kl is not None:
        diagnostics["kl"] = kl.detach()
    return loss, diagnostics


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
    """fp64 log-probs of ``targets`` and entropies of ``softmax(logits / temperature)``."""
    z = logits.double() / temperature
    logp = torch.log_softmax(z, dim=-1)
    lp = logp.gather(-1, targets.long().unsqueeze(-1)).squeeze(-1)
    entropy = -(logp.exp() * logp).sum(-1)
    return lp, entropy


def grpo_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    advantages: torch.Tensor,
    cu_seqlens: torch.Tensor,
    origin: Optional[torch.Tensor] = None,
    old_logprobs: Optional[torch.Tensor] = None,
    ref_logprobs: Optional[torch.Tensor] = None,
    behavior_logprobs: Optional[torch.Tensor] = None,
    loss_mask: Optional[torch.Tensor] = None,
    normalizer: Union[float, torch.Tensor, None] = None,
    config: LossConfig = LossConfig(),
) -> LossOutput:
    """The GRPO loss over materialised logits ``[N, V]``, in fp64."""
    check_logits_inputs(logits, targets)
    n = logits.shape[0]
    tok = prepare_token_inputs(
        n, logits.device, advantages=advantages, cu_seqlens=cu_seqlens, origin=origin, old_logprobs=old_logprobs,
        ref_logprobs=ref_logprobs, behavior_logprobs=behavior_logprobs, loss_mask=loss_mask, normalizer=normalizer,
        config=config,
    )
    lp, entropy = logprobs_and_entropy(logits, targets, config.temperature)
    loss_t, diag = token_losses(
        lp, entropy, advantages=tok.advantages.double(), is_expert=tok.is_expert, old_logprobs=tok.old_logprobs,
        ref_logprobs=tok.ref_logprobs, behavior_logprobs=tok.behavior_logprobs, config=config,
    )
    loss = aggregate(loss_t, tok.mask, cu_seqlens, normalizer, config)
    keep_entropy = config.entropy_coef != 0
    return LossOutput(
        loss=loss.float(),
        logprobs=lp.detach().float(),
        entropy=entropy.detach().float() if keep_entropy else None,
        stats=summarize(tok.mask, tok.is_expert, diag, entropy.detach() if keep_entropy else None),
    )


def fused_linear_grpo_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, **kwargs) -> LossOutput:
    """The GRPO loss of ``logits = hidden @ weight.T``, materialised in fp64; same keywords as :func:`grpo_loss`."""
    check_matrix_inputs(hidden, weight, targets)
    return grpo_loss(hidden.double() @ weight.double().T, targets, **kwargs)


def fused_linear_logprobs(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *, temperature: float = 1.0,
    return_entropy: bool = False,
):
    """fp64 log-probs (and entropies) of ``targets`` under ``softmax(hidden @ weight.T / temperature)``."""
    check_matrix_inputs(hidden, weight, targets)
    lp, entropy = logprobs_and_entropy(hidden.double() @ weight.double().T, targets, temperature)
    return (lp.float(), entropy.float()) if return_entropy else lp.float()


def summarize(
    mask: torch.Tensor, is_expert: torch.Tensor, diag: dict[str, torch.Tensor], entropy: Optional[torch.Tensor]
) -> dict[str, float]:
    """Masked means of the per-token diagnostics, as plain floats."""
    mask = mask.double()
    active = mask > 0

    def masked_mean(x: torch.Tensor, m: torch.Tensor) -> float:
        total = m.sum()
        return float((x.double() * m).sum() / total) if float(total) > 0 else 0.0

    ratio_mask = mask * diag["is_ratio"].double()
    stats = {
        "clip_frac": masked_mean(diag["clipped"].double(), ratio_mask),
        "ratio_mean": masked_mean(diag["ratio"], ratio_mask),
        "tokens_policy": float((active & ~is_expert).sum()),
        "tokens_expert": float((active & is_expert).sum()),
    }
    if "kl" in diag:
        stats["kl_mean"] = masked_mean(diag["kl"], mask)
    if entropy is not None:
        stats["entropy_mean"] = masked_mean(entropy, mask)
    return stats
