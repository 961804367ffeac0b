"""The ``ekipl::`` operator schemas shared by the C++ CPU op and the Triton CUDA kernels.

One schema per op, defined here once; the C++ library registers its CPU implementation
(``TORCH_LIBRARY_IMPL(ekipl, CPU, m)``) and the Triton backend its CUDA one, so that a call dispatches by
device and ``torch.compile`` sees an opaque op with a known output shape (the fake implementations).

The loss ops take the per-token vectors of :class:`~ekipl_kernels.inputs.TokenInputs` and the config as
scalars (:func:`config_scalars`): ``dual_clip``, ``is_cap``, ``tis_cap``, ``log_ratio_clamp`` and
``kl_clamp`` are 0 when off, ``kl_kind`` is 1/2/3 for k1/k2/k3, ``expert_mode`` is 0 ratio, 1 is,
2 shaped, ``policy_loss`` 0 clip, 1 cispo, 2 sapo. The linear ops take the LM head's ``bias [V]`` (None: none) last, the loss op its gradient
``grad_bias`` (column sums of the logit gradient). Outputs that were not asked for are empty.

How to compute, as decided by the caller (``KernelOptions``): ``schedule`` of the loss (an index into
:data:`SCHEDULES`), ``path`` of the log-probs (an index into ``options.LOGPROBS_PATHS``), and ``scratch_bytes``,
the budget of the buffer of logits (0: the implementation's default). The CPU op has one way of each and
reads only ``scratch_bytes``.
"""

from __future__ import annotations

import torch

from .config import EXPERT_MODES, POLICY_LOSSES, LossConfig

SCHEDULES = ("rows", "vocab")

_TOKEN_ARGS = (
    "Tensor advantages, Tensor agg_weight, Tensor is_expert, Tensor? old_logprobs, Tensor? ref_logprobs, "
    "Tensor? behavior_logprobs, float eps_low, float eps_high, float dual_clip, float beta, int kl_kind, "
    "float temperature, float entropy_coef, int expert_mode, float shaping_gamma, float is_cap, float tis_cap, "
    "float log_ratio_clamp, float kl_clamp, int policy_loss, float cispo_cap, float sapo_temperature_pos, "
    "float sapo_temperature_neg, bool kl_bias_correction, bool need_entropy"
)

LIB = torch.library.Library("ekipl", "DEF")
LIB.define(
    f"fused_linear_grpo_loss(Tensor hidden, Tensor weight, Tensor targets, {_TOKEN_ARGS}, bool grad_hidden, "
    "bool grad_weight, int schedule=0, int scratch_bytes=0, Tensor? bias=None, bool grad_bias=False) "
    "-> (Tensor loss, Tensor logprobs, Tensor entropy, Tensor grad_hidden, Tensor grad_weight, Tensor grad_bias)"
)
LIB.define(
    f"grpo_loss(Tensor logits, Tensor targets, {_TOKEN_ARGS}, bool grad_logits) "
    "-> (Tensor loss, Tensor logprobs, Tensor entropy, Tensor grad_logits)"
)
LIB.define(
    "fused_linear_logprobs(Tensor hidden, Tensor weight, Tensor targets, float temperature, bool need_entropy, "
    "int path=0, int scratch_bytes=0, Tensor? bias=None) -> (Tensor logprobs, Tensor entropy)"
)


def config_scalars(config: LossConfig) -> dict:
    """The loss config as the ops' scalar arguments."""
    return dict(
        eps_low=config.eps_low,
        eps_high=config.eps_high,
        dual_clip=config.dual_clip or 0.0,
        beta=config.beta,
        kl_kind=int(config.kl[1]),
        temperature=config.temperature,
        entropy_coef=config.entropy_coef,
        expert_mode=EXPERT_MODES.index(config.expert_mode),
        shaping_gamma=config.shaping_gamma,
        is_cap=config.is_cap or 0.0,
        tis_cap=config.tis_cap or 0.0,
        log_ratio_clamp=config.log_ratio_clamp or 0.0,
        kl_clamp=config.kl_clamp or 0.0,
        policy_loss=POLICY_LOSSES.index(config.policy_loss),
        cispo_cap=config.cispo_cap,
        sapo_temperature_pos=config.sapo_temperature_pos,
        sapo_temperature_neg=config.sapo_temperature_neg,
        kl_bias_correction=config.kl_bias_correction,
    )


def _vector(like: torch.Tensor, n: int, wanted: bool) -> torch.Tensor:
    return like.new_empty(n if wanted else 0, dtype=torch.float32)


@torch.library.register_fake("ekipl::fused_linear_grpo_loss")
def _(hidden, weight, targets, advantages, agg_weight, is_expert, old_logprobs, ref_logprobs, behavior_logprobs,
      eps_low, eps_high, dual_clip, beta, kl_kind, temperature, entropy_coef, expert_mode, shaping_gamma, is_cap,
      tis_cap, log_ratio_clamp, kl_clamp, policy_loss, cispo_cap, sapo_temperature_pos, sapo_temperature_neg,
      kl_bias_correction, need_entropy, grad_hidden, grad_weight, schedule=0, scratch_bytes=0,
      bias=None, grad_bias=False):
    n = hidden.shape[0]
    return (
        hidden.new_empty((), dtype=torch.float32),
        _vector(hidden, n, True),
        _vector(hidden, n, need_entropy),
        torch.empty_like(hidden) if grad_hidden else hidden.new_empty(0),
        torch.empty_like(weight) if grad_weight else weight.new_empty(0),
        weight.new_empty(weight.shape[0] if grad_bias and bias is not None else 0),
    )


@torch.library.register_fake("ekipl::grpo_loss")
def _(logits, targets, advantages, agg_weight, is_expert, old_logprobs, ref_logprobs, behavior_logprobs, eps_low,
      eps_high, dual_clip, beta, kl_kind, temperature, entropy_coef, expert_mode, shaping_gamma, is_cap, tis_cap,
      log_ratio_clamp, kl_clamp, policy_loss, cispo_cap, sapo_temperature_pos, sapo_temperature_neg, kl_bias_correction,
      need_entropy, grad_logits):
    n = logits.shape[0]
    return (
        logits.new_empty((), dtype=torch.float32),
        _vector(logits, n, True),
        _vector(logits, n, need_entropy),
        torch.empty_like(logits) if grad_logits else logits.new_empty(0),
    )


@torch.library.register_fake("ekipl::fused_linear_logprobs")
def _(hidden, weight, targets, temperature, need_entropy, path=0, scratch_bytes=0, bias=None):
    n = hidden.shape[0]
    return _vector(hidden, n, True), _vector(hidden, n, need_entropy)
