"""verl's vanilla PPO policy loss, computed from hidden states by the fused GRPO loss.

verl's policy-loss functions (``verl.trainer.ppo.core_algos``, registry ``register_policy_loss``) are
called as ``fn(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config,
rollout_is_weights) -> (pg_loss, pg_metrics)``, all tensors ``[B, T]`` over the response tokens.
:func:`compute_policy_loss_fused` keeps that signature and return value; only ``log_prob`` is replaced
by a :class:`FusedLogProbInputs`, the hidden states and LM-head weight that would have produced it::

    from verl.trainer.ppo.core_algos import register_policy_loss
    from ekipl_kernels.integrations.verl import compute_policy_loss_fused
    register_policy_loss("ekipl_fused")(compute_policy_loss_fused)  # actor.policy_loss.loss_mode=ekipl_fused

The actor then passes ``log_prob=FusedLogProbInputs(hidden_states, lm_head.weight, responses, ...)``
instead of running the LM head, and ``old_log_prob=None`` where it would pass ``log_prob.detach()``.
Because ``log_prob`` never exists as a differentiable tensor, the KL loss (``use_kl_loss``,
``kl_loss_coef``, ``kl_loss_type``) and the entropy bonus (``entropy_coeff``) that verl's actor adds
after the policy loss are folded into the returned loss, with the same aggregation: the actor must
not add them again.

The log-ratio is clamped to [-20, 20] before exp and the k3 KL to [-10, 10], as verl does (the
defaults of ``LossConfig.log_ratio_clamp`` and ``kl_clamp``). Difference from verl, by design: verl's
``seq-mean-token-mean`` adds 1e-8 to each sequence's token count; the fused loss divides exactly.
No verl import: this module reads ``config`` by attribute (verl's ``ActorConfig``, an OmegaConf
``DictConfig`` or any object with the same fields).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

from ..api import fused_linear_grpo_loss
from ..config import LossConfig, stats_as_floats
from ..inputs import normalizer_count

# verl's loss_agg_mode -> the LossConfig aggregation with the same per-token weights (normaliser: _aggregation).
AGGREGATION_OF_AGG_MODE = {
    "token-mean": "token-mean",
    "seq-mean-token-sum": "token-mean",  # sum over tokens / sequence count = token-mean with that normaliser
    "seq-mean-token-mean": "seq-mean-token-mean",
    "seq-mean-token-sum-norm": "seq-mean-token-sum-norm",
}
# verl's kl_loss_type -> LossConfig.kl (verl's "+" straight-through variants and "abs" have no equivalent)
KL_OF_KL_LOSS_TYPE = {"kl": "k1", "k1": "k1", "mse": "k2", "k2": "k2", "low_var_kl": "k3", "k3": "k3"}


@dataclass
class FusedLogProbInputs:
    """What the actor passes as ``log_prob``: the inputs of the LM head instead of its output.

    hidden_states: ``[B, T, H]``, position ``t`` the hidden state that predicts ``responses[:, t]``
        (the model's last hidden states shifted left by one, sliced to the response, as verl slices
        its log-probs).
    lm_head_weight: ``[V, H]``; cast to the dtype of ``hidden_states``.
    lm_head_bias: ``[V]`` when the LM head has a bias (its gradient flows like the weight's); cast likewise.
    responses: ``[B, T]`` token ids whose log-probs verl would compute.
    temperature: the rollout temperature (verl divides the logits by it).
    ref_log_prob: ``[B, T]`` reference log-probs; required when ``config.use_kl_loss``.
    origin: optional ``[B, T]`` (or ``[B]``) ints, 0 for policy tokens and e > 0 for tokens of expert e.
    behavior_log_prob: ``[B, T]`` the expert's own log-probs, for ``expert_mode="is"``.
    expert_mode, shaping_gamma, is_cap: ekipl's treatment of expert tokens (see :class:`LossConfig`).
    backend: ``backend`` of :func:`fused_linear_grpo_loss` (None: chosen by device).
    """

    hidden_states: torch.Tensor
    lm_head_weight: torch.Tensor
    responses: torch.Tensor
    temperature: float = 1.0
    ref_log_prob: Optional[torch.Tensor] = None
    origin: Optional[torch.Tensor] = None
    behavior_log_prob: Optional[torch.Tensor] = None
    expert_mode: str = "ratio"
    shaping_gamma: float = 0.1
    is_cap: Optional[float] = None
    backend: Optional[str] = None
    lm_head_bias: Optional[torch.Tensor] = None


def _setting(config: Any, name: str, default: Any = None) -> Any:
    value = config.get(name, default) if isinstance(config, dict) else getattr(config, name, default)
    return default if value is None else value


def loss_config_for(config: Any, loss_agg_mode: str, head: FusedLogProbInputs, response_length: int) -> LossConfig:
    """The :class:`LossConfig` of verl's actor ``config`` (clip, dual clip, KL loss, entropy bonus)."""
    if config is None:
        raise ValueError("config is required: pass verl's actor config (clip_ratio, clip_ratio_c, use_kl_loss, ...)")
    if loss_agg_mode not in AGGREGATION_OF_AGG_MODE:
        raise ValueError(f"loss_agg_mode={loss_agg_mode!r} is not one of verl's modes {sorted(AGGREGATION_OF_AGG_MODE)}")
    clip_ratio = _setting(config, "clip_ratio")
    if clip_ratio is None:
        raise ValueError("config.clip_ratio is required (verl's PPO clip epsilon)")
    beta, kl = 0.0, "k3"
    if _setting(config, "use_kl_loss", False):
        kl_type = _setting(config, "kl_loss_type", "low_var_kl")
        if kl_type not in KL_OF_KL_LOSS_TYPE:
            raise ValueError(
                f"config.kl_loss_type={kl_type!r} has no fused equivalent; use one of {sorted(KL_OF_KL_LOSS_TYPE)}"
            )
        beta, kl = float(_setting(config, "kl_loss_coef", 0.001)), KL_OF_KL_LOSS_TYPE[kl_type]
    batch_info = _setting(config, "global_batch_info", {})
    return LossConfig(
        eps_low=float(_setting(config, "clip_ratio_low", clip_ratio)),
        eps_high=float(_setting(config, "clip_ratio_high", clip_ratio)),
        dual_clip=float(_setting(config, "clip_ratio_c", 3.0)),
        beta=beta,
        kl=kl,
        temperature=head.temperature,
        entropy_coef=float(_setting(config, "entropy_coeff", 0.0)),
        expert_mode=head.expert_mode,
        shaping_gamma=head.shaping_gamma,
        is_cap=head.is_cap,
        log_ratio_clamp=20.0,  # verl's clamps of the log-ratio and of k3
        kl_clamp=10.0,
        agg=AGGREGATION_OF_AGG_MODE[loss_agg_mode],
        max_len=int(batch_info.get("loss_scale_factor") or response_length)
        if loss_agg_mode == "seq-mean-token-sum-norm" else None,
    )


def _normalizer(loss_agg_mode: str, mask: torch.Tensor, batch_info: dict) -> torch.Tensor:
    """The count verl's ``agg_loss`` divides by (``global_batch_info`` included), over its data-parallel size.

    A local count is at least 1 (the normaliser must be > 0): with nothing unmasked the loss is 0 anyway.
    """
    dp_size = batch_info.get("dp_size") or 1
    if loss_agg_mode == "token-mean":
        tokens = batch_info.get("batch_num_tokens")
        if tokens is None:
            tokens = normalizer_count("token-mean", None, mask).clamp(min=1)
        return torch.as_tensor(tokens, dtype=torch.float32, device=mask.device) / dp_size
    if loss_agg_mode in ("seq-mean-token-sum", "seq-mean-token-mean"):
        sequences = batch_info.get("global_batch_size")
        if sequences is None:  # verl leaves fully masked responses out of the count
            sequences = normalizer_count("seq-mean-token-mean", None, mask).clamp(min=1)
        return torch.as_tensor(sequences, dtype=torch.float32, device=mask.device) / dp_size
    return torch.ones((), device=mask.device)  # seq-mean-token-sum-norm: sum / loss_scale_factor only


def _check_layout(name: str, x: Optional[torch.Tensor], shape: torch.Size) -> None:
    if x is not None and (not isinstance(x, torch.Tensor) or x.shape != shape):
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{name} must have verl's response layout [B, T]={tuple(shape)}; got {got}")


def compute_policy_loss_fused(
    old_log_prob: Optional[torch.Tensor],
    log_prob: FusedLogProbInputs,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    loss_agg_mode: str = "token-mean",
    config: Any = None,
    rollout_is_weights: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """verl's vanilla policy loss plus its KL loss and entropy bonus, fused; returns ``(loss, pg_metrics)``.

    ``old_log_prob [B, T]`` (None: on-policy, ratio 1), ``advantages [B, T]``, ``response_mask [B, T]``,
    ``rollout_is_weights [B, T]`` (optional, multiplies the surrogate only, as in verl). ``pg_metrics``
    holds verl's ``actor/pg_clipfrac``, ``actor/ppo_kl``, ``actor/pg_clipfrac_lower`` and the fused
    loss's statistics under ``ekipl/<name>``.
    """
    head = log_prob
    if not isinstance(head, FusedLogProbInputs):
        raise ValueError(
            f"log_prob must be a FusedLogProbInputs (hidden states, LM-head weight, responses); got {type(head).__name__}"
        )
    if not isinstance(response_mask, torch.Tensor) or response_mask.dim() != 2:
        raise ValueError(f"response_mask must be a [B, T] tensor; got {getattr(response_mask, 'shape', response_mask)}")
    layout = response_mask.shape
    for name, x in (("old_log_prob", old_log_prob), ("advantages", advantages), ("responses", head.responses),
                    ("rollout_is_weights", rollout_is_weights), ("ref_log_prob", head.ref_log_prob),
                    ("behavior_log_prob", head.behavior_log_prob)):
        _check_layout(name, x, layout)
    hidden = head.hidden_states
    if not isinstance(hidden, torch.Tensor) or hidden.dim() != 3 or hidden.shape[:2] != layout:
        got = tuple(hidden.shape) if isinstance(hidden, torch.Tensor) else type(hidden).__name__
        raise ValueError(f"hidden_states must be [B, T, H] with [B, T]={tuple(layout)}; got {got}")

    loss_config = loss_config_for(config, loss_agg_mode, head, response_length=layout[1])
    if loss_config.beta > 0 and head.ref_log_prob is None:
        raise ValueError("config.use_kl_loss is set: pass the reference log-probs as FusedLogProbInputs.ref_log_prob")
    keep = response_mask.bool()
    # verl multiplies the clipped surrogate by the IS weights; it is positively homogeneous in A.
    weighted_advantages = advantages if rollout_is_weights is None else advantages * rollout_is_weights
    origin = head.origin
    if isinstance(origin, torch.Tensor) and origin.dim() == 1:
        origin = origin.unsqueeze(1).expand(layout)
    _check_layout("origin", origin, layout)
    packed = lambda x: None if x is None else x[keep]  # noqa: E731
    old = packed(old_log_prob)
    out = fused_linear_grpo_loss(
        hidden[keep],
        head.lm_head_weight.to(hidden.dtype),
        head.responses[keep],
        bias=None if head.lm_head_bias is None else head.lm_head_bias.to(hidden.dtype),
        advantages=weighted_advantages[keep].float(),
        cu_seqlens=torch.nn.functional.pad(keep.sum(-1).cumsum(0), (1, 0)),
        origin=packed(origin),
        old_logprobs=old,
        ref_logprobs=packed(head.ref_log_prob) if loss_config.beta > 0 else None,
        behavior_logprobs=packed(head.behavior_log_prob),
        normalizer=_normalizer(loss_agg_mode, response_mask, _setting(config, "global_batch_info", {})),
        config=loss_config,
        advantage_level="token",
        backend=head.backend,
    )
    metrics = _verl_metrics(out.logprobs, old, advantages[keep].float(), loss_config)
    metrics.update({f"ekipl/{name}": value for name, value in stats_as_floats(out.stats).items()})
    return out.loss, metrics


@torch.no_grad()
def _verl_metrics(lp, old, adv, config: LossConfig) -> dict[str, float]:
    """verl's vanilla-loss metrics over the unmasked tokens (0 when there are none)."""
    bound = config.log_ratio_clamp
    log_ratio = torch.zeros_like(lp) if old is None else (lp - old.float()).clamp(-bound, bound)
    ratio = torch.exp(log_ratio)
    surrogate = -adv * ratio
    clipped = -adv * ratio.clamp(1.0 - config.eps_low, 1.0 + config.eps_high)
    mean = lambda x: float(x.float().mean()) if x.numel() else 0.0  # noqa: E731
    return {
        "actor/pg_clipfrac": mean(clipped > surrogate),
        "actor/ppo_kl": mean(-log_ratio),
        "actor/pg_clipfrac_lower": mean((torch.maximum(surrogate, clipped) > -adv * config.dual_clip) & (adv < 0)),
    }
