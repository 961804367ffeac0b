"""The per-token GRPO loss and its derivative, for kernels; the host side packs its arguments.

``token_loss`` mirrors :func:`ekipl_kernels.reference.token_losses` term by term (same clip, dual clip,
TIS and expert-mode rules), returning ``l_t`` and ``dl_t/dlp_t``; ``dl_t/dH_t`` is ``-entropy_coef``.

The loss scalars reach the kernels as one argument, ``scalars_ptr``: an fp32 device vector in the order of
:data:`ekipl_kernels.loss_scalars.LOSS_SCALARS`, read at the slot constants below. They are run-time values, not
constexprs, so one compiled kernel serves every config; the vector of a config is built once per device
(:func:`scalars_on`), so a training step copies nothing to the device for them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Optional, Sequence

import torch
import triton
import triton.language as tl

from ..config import EXPERT_MODES, KL_ESTIMATORS, POLICY_LOSSES
from ..loss_scalars import LOSS_SCALARS, slot

# An integer switch that Triton must not specialise on (a value of 1 would compile another variant).
TOKEN_INT_ARGS = ["has_old"]
# Counts that change with every varlen batch (N, and the vocabulary splits of the fused forward, which
# follow N): specialising on them (N % 16, N == 1) would compile new variants as batches come, and no
# kernel here gains from their divisibility.
VARLEN_ARGS = ["N"]

# The slot of each loss scalar in ``scalars_ptr``, named after the scalar upper-cased; constexprs, so that a
# load's offset is compiled in. ``load_token_loss`` reads each of them (checked at the end of this module).
EPS_LOW = tl.constexpr(slot("eps_low"))
EPS_HIGH = tl.constexpr(slot("eps_high"))
DUAL_CLIP = tl.constexpr(slot("dual_clip"))
BETA = tl.constexpr(slot("beta"))
KL_KIND = tl.constexpr(slot("kl_kind"))
ENTROPY_COEF = tl.constexpr(slot("entropy_coef"))
EXPERT_MODE = tl.constexpr(slot("expert_mode"))
SHAPING_GAMMA = tl.constexpr(slot("shaping_gamma"))
IS_CAP = tl.constexpr(slot("is_cap"))
TIS_CAP = tl.constexpr(slot("tis_cap"))
LOG_RATIO_CLAMP = tl.constexpr(slot("log_ratio_clamp"))
KL_CLAMP = tl.constexpr(slot("kl_clamp"))
POLICY_LOSS = tl.constexpr(slot("policy_loss"))
CISPO_CAP = tl.constexpr(slot("cispo_cap"))
SAPO_TEMPERATURE_POS = tl.constexpr(slot("sapo_temperature_pos"))
SAPO_TEMPERATURE_NEG = tl.constexpr(slot("sapo_temperature_neg"))
KL_BIAS_CORRECTION = tl.constexpr(slot("kl_bias_correction"))
# Read on the host instead: every kernel takes 1 / temperature as its own argument ``inv_tau``, since the
# log-prob kernels, which have no loss scalars, need it too.
HOST_SCALARS = ("temperature",)

_IMPORTANCE = EXPERT_MODES.index("is")


@lru_cache(maxsize=64)
def scalars_on(scalars: tuple[float, ...], device: torch.device) -> torch.Tensor:
    """The loss scalars as the kernels read them: an fp32 vector on ``device``, made once per config and device
    (never written: every caller shares it)."""
    return torch.tensor(scalars, dtype=torch.float32, device=device)


@dataclass
class TokenArgs:
    """Per-token vectors ``[N]`` and the loss scalars (:func:`ekipl_kernels.loss_scalars.loss_scalars`), as the
    kernels take them."""

    advantages: torch.Tensor
    agg_weight: torch.Tensor
    is_expert: torch.Tensor
    old_logprobs: Optional[torch.Tensor]
    ref_logprobs: Optional[torch.Tensor]
    behavior_logprobs: Optional[torch.Tensor]
    scalars: tuple[float, ...]

    def __post_init__(self) -> None:
        n = self.advantages.shape[0]
        for name in ("advantages", "agg_weight", "is_expert", "old_logprobs", "ref_logprobs", "behavior_logprobs"):
            vec = getattr(self, name)
            if vec is not None and vec.shape != (n,):
                raise ValueError(f"{name} must have shape [{n}] like advantages; got {tuple(vec.shape)}")
        if len(self.scalars) != len(LOSS_SCALARS):
            raise ValueError(f"scalars must hold the {len(LOSS_SCALARS)} loss scalars in the order "
                             f"{', '.join(LOSS_SCALARS)} (loss_scalars(config) builds them); got {len(self.scalars)}")
        bad = [f"{name}={value}" for name, value in zip(LOSS_SCALARS, self.scalars) if not math.isfinite(value)]
        if bad:
            raise ValueError(f"the loss scalars must be finite; got {', '.join(bad)}")
        for name, choices in (("kl_kind", KL_ESTIMATORS), ("expert_mode", EXPERT_MODES), ("policy_loss", POLICY_LOSSES)):
            first = 1 if name == "kl_kind" else 0
            codes = range(first, first + len(choices))
            if self.scalar(name) not in codes:
                raise ValueError(f"the scalar {name} must be one of {list(codes)} (for {', '.join(choices)}); "
                                 f"got {self.scalar(name)}")
        if self.scalar("beta") > 0 and self.ref_logprobs is None:
            raise ValueError(f"ref_logprobs is required when beta > 0 (beta={self.scalar('beta')})")
        if (self.scalar("expert_mode") == _IMPORTANCE or self.scalar("tis_cap") > 0) and self.behavior_logprobs is None:
            raise ValueError("behavior_logprobs is required with expert_mode 'is' or tis_cap > 0")

    def scalar(self, name: str) -> float:
        """The value of the loss scalar ``name``."""
        return self.scalars[slot(name)]

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
            scalars_on(self.scalars, self.advantages.device),
        )

    @staticmethod
    def unused_kernel_args(dummy: torch.Tensor) -> tuple:
        """Placeholders for :meth:`kernel_args` in a launch that reads none of them."""
        return (dummy,) * 6 + (0, dummy)


def token_args(advantages, agg_weight, is_expert, old_logprobs, ref_logprobs, behavior_logprobs,
               scalars: Sequence[float]) -> TokenArgs:
    """:class:`TokenArgs` from the ``ekipl::`` op arguments: fp32 contiguous vectors, bool flags."""
    vec = lambda v: None if v is None else v.detach().float().contiguous()  # noqa: E731
    return TokenArgs(
        vec(advantages), vec(agg_weight), is_expert.detach().bool().contiguous(), vec(old_logprobs), vec(ref_logprobs),
        vec(behavior_logprobs), tuple(float(value) for value in scalars),
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
def _load_scalar(scalars_ptr, slot_index: tl.constexpr):
    """One loss scalar as a one-element block, which broadcasts against the rows' blocks. A true scalar would do
    on the GPU, but Triton's interpreter (3.7) mistypes a comparison of scalars as fp32, and ``block & (scalar >
    0)`` then fails there."""
    return tl.load(scalars_ptr + slot_index + tl.arange(0, 1))


@triton.jit
def load_token_loss(rows, row_ok, lp, ent, adv_ptr, w_ptr, expert_ptr, old_ptr, ref_ptr, beh_ptr, has_old,
                    scalars_ptr):
    """Loads the token inputs of ``rows`` and the loss scalars; returns ``(w_t l_t, w_t dl_t/dlp_t, w_t dl_t/dH_t)``
    for the aggregation weights ``w_t``, the first two exactly 0 where ``w_t = 0`` (a masked token's inputs and
    log-prob may be NaN or inf: 0 * NaN would be NaN)."""
    eps_low = _load_scalar(scalars_ptr, EPS_LOW)
    eps_high = _load_scalar(scalars_ptr, EPS_HIGH)
    dual_clip = _load_scalar(scalars_ptr, DUAL_CLIP)
    beta = _load_scalar(scalars_ptr, BETA)
    kl_kind = _load_scalar(scalars_ptr, KL_KIND)
    entropy_coef = _load_scalar(scalars_ptr, ENTROPY_COEF)
    expert_mode = _load_scalar(scalars_ptr, EXPERT_MODE)
    shaping_gamma = _load_scalar(scalars_ptr, SHAPING_GAMMA)
    is_cap = _load_scalar(scalars_ptr, IS_CAP)
    tis_cap = _load_scalar(scalars_ptr, TIS_CAP)
    log_ratio_clamp = _load_scalar(scalars_ptr, LOG_RATIO_CLAMP)
    kl_clamp = _load_scalar(scalars_ptr, KL_CLAMP)
    policy_loss = _load_scalar(scalars_ptr, POLICY_LOSS)
    cispo_cap = _load_scalar(scalars_ptr, CISPO_CAP)
    sapo_temperature_pos = _load_scalar(scalars_ptr, SAPO_TEMPERATURE_POS)
    sapo_temperature_neg = _load_scalar(scalars_ptr, SAPO_TEMPERATURE_NEG)
    kl_bias_correction = _load_scalar(scalars_ptr, KL_BIAS_CORRECTION)
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
    return tl.where(active, w * loss, 0.0), tl.where(active, w * d_lp, 0.0), -w * entropy_coef


def _check_every_scalar_is_read() -> None:
    """A loss scalar added to the table must be read by the kernels (or listed in HOST_SCALARS) before they run."""
    read = {name for name in LOSS_SCALARS if name.upper() in load_token_loss.fn.__code__.co_names}
    problems = []
    unhandled = [name for name in LOSS_SCALARS if name not in read and name not in HOST_SCALARS]
    if unhandled:
        problems.append(f"{unhandled} are in the table but load_token_loss reads no slot constant of theirs (define "
                        "NAME = tl.constexpr(slot('name')), the name upper-cased, and read it in load_token_loss)")
    unknown = [name for name in HOST_SCALARS if name not in LOSS_SCALARS]
    if unknown:
        problems.append(f"HOST_SCALARS {unknown} are not in the table (remove them)")
    twice = sorted(read & set(HOST_SCALARS))
    if twice:
        problems.append(f"{twice} are read both on the host (HOST_SCALARS) and by load_token_loss (keep one)")
    misplaced = sorted(name for name in read if globals()[name.upper()].value != slot(name))
    if misplaced:
        problems.append(f"the slot constants of {misplaced} differ from their slots in the table (define them as "
                        "tl.constexpr(slot(name)))")
    if problems:
        raise ImportError("kernels/triton/token_loss.py and the table of ekipl_kernels.loss_scalars disagree: "
                          + "; ".join(problems))


_check_every_scalar_is_read()
