"""Typed configuration and result of the fused GRPO loss."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Optional, get_type_hints

import torch

KL_ESTIMATORS = ("k1", "k2", "k3")
EXPERT_MODES = ("ratio", "is", "shaped")
POLICY_LOSSES = ("clip", "cispo", "sapo")
RATIO_LEVELS = ("token", "sequence")
TIS_LEVELS = ("token", "sequence")
AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")


def _is_finite_real(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class LossConfig:
    """Every knob of the loss; the math is in DESIGN.md, "The loss (normative)".

    eps_low, eps_high: PPO clip range ``[1 - eps_low, 1 + eps_high]`` of the ratio (DAPO's clip-higher
        when ``eps_high > eps_low``).
    policy_loss: the surrogate of policy tokens (and of expert tokens under expert_mode="ratio"), with
        ``rho = exp(lp - old)``:
        "clip" (PPO): ``max(-rho A, -clip(rho, 1 - eps_low, 1 + eps_high) A)``, optionally dual-clipped.
        "cispo" (MiniMax-M1, as TRL 1.16's loss_type="cispo"): ``-min(rho, cispo_cap) * A * lp`` with the weight
            ``min(rho, cispo_cap)`` not differentiated, so every token keeps a gradient ``-min(rho, cap) * A * dlp``.
        "sapo" (TRL 1.16's loss_type="sapo"): ``-sigmoid(t (rho - 1)) * 4 / t * A``, a soft gate instead of the
            clip, ``t = sapo_temperature_pos`` where ``A > 0``, else ``sapo_temperature_neg``.
        eps_low, eps_high and dual_clip belong to "clip" only.
    ratio_level: "token" (each token's own ratio) or "sequence" (GSPO, TRL's importance_sampling_level="sequence"):
        every token of a sequence takes ``rho = exp(mean over the sequence's unmasked tokens of (lp - old))``, the
        log-ratio clamp applied to that mean, its gradient reaching every token's lp. Every policy_loss,
        kl_bias_correction and expert_mode "ratio" or "shaped" (expert tokens enter their sequence's mean) take it;
        "is" is refused. Every backend runs it in two passes of its own kernels (the log-probs first, then the
        gradient through per-token coefficients; ``ekipl_kernels.sequence_level``).
    cispo_cap: the cap of CISPO's importance weight (TRL passes its epsilon_high; 5.0 is ScaleRL's value).
    sapo_temperature_pos, sapo_temperature_neg: SAPO's gate temperatures (TRL's defaults 1.0 and 1.05).
    dual_clip: ``c > 1`` caps the loss of negative-advantage tokens at ``-c * A``; None disables it.
    beta: weight of the KL penalty to the reference policy (needs ``ref_logprobs`` when > 0).
    kl: KL estimator of ``d = ref - lp``: "k1" (``-d``), "k2" (``d^2/2``), "k3" (``exp(d) - d - 1``).
    kl_bias_correction: the KL term becomes ``rho * kl`` with the token's ratio ``rho`` (to the behaviour log-probs
        for "is" expert tokens, to the old ones otherwise) differentiated, as TRL 1.16's use_bias_correction_kl
        (DeepSeek-V3.2): the gradient is then the unbiased reverse-KL gradient for off-policy samples. Its value
        is 1 on-policy, its gradient is not. ``stats['kl_mean']`` is the corrected term.
    temperature: logits are divided by it before the softmax (match the sampler's temperature).
    entropy_coef: weight ``alpha`` of the entropy bonus (the loss subtracts ``alpha * H``).
    expert_mode: how expert tokens (origin > 0) enter the surrogate:
        "ratio" (the paper's rule): the same clipped ratio to the old policy as policy tokens.
        "is": the unbiased importance-sampled estimator of the paper's Appendix A, ``pg = -rho * A`` with
            ``rho = exp(lp - behavior)`` (``behavior_logprobs``: the expert's own log-probs), not clipped
            (no PPO clip, no dual clip), gradient ``-rho * A * dlp``. ``is_cap`` bounds its variance.
        "shaped" (LUFFY): ``-A p / (p + shaping_gamma)``, ``p = exp(lp)``, no clip.
        Policy tokens always take the clipped ratio.
    shaping_gamma: the gamma of "shaped".
    is_cap: with expert_mode="is", the expert tokens' weight becomes ``min(rho, is_cap)``, a truncated
        importance weight: the loss is ``-min(rho, is_cap) * A`` and its gradient
        ``-min(rho, is_cap) * A * dlp``, so a capped token still pushes its log-prob up or down with weight
        ``is_cap`` (a cap that stopped the gradient would drop exactly the tokens it bounds). None: no cap.
    tis_cap: truncated importance weight ``min(exp(old - behavior), tis_cap)`` on policy tokens, for the
        mismatch between rollout engine and trainer; needs ``behavior_logprobs``. None disables it.
    tis_level: "token" (each policy token its own weight) or "sequence" (TRL's vLLM correction mode
        "sequence_truncate"): every policy token of a sequence takes ``min(exp(S), tis_cap)``, ``S`` the sum of
        ``old - behavior`` over the sequence's unmasked policy tokens. Needs tis_cap and ``old_logprobs``.
    log_ratio_clamp: the log-ratios that are exponentiated with a gradient (``lp - old``, ``lp - behavior``
        of "is", and k3's ``d = ref - lp``) are clamped to ``[-c, c]`` first, and carry no gradient where the
        clamp is active (``torch.clamp``), so that ``exp`` never overflows. 20 is verl's value. None: off.
    kl_clamp: the k3 estimate is clamped to ``[-c, c]`` (no gradient where active), verl's 10 by default;
        k1 and k2 have no exponential and are never clamped. None: off.
    agg: "token-mean" (mean over all unmasked tokens), "seq-mean-token-mean" (mean over sequences of each
        sequence's token mean), "seq-mean-token-sum-norm" (Dr. GRPO: token sum / (S * max_len)).
        Sequences without an unmasked token (empty completions) are not counted by "seq-mean-token-mean"
        (TRL and Liger count every completion: pass ``normalizer=B`` to do the same); they are counted in
        the S of "seq-mean-token-sum-norm". verl's mode of that name divides by ``max_len`` only, S times
        ours: pass ``normalizer=1`` to reproduce it (docs/integrations.md).
    max_len: the constant L of "seq-mean-token-sum-norm", an int.

    Every float must be finite; the clamps and caps are None (off) or > 0.
    """

    policy_loss: str = "clip"
    ratio_level: str = "token"
    eps_low: float = 0.2
    eps_high: float = 0.2
    cispo_cap: float = 5.0
    sapo_temperature_pos: float = 1.0
    sapo_temperature_neg: float = 1.05
    dual_clip: Optional[float] = None
    beta: float = 0.0
    kl: str = "k3"
    kl_bias_correction: bool = False
    temperature: float = 1.0
    entropy_coef: float = 0.0
    expert_mode: str = "ratio"
    shaping_gamma: float = 0.1
    is_cap: Optional[float] = None
    tis_cap: Optional[float] = None
    tis_level: str = "token"
    log_ratio_clamp: Optional[float] = 20.0
    kl_clamp: Optional[float] = 10.0
    agg: str = "token-mean"
    max_len: Optional[int] = None

    def __post_init__(self) -> None:
        def bad(name: str, why: str) -> ValueError:
            return ValueError(f"LossConfig.{name}={getattr(self, name)!r} is invalid: {why}")

        for name, optional in _FLOAT_FIELDS.items():
            value = getattr(self, name)
            if not (_is_finite_real(value) or optional and value is None):
                raise bad(name, "expected a finite number" + (" or None" if optional else ""))
        if not 0.0 <= self.eps_low < 1.0:
            raise bad("eps_low", "expected 0 <= eps_low < 1")
        if not self.eps_high >= 0.0:
            raise bad("eps_high", "expected eps_high >= 0")
        if self.policy_loss not in POLICY_LOSSES:
            raise bad("policy_loss", f"expected one of {POLICY_LOSSES}")
        if self.ratio_level not in RATIO_LEVELS:
            raise bad("ratio_level", f"expected one of {RATIO_LEVELS}")
        if self.ratio_level == "sequence" and self.expert_mode == "is":
            raise bad("ratio_level", "expert_mode='is' takes a per-token ratio to the behaviour log-probs")
        for name in ("cispo_cap", "sapo_temperature_pos", "sapo_temperature_neg"):
            if not getattr(self, name) > 0.0:
                raise bad(name, f"expected {name} > 0")
        if self.dual_clip is not None and not self.dual_clip > 1.0:
            raise bad("dual_clip", "expected None or a value > 1")
        if self.dual_clip is not None and self.policy_loss != "clip":
            raise bad("dual_clip", f"it clips policy_loss='clip'; policy_loss is {self.policy_loss!r}")
        if not isinstance(self.kl_bias_correction, bool):
            raise bad("kl_bias_correction", "expected a bool")
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
        for name in ("is_cap", "tis_cap", "log_ratio_clamp", "kl_clamp"):
            if getattr(self, name) is not None and not getattr(self, name) > 0.0:
                raise bad(name, "expected None or a value > 0")
        if self.tis_level not in TIS_LEVELS:
            raise bad("tis_level", f"expected one of {TIS_LEVELS}")
        if self.tis_level == "sequence" and self.tis_cap is None:
            raise bad("tis_level", "it sets the level of tis_cap's weight; set tis_cap too")
        if self.is_cap is not None and self.expert_mode != "is":
            raise bad("is_cap", f"it caps the ratio of expert_mode='is'; expert_mode is {self.expert_mode!r}")
        if self.agg not in AGGREGATIONS:
            raise bad("agg", f"expected one of {AGGREGATIONS}")
        integral = isinstance(self.max_len, numbers.Integral) and not isinstance(self.max_len, bool)
        if self.max_len is not None and not (integral and self.max_len > 0):
            raise bad("max_len", "expected None or a positive int")
        if self.agg == "seq-mean-token-sum-norm" and self.max_len is None:
            raise bad("max_len", "agg='seq-mean-token-sum-norm' needs max_len, a positive int (the L of Dr. GRPO)")

    @property
    def needs_ref(self) -> bool:
        return self.beta > 0.0

    @property
    def needs_behavior(self) -> bool:
        return self.expert_mode == "is" or self.tis_cap is not None


# name -> whether None is allowed, for every float knob (all of them must be finite).
_FLOAT_FIELDS = {
    name: hint == Optional[float]
    for name, hint in get_type_hints(LossConfig).items()
    if hint in (float, Optional[float])
}


@dataclass
class LossOutput:
    """What the loss returns.

    loss: 0-dim fp32, differentiable with respect to ``hidden`` and ``weight`` (or ``logits``) only.
    logprobs: ``[N]`` fp32 log-probs of the targets at the configured temperature, detached.
    entropy: ``[N]`` fp32 entropies, detached; None unless ``entropy_coef != 0`` or ``return_entropy=True``.
    stats: ``clip_frac``, ``ratio_mean``, ``kl_mean`` (beta > 0), ``entropy_mean`` (with ``entropy``),
        ``tokens_policy``, ``tokens_expert``; means are over unmasked tokens. 0-dim fp32 tensors on the
        inputs' device, so that the loss never waits for the device: accumulate them as tensors and read
        them once, e.g. with :func:`stats_as_floats`.
    """

    loss: torch.Tensor
    logprobs: torch.Tensor
    entropy: Optional[torch.Tensor]
    stats: dict[str, torch.Tensor] = field(default_factory=dict)


def stats_as_floats(stats: dict[str, torch.Tensor]) -> dict[str, float]:
    """``LossOutput.stats`` (or sums of them; plain numbers pass through) as Python floats, the tensors read from
    the device in one transfer."""
    tensors = [key for key, value in stats.items() if isinstance(value, torch.Tensor)]
    read = torch.stack([stats[key].float().reshape(()) for key in tensors]).tolist() if tensors else []
    values = dict(zip(tensors, read))
    return {key: values[key] if key in values else float(value) for key, value in stats.items()}
