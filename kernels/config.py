"""Typed configuration and result of the fused GRPO loss."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

KL_ESTIMATORS = ("k1", "k2", "k3")
EXPERT_MODES = ("ratio", "is", "shaped")
AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")


@dataclass(frozen=True)
class LossConfig:
    """Every knob of the loss; the math is in DESIGN.md, "The loss (normative)".

    eps_low, eps_high: PPO clip range ``[1 - eps_low, 1 + eps_high]`` of the ratio (DAPO's clip-higher
        when ``eps_high > eps_low``).
    dual_clip: ``c > 1`` caps the loss of negative-advantage tokens at ``-c * A``; None disables it.
    beta: weight of the KL penalty to the reference policy (needs ``ref_logprobs`` when > 0).
    kl: KL estimator of ``d = ref - lp``: "k1" (``-d``), "k2" (``d^2/2``), "k3" (``exp(d) - d - 1``).
    temperature: logits are divided by it before the softmax (match the sampler's temperature).
    entropy_coef: weight ``alpha`` of the entropy bonus (the loss subtracts ``alpha * H``).
    expert_mode: how expert tokens (origin > 0) enter the surrogate: "ratio" (the paper: the same
        clipped ratio to the old policy as policy tokens), "is" (ratio to the expert's own log-probs,
        ``behavior_logprobs``), "shaped" (LUFFY: ``-A p / (p + shaping_gamma)``, no clip).
    shaping_gamma: the gamma of "shaped".
    tis_cap: truncated importance weight ``min(exp(old - behavior), tis_cap)`` on policy tokens, for the
        mismatch between rollout engine and trainer; needs ``behavior_logprobs``. None disables it.
    agg: "token-mean" (mean over all unmasked tokens), "seq-mean-token-mean" (mean over sequences of each
        sequence's token mean), "seq-mean-token-sum-norm" (Dr. GRPO: token sum / (S * max_len)).
    max_len: the constant L of "seq-mean-token-sum-norm".
    """

    eps_low: float = 0.2
    eps_high: float = 0.2
    dual_clip: Optional[float] = None
    beta: float = 0.0
    kl: str = "k3"
    temperature: float = 1.0
    entropy_coef: float = 0.0
    expert_mode: str = "ratio"
    shaping_gamma: float = 0.1
    tis_cap: Optional[float] = None
    agg: str = "token-mean"
    max_len: Optional[int] = None

    def __post_init__(self) -> None:
        def bad(name: str, why: str) -> ValueError:
            return ValueError(f"LossConfig.{name}={getattr(self, name)!r} is invalid: {why}")

        if not 0.0 <= self.eps_low < 1.0:
            raise bad("eps_low", "expected 0 <= eps_low < 1")
        if not self.eps_high >= 0.0:
            raise bad("eps_high", "expected eps_high >= 0")
        if self.dual_clip is not None and not self.dual_clip > 1.0:
            raise bad("dual_clip", "expected None or a value > 1")
        if not self.beta >= 0.0:
            raise bad("beta", "expected beta >= 0")
        if self.kl not in KL_ESTIMATORS:
            raise bad("kl", f"expected one of {KL_ESTIMATORS}")
        if not self.temperature > 0.0:
            raise bad("temperature", "expected temperature > 0")
        if self.expert_mode not in EXPERT_MODES:
            raise bad("expert_mode", f"expected one of {EXPERT_MODES}")
        if not self.shaping_gamma > 0.0:
            raise bad("shaping_gamma", "expected shaping_gamma > 0")
        if self.tis_cap is not None and not self.tis_cap > 0.0:
            raise bad("tis_cap", "expected None or a value > 0")
        if self.agg not in AGGREGATIONS:
            raise bad("agg", f"expected one of {AGGREGATIONS}")
        if self.agg == "seq-mean-token-sum-norm" and (self.max_len is None or self.max_len <= 0):
            raise bad("max_len", "agg='seq-mean-token-sum-norm' needs max_len, a positive int (the L of Dr. GRPO)")
        if self.max_len is not None and self.max_len <= 0:
            raise bad("max_len", "expected None or a positive int")

    @property
    def needs_ref(self) -> bool:
        return self.beta > 0.0

    @property
    def needs_behavior(self) -> bool:
        return self.expert_mode == "is" or self.tis_cap is not None


@dataclass
class LossOutput:
    """What the loss returns.

    loss: 0-dim fp32, differentiable with respect to ``hidden`` and ``weight`` (or ``logits``) only.
    logprobs: ``[N]`` fp32 log-probs of the targets at the configured temperature, detached.
    entropy: ``[N]`` fp32 entropies, detached; None unless ``entropy_coef != 0``.
    stats: ``clip_frac``, ``ratio_mean``, ``kl_mean`` (beta > 0), ``entropy_mean`` (when computed),
        ``tokens_policy``, ``tokens_expert``; means are over unmasked tokens.
    """

    loss: torch.Tensor
    logprobs: torch.Tensor
    entropy: Optional[torch.Tensor]
    stats: dict[str, float] = field(default_factory=dict)
