"""The per-token GRPO loss and its derivative, for kernels; the host side packs its arguments.

``token_loss`` mirrors :func:`ekipl_kernels.reference.token_losses` term by term (same clip, dual clip,
TIS and expert-mode rules), returning ``l_t`` and ``dl_t/dlp_t``; ``dl_t/dH_t`` is ``-entropy_coef``.
Switches are run-time scalars rather than constexprs, so one compiled kernel serves every config.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

# Integer switches that Triton must not specialise on (a value of 1 would compile another variant).
TOKEN_INT_ARGS = ["has_old", "kl_kind", "expert_mode", "policy_loss", "kl_bias_correction"]
# Counts that change with every varlen batch (N, and the vocabulary splits of the fused forward, which
# follow N): specialising on them (N % 16, N == 1) would compile new variants as batches come, and no
# kernel here gains from their divisibility.
VARLEN_ARGS = ["N"]
# The loss scalars in the order of the ``ekipl::`` ops and of ``token_loss`` (0 turns a cap or clamp off).
SCALARS = ("eps_low", "eps_high", "dual_clip", "beta", "kl_kind", "entropy_coef", "expert_mode", "shaping_gamma",
           "is_cap", "tis_cap", "log_ratio_clamp", "kl_clamp", "policy_loss", "cispo_cap", "sapo_temperature_pos",
           "sapo_temperature_neg", "kl_bias_correction")


@dataclass
class TokenArgs:
    """Per-token vectors ``[N]`` and the loss scalars, as the kernels take them (see ``ops.config_scalars``)."""

    advantages: torch.Tensor
    agg_weight: torch.Tensor
    is_expert: torch.Tensor
    old_logprobs: Optional[torch.Tensor]
    ref_logprobs: Optional[torch.Tensor]
    behavior_logprobs: Optional[torch.Tensor]
    eps_low: float
    eps_high: float
    dual_clip: float
    beta: float
    kl_kind: int
    entropy_coef: float
    expert_mode: int
    shaping_gamma: float
    is_cap: float
    tis_cap: float
    log_ratio_clamp: float
    kl_clamp: float
    policy_loss: int
    cispo_cap: float
    sapo_temperature_pos: float
    sapo_temperature_neg: float
    kl_bias_correction: int

    def __post_init__(self) -> None:
        n = self.advantages.shape[0]
        for name in ("advantages", "agg_weight", "is_expert", "old_logprobs", "ref_logprobs", "behavior_logprobs"):
            vec = getattr(self, name)
            if vec is not None and vec.shape != (n,):
                raise ValueError(f"{name} must have shape [{n}] like advantages; got {tuple(vec.shape)}")
        if self.beta > 0 and self.ref_logprobs is None:
            raise ValueError(f"ref_logprobs is required when beta > 0 (beta={self.beta})")
        if (self.expert_mode == 1 or self.tis_cap > 0) and self.behavior_logprobs is None:
            raise ValueError("behavior_logprobs is required with expert_mode=1 ('is') or tis_cap > 0")
        if self.kl_kind not in (1, 2, 3) or self.expert_mode not in (0, 1, 2) or self.policy_loss not in (0, 1, 2):
            raise ValueError(f"kl_kind must be 1/2/3, expert_mode and policy_loss 0/1/2; got {self.kl_kind}, "
                             f"{self.expert_mode}, {self.policy_loss}")
        bad = [f"{name}={getattr(self, name)}" for name in SCALARS if not math.isfinite(getattr(self, name))]
        if bad:
            raise ValueError(f"the loss scalars must be finite; got {', '.join(bad)}")

    def rows(self, start: int, stop: int) -> "TokenArgs":
        """The same arguments for tokens ``start:stop`` (views, no copies)."""
        cut = lambda v: None if v is None else v[start:stop]  # noqa: E731
        return TokenArgs(**{**self.__dict__, **{k: cut(v) for k, v in self.__dict__.items() if isinstance(v, torch.Tensor)}})

    def kernel_args(self) -> tuple:
        """Positional arguments matching ``load_token_loss`` after ``rows, row_ok, lp, ent``."""
        vec = lambda v: self.advantages if v is None else v  # noqa: E731  (never read when absent)
        return (
            self.advantages, self.agg_weight, self.is_expert.view(torch.uint8), vec(self.old_logprobs),
            vec(self.ref_logprobs), vec(self.behavior_logprobs), int(self.old_logprobs is not None),
            *(_scalar(name, getattr(self, name)) for name in SCALARS),
        )

    @staticmethod
    def unused_kernel_args(dummy: torch.Tensor) -> tuple:
        """Placeholders for :meth:`kernel_args` in a launch that reads none of them."""
        return (dummy,) * 6 + (0,) + tuple(_scalar(name, 0) for name in SCALARS)


def _scalar(name: str, value) -> object:
    return int(value) if name in TOKEN_INT_ARGS else float(value)


def token_args(advantages, agg_weight, is_expert, old_logprobs, ref_logprobs, behavior_logprobs, *scalars) -> TokenArgs:
    """:class:`TokenArgs` from the ``ekipl::`` op arguments (the scalars in :data:`SCALARS` order): fp32
    contiguous vectors, bool flags."""
    vec = lambda v: None if v is None else v.detach().float().contiguous()  # noqa: E731
    return TokenArgs(
        vec(advantages), vec(agg_weight), is_expert.detach().bool().contiguous(), vec(old_logprobs), vec(ref_logprobs),
        vec(behavior_logprobs), *scalars,
    )


@triton.jit
def _clamp(x, bound):
    """``(x clamped to [-bound, bound], d clamp / dx)``, the slope 1 at the bounds as ``torch.clamp``; bound 0: off."""
    clamped = (bound > 0) & ((x < -bound) | (x > bound))
    return tl.where(clamped, tl.minimum(tl.maximum(x, -bound), bound), x), tl.where(clamped, 0.0, 1.0)


@triton.jit
def token_loss(lp, ent, adv, is_expert, old, ref, beh, has_old, eps_low, eps_high, dual_clip, beta, kl_kind,
               entropy_coef, expert_mode, shaping_gamma, is_cap, tis_cap, log_ratio_clamp, kl_clamp, policy_loss,
               cispo_cap, sapo_temperature_pos, sapo_temperature_neg, kl_bias_correction):
    """``(l_t, dl_t/dlp_t)`` for vectors of tokens; see DESIGN.md, "The loss (normative)"."""
    old = tl.where(has_old != 0, old, lp)  # no old log-probs: old = stop_grad(lp), ratio 1
    importance = is_expert & (expert_mode == 1)
    log_ratio, slope = _clamp(lp - tl.where(importance, beh, old), log_ratio_clamp)
    ratio = tl.exp(log_ratio)
    unclipped = -ratio * adv
    clipped = -tl.minimum(tl.maximum(ratio, 1.0 - eps_low), 1.0 + eps_high) * adv
    pg = tl.maximum(unclipped, clipped)
    d_pg = tl.where(clipped > unclipped, 0.0, -adv * ratio * slope)  # the clamp is flat where it wins
    # CISPO: -w A lp with the weight w = min(ratio, cap) not differentiated.
    w_cispo = tl.minimum(ratio, cispo_cap)
    pg = tl.where(policy_loss == 1, -w_cispo * adv * lp, pg)
    d_pg = tl.where(policy_loss == 1, -w_cispo * adv, d_pg)
    # SAPO: a soft gate -sigmoid(t (ratio - 1)) 4 / t A, t by the sign of A.
    tau = tl.where(adv > 0, sapo_temperature_pos, sapo_temperature_neg)
    gate = tl.sigmoid(tau * (ratio - 1.0))
    pg = tl.where(policy_loss == 2, -gate * 4.0 / tau * adv, pg)
    d_pg = tl.where(policy_loss == 2, -4.0 * adv * gate * (1.0 - gate) * ratio * slope, d_pg)
    cap = -dual_clip * adv
    dual = (policy_loss == 0) & (dual_clip > 0) & (adv < 0) & (cap < pg)
    pg = tl.where(dual, cap, pg)
    d_pg = tl.where(dual, 0.0, d_pg)
    # Truncated importance weight on policy tokens only, not differentiated.
    tis = tl.where(tis_cap > 0, tl.minimum(tl.exp(old - beh), tis_cap), 1.0)
    pg = tl.where(is_expert, pg, pg * tis)
    d_pg = tl.where(is_expert, d_pg, d_pg * tis)
    # "is" expert tokens: -w A, w = min(ratio, is_cap) unclipped; the gradient keeps the capped weight.
    w = tl.where(is_cap > 0, tl.minimum(ratio, is_cap), ratio)
    pg = tl.where(importance, -adv * w, pg)
    d_pg = tl.where(importance, -adv * w * slope, d_pg)
    prob = tl.exp(lp)
    denom = prob + shaping_gamma
    shaped = is_expert & (expert_mode == 2)
    pg = tl.where(shaped, -adv * prob / denom, pg)
    d_pg = tl.where(shaped, -adv * shaping_gamma * prob / (denom * denom), d_pg)
    d = ref - lp
    d3, d3_slope = _clamp(d, log_ratio_clamp)
    exp_d = tl.exp(tl.where(kl_kind == 3, d3, 0.0))  # only k3 needs it; elsewhere it could overflow
    k3, k3_slope = _clamp(exp_d - d3 - 1.0, kl_clamp)
    kl = tl.where(kl_kind == 1, -d, tl.where(kl_kind == 2, 0.5 * d * d, k3))
    d_kl = tl.where(kl_kind == 1, 1.0, tl.where(kl_kind == 2, -d, (1.0 - exp_d) * d3_slope * k3_slope))
    # The bias-corrected KL ratio * kl, differentiated through the ratio too.
    d_kl = tl.where(kl_bias_correction != 0, ratio * d_kl + kl * ratio * slope, d_kl)
    kl = tl.where(kl_bias_correction != 0, kl * ratio, kl)
    loss = pg + tl.where(beta > 0, beta * kl, 0.0)  # where, not a product: ref may be absent when beta = 0
    d_lp = d_pg + tl.where(beta > 0, beta * d_kl, 0.0)
    loss = tl.where(entropy_coef != 0, loss - entropy_coef * ent, loss)
    return loss, d_lp


@triton.jit
def load_token_loss(rows, row_ok, lp, ent, adv_ptr, w_ptr, expert_ptr, old_ptr, ref_ptr, beh_ptr, has_old, eps_low,
                    eps_high, dual_clip, beta, kl_kind, entropy_coef, expert_mode, shaping_gamma, is_cap, tis_cap,
                    log_ratio_clamp, kl_clamp, policy_loss, cispo_cap, sapo_temperature_pos, sapo_temperature_neg,
                    kl_bias_correction):
    """Loads the token inputs of ``rows``; returns ``(w_t, w_t l_t, w_t dl_t/dlp_t)``, both products exactly 0
    where ``w_t = 0`` (a masked token's inputs and log-prob may be NaN or inf: 0 * NaN would be NaN)."""
    adv = tl.load(adv_ptr + rows, mask=row_ok, other=0.0)
    w = tl.load(w_ptr + rows, mask=row_ok, other=0.0)
    is_expert = tl.load(expert_ptr + rows, mask=row_ok, other=0) != 0
    old = tl.load(old_ptr + rows, mask=row_ok & (has_old != 0), other=0.0)
    ref = tl.load(ref_ptr + rows, mask=row_ok & (beta > 0), other=0.0)
    beh = tl.load(beh_ptr + rows, mask=row_ok & ((expert_mode == 1) | (tis_cap > 0)), other=0.0)
    loss, d_lp = token_loss(lp, ent, adv, is_expert, old, ref, beh, has_old, eps_low, eps_high, dual_clip, beta,
                            kl_kind, entropy_coef, expert_mode, shaping_gamma, is_cap, tis_cap, log_ratio_clamp,
                            kl_clamp, policy_loss, cispo_cap, sapo_temperature_pos, sapo_temperature_neg,
                            kl_bias_correction)
    active = w != 0
    return w, tl.where(active, w * loss, 0.0), tl.where(active, w * d_lp, 0.0)
