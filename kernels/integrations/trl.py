"""TRL's ``GRPOTrainer`` with its loss computed by :func:`ekipl_kernels.fused_linear_grpo_loss`.

Usage (TRL 1.16)::

    from ekipl_kernels.integrations.trl import FusedGRPOTrainer
    trainer = FusedGRPOTrainer(model=..., reward_funcs=..., args=GRPOConfig(loss_type="dapo", ...), ...)
    trainer.train()

Generation, rewards, advantages and the old/reference log-prob passes stay TRL's own. Only the loss
changes: the model runs to its last hidden states (no logits), and the completion positions are
packed into the fused loss together with the LM-head weight. Settings the fused loss cannot reproduce
exactly raise ``ValueError`` at construction rather than training a different objective.

Packing: only the tokens that carry loss (``completion_mask``, times ``tool_mask`` when present) are
kept, each completion a packed sequence, so prompt padding and completion padding cost no LM-head
FLOPs. Sequences whose tokens are all masked stay in ``cu_seqlens`` with length 0, and the
normaliser of each ``loss_type`` is passed explicitly so that such sequences count exactly as TRL
counts them.

This module is the only one in ``ekipl_kernels`` that imports ``trl``.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Optional

import torch
from accelerate.utils import is_peft_model
from torch.distributed.tensor import DTensor
from trl import GRPOConfig, GRPOTrainer
from trl.trainer.utils import maybe_gather_lm_head_ctx, nanmax, nanmin

from ..api import fused_linear_grpo_loss
from ..config import LossConfig, LossOutput
from ..inputs import normalizer_count

# TRL loss_type -> the LossConfig aggregation with the same per-token weights (normalisers in _normalizer).
AGGREGATION_OF_LOSS_TYPE = {
    "grpo": "seq-mean-token-mean",
    "bnpo": "token-mean",
    "dr_grpo": "seq-mean-token-sum-norm",
    "dapo": "token-mean",
    "cispo": "token-mean",
    "sapo": "seq-mean-token-mean",
}
# TRL loss_type -> LossConfig.policy_loss (the others clip).
POLICY_LOSS_OF_LOSS_TYPE = {"cispo": "cispo", "sapo": "sapo"}

# Batch keys TRL forwards to the model besides input_ids/attention_mask. In the loss pass TRL scores the
# whole micro-batch in one call, so every one of them goes to the model whole.
_MODEL_INPUT_KEYS = (
    "pixel_values", "image_grid_thw", "pixel_attention_mask", "spatial_shapes", "image_sizes",
    "token_type_ids", "mm_token_type_ids", "image_position_ids",
)

# Text-config attributes that rescale or softcap the logits; the fused loss computes W h / temperature only.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier", "logits_scaling")


def unsupported_grpo_settings(args: GRPOConfig) -> list[str]:
    """Every ``GRPOConfig`` setting the fused loss cannot reproduce, each with what to do about it."""
    problems = []
    if args.loss_type not in AGGREGATION_OF_LOSS_TYPE:
        problems.append(
            f"loss_type={args.loss_type!r}: the fused loss implements {sorted(AGGREGATION_OF_LOSS_TYPE)}; "
            "pick one of those or train with trl.GRPOTrainer"
        )
    if args.top_entropy_quantile < 1.0:
        problems.append(
            f"top_entropy_quantile={args.top_entropy_quantile}: masking tokens by the current policy's entropy needs "
            "that entropy before the loss runs; set top_entropy_quantile=1.0 or train with trl.GRPOTrainer"
        )
    if args.off_policy_mask_threshold is not None:
        problems.append(
            f"off_policy_mask_threshold={args.off_policy_mask_threshold}: the sequence mask needs the current "
            "log-probs before the loss runs; set it to None or train with trl.GRPOTrainer"
        )
    eps_high = args.epsilon_high if args.epsilon_high is not None else args.epsilon
    clipped = args.loss_type not in POLICY_LOSS_OF_LOSS_TYPE  # TRL's cispo and sapo ignore delta
    if clipped and args.delta is not None and not args.delta >= 1.0 + eps_high:
        # With delta >= 1 + epsilon_high, TRL's two-sided clip equals the dual clip min(pg, -delta*A) for A < 0.
        problems.append(
            f"delta={args.delta}: the fused loss maps delta onto its dual clip, which equals TRL's two-sided clip "
            f"only when delta >= 1 + epsilon_high = {1.0 + eps_high}; raise delta or set it to None"
        )
    if args.use_adaptive_entropy:
        problems.append(
            "use_adaptive_entropy=True: the adaptive entropy controller is not wired to the fused loss; set it to "
            "False (a fixed entropy_coef works with loss_type='bnpo') or train with trl.GRPOTrainer"
        )
    elif args.entropy_coef != 0.0 and args.loss_type != "bnpo":
        problems.append(
            f"entropy_coef={args.entropy_coef} with loss_type={args.loss_type!r}: TRL normalises the entropy bonus "
            "over the micro-batch's tokens whatever the loss_type, and the fused loss gives every term the same "
            "normaliser, so the two agree only for loss_type='bnpo'; use bnpo or set entropy_coef=0.0"
        )
    if args.loss_type == "dr_grpo" and not args.max_completion_length:
        problems.append("loss_type='dr_grpo' needs max_completion_length (the constant of Dr. GRPO's normaliser)")
    return problems


def _unsupported_model_settings(model: torch.nn.Module, aux_loss_enabled: bool) -> list[str]:
    problems = []
    text_config = model.config.get_text_config()
    for name in _LOGIT_TRANSFORMS:
        value = getattr(text_config, name, None)
        if value is not None and value != 1:
            problems.append(
                f"model config {name}={value}: the fused loss computes plain W h / temperature logits; "
                "train this model with trl.GRPOTrainer"
            )
    if model.get_output_embeddings() is None:
        problems.append("the model has no LM head (get_output_embeddings() is None): the fused loss needs its weight")
    if aux_loss_enabled:
        problems.append(
            "the MoE router load-balancing loss is enabled: set router_aux_loss_coef=0.0 or train with trl.GRPOTrainer"
        )
    return problems


def loss_config_for(args: GRPOConfig, *, expert_mode: str = "ratio", shaping_gamma: float = 0.1,
                    is_cap: Optional[float] = None) -> LossConfig:
    """The :class:`LossConfig` equivalent to a (supported) ``GRPOConfig``."""
    eps_high = args.epsilon_high if args.epsilon_high is not None else args.epsilon
    policy_loss = POLICY_LOSS_OF_LOSS_TYPE.get(args.loss_type, "clip")
    return LossConfig(
        policy_loss=policy_loss,
        eps_low=args.epsilon,
        eps_high=eps_high,
        cispo_cap=eps_high if policy_loss == "cispo" else LossConfig.cispo_cap,  # TRL caps CISPO at epsilon_high
        sapo_temperature_pos=args.sapo_temperature_pos,
        sapo_temperature_neg=args.sapo_temperature_neg,
        dual_clip=args.delta if policy_loss == "clip" else None,  # TRL's cispo and sapo ignore delta
        beta=args.beta,
        kl="k3",
        kl_bias_correction=args.use_bias_correction_kl,
        ratio_level=args.importance_sampling_level,
        temperature=args.temperature,
        entropy_coef=args.entropy_coef,
        expert_mode=expert_mode,
        shaping_gamma=shaping_gamma,
        is_cap=is_cap,
        log_ratio_clamp=None,  # TRL exponentiates its log-ratios unclamped
        kl_clamp=None,
        agg=AGGREGATION_OF_LOSS_TYPE[args.loss_type],
        max_len=args.max_completion_length if args.loss_type == "dr_grpo" else None,
    )


def _raise_if_any(problems: list[str]) -> None:
    if problems:
        raise ValueError(
            "FusedGRPOTrainer cannot reproduce TRL's loss with these settings:\n  - " + "\n  - ".join(problems)
        )


def _install_hidden_state_forward(model: torch.nn.Module) -> None:
    """Lets ``model(..., ekipl_loss=fn)`` run the backbone and return ``fn(last_hidden_state, lm_head_weight,
    lm_head_bias)`` (the bias None when the head has none).

    The loss runs inside the model's forward, as TRL's own fused head does, so that DDP, DeepSpeed
    (ZeRO-3 gathers the head for the call) and FSDP see an ordinary forward. Without ``ekipl_loss`` the
    forward is the one TRL installed, so generation and the old/reference passes are untouched.
    """
    previous_forward = model.forward

    @functools.wraps(previous_forward)  # keep the signature generate() inspects
    def forward(*args, ekipl_loss: Optional[Callable[..., Any]] = None, **kwargs):
        if ekipl_loss is None:
            return previous_forward(*args, **kwargs)
        kwargs["use_cache"] = False
        hidden = model.base_model(*args, **kwargs).last_hidden_state
        head = model.get_output_embeddings()
        weight, bias = head.weight, getattr(head, "bias", None)
        with maybe_gather_lm_head_ctx(weight, bias):
            if isinstance(weight, DTensor):  # FSDP2 shards the head
                weight = weight.full_tensor()
            if isinstance(bias, DTensor):
                bias = bias.full_tensor()
            return ekipl_loss(hidden.to(weight.device), weight, bias)

    model.forward = forward


class FusedGRPOTrainer(GRPOTrainer):
    """``trl.GRPOTrainer`` (1.16) whose loss is ekipl's fused linear GRPO loss.

    Takes GRPOTrainer's arguments, plus:

    loss_backend: ``backend`` of :func:`fused_linear_grpo_loss` (None: chosen by device).
    expert_mode, shaping_gamma, is_cap: ekipl's treatment of expert tokens (see :class:`LossConfig`).
        Expert tokens are marked by an optional ``inputs["origin"]`` (``[B]`` or ``[B, T]``, 0 policy,
        e > 0 expert e) that a subclass's ``_generate_and_score_completions`` adds; ``expert_mode="is"``
        also reads ``inputs["behavior_per_token_logps"]`` (``[B, T]``, the expert's own log-probs).

    Mapping (TRL name -> LossConfig): epsilon -> eps_low, epsilon_high -> eps_high (and cispo_cap for cispo),
    delta -> dual_clip (clipping loss types), beta -> beta with the k3 KL, use_bias_correction_kl ->
    kl_bias_correction, sapo_temperature_pos/neg -> the same, temperature -> temperature, entropy_coef ->
    entropy_coef (bnpo only), loss_type -> policy_loss ("cispo", "sapo", else "clip") and agg and normalizer
    (grpo, sapo: seq-mean over all B completions; bnpo: local token mean; dr_grpo: token sum /
    (B * max_completion_length); dapo, cispo: token sum / TRL's global token count), each divided by the
    gradient-accumulation steps exactly where TRL divides. TRL's vLLM importance weights multiply the surrogate
    only, so they are folded into per-token advantages (every surrogate is positively homogeneous in A, and
    SAPO's temperature follows the sign of A, which a positive weight keeps).
    """

    def __init__(
        self,
        model,
        reward_funcs=None,
        args: Optional[GRPOConfig] = None,
        *trainer_args,
        loss_backend: Optional[str] = None,
        expert_mode: str = "ratio",
        shaping_gamma: float = 0.1,
        is_cap: Optional[float] = None,
        **trainer_kwargs,
    ):
        expert = dict(expert_mode=expert_mode, shaping_gamma=shaping_gamma, is_cap=is_cap)
        if args is not None:  # fail before TRL loads models or starts vLLM
            _raise_if_any(unsupported_grpo_settings(args))
            loss_config_for(args, **expert)
        super().__init__(model, reward_funcs, args, *trainer_args, **trainer_kwargs)
        _raise_if_any(unsupported_grpo_settings(self.args))
        patched = self.model.get_base_model() if is_peft_model(self.model) else self.model
        _raise_if_any(_unsupported_model_settings(patched, self.aux_loss_enabled))
        self.fused_loss_config = loss_config_for(self.args, **expert)
        self.loss_backend = loss_backend
        _install_hidden_state_forward(patched)

    def _normalizer(self, inputs: dict, mask: torch.Tensor, train: bool) -> torch.Tensor:
        """The count that replaces the local one of ``fused_loss_config.agg`` (see LossConfig), as TRL divides."""
        accumulation = self.current_gradient_accumulation_steps if train else 1
        batch_size = mask.shape[0]
        if self.loss_type in ("grpo", "sapo", "dr_grpo"):  # every completion counts, all-masked ones included
            return torch.tensor(float(batch_size * accumulation), device=mask.device)
        if self.loss_type == "bnpo":
            return normalizer_count("token-mean", None, mask).clamp(min=1.0) * accumulation
        # dapo, cispo: num_items_in_batch counts the generation batch's tokens over all processes
        normalizer = inputs["num_items_in_batch"].float().clamp(min=1.0) / self.accelerator.num_processes
        if train:
            normalizer = normalizer * accumulation / self.args.steps_per_generation
        return normalizer

    def _compute_loss(self, model, inputs):
        prompt_ids, prompt_mask = inputs["prompt_ids"], inputs["prompt_mask"]
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        logits_to_keep = completion_ids.size(1)
        mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]
        keep = mask.bool()
        cu_seqlens = torch.nn.functional.pad(keep.sum(-1).cumsum(0), (1, 0))
        train = self.model.training

        advantages = inputs["advantages"]
        advantages = advantages.unsqueeze(1) if advantages.dim() == 1 else advantages
        packed = lambda x: None if x is None else x.expand_as(mask)[keep]  # noqa: E731
        policy_advantages = packed(advantages).float()  # TRL's clip metrics read them before the vLLM weights
        if self.use_vllm and self.vllm_importance_sampling_correction:
            advantages = advantages * inputs["importance_sampling_ratio"]
        origin = inputs.get("origin")
        if origin is not None and origin.dim() == 1:
            origin = origin.unsqueeze(1)
        loss_inputs = dict(
            advantages=packed(advantages).float(),
            cu_seqlens=cu_seqlens,
            origin=packed(origin),
            old_logprobs=packed(inputs.get("old_per_token_logps")),
            ref_logprobs=packed(inputs.get("ref_per_token_logps")) if self.beta != 0.0 else None,
            behavior_logprobs=packed(inputs.get("behavior_per_token_logps")),
            normalizer=self._normalizer(inputs, mask, train),
            config=self.fused_loss_config,
            advantage_level="token",
            return_entropy=True,  # TRL logs it whatever entropy_coef
            backend=self.loss_backend,
        )
        targets = completion_ids[keep]
        cast_to_fp32 = self.args.cast_lm_head_to_fp32

        def fused_loss(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> LossOutput:
            # TRL scores the last logits_to_keep positions of last_hidden_state[:, :-1].
            hidden = hidden[:, -logits_to_keep - 1 : -1][keep]
            dtype = torch.float32 if cast_to_fp32 else hidden.dtype
            # The kernel picks its own precision: autocast must not recast its matmuls.
            with torch.autocast(hidden.device.type, enabled=False):
                return fused_linear_grpo_loss(hidden.to(dtype), weight.to(dtype), targets,
                                              bias=None if bias is None else bias.to(dtype), **loss_inputs)

        model_inputs = {"input_ids": torch.cat([prompt_ids, completion_ids], dim=1),
                        "attention_mask": torch.cat([prompt_mask, completion_mask], dim=1)}
        model_inputs.update({k: inputs[k] for k in _MODEL_INPUT_KEYS if inputs.get(k) is not None})
        with self.accelerator.autocast():
            output = model(**model_inputs, ekipl_loss=fused_loss)
        sequence_advantages = inputs["advantages"] if inputs["advantages"].dim() == 1 else None
        self._log_trl_metrics(output, loss_inputs, policy_advantages, sequence_advantages, cu_seqlens.diff(), train)
        return output.loss

    def _log_trl_metrics(self, output: LossOutput, loss_inputs: dict, advantages: torch.Tensor,
                         sequence_advantages: Optional[torch.Tensor], lengths: torch.Tensor, train: bool) -> None:
        """TRL 1.16's loss metrics with its definitions (``GRPOTrainer._compute_loss``), from the packed tokens:
        ``entropy``, ``kl`` and the ``clip_ratio/*`` means are token means over every process's tokens; a token is
        low-clipped when its ratio is under ``1 - epsilon`` with a negative advantage, high-clipped when over
        ``1 + epsilon_high`` with a positive one (dual-clipped tokens are not counted apart);
        ``clip_ratio/low_min`` and ``high_max`` are the extremes of the completions' own means (empty completions
        left out); ``policy_loss`` and ``entropy_coef`` when the entropy bonus is on. With
        importance_sampling_level="sequence" the ratio is the completion's, and with per-completion advantages the
        clip flags are one per completion, averaged over the completions, as TRL's ``[B, 1]`` flags are."""
        mode = "train" if train else "eval"
        metrics = self._metrics[mode]
        lp = output.logprobs
        count = torch.tensor(float(lp.numel()), device=lp.device)
        completions = lengths.numel()
        owner = torch.repeat_interleave(torch.arange(completions, device=lp.device), lengths)

        def global_mean(x: torch.Tensor, n: torch.Tensor = count) -> float:
            totals = self.accelerator.reduce(torch.stack([x.float().sum(), n]), reduction="sum")
            return (totals[0] / totals[1].clamp(min=1.0)).item()

        def completion_means(x: torch.Tensor) -> torch.Tensor:  # 0/0 = NaN for an empty completion, as in TRL
            return torch.zeros(completions, device=lp.device).index_add(0, owner, x.float()) / lengths

        old = loss_inputs["old_logprobs"]
        log_ratio = torch.zeros_like(lp) if old is None else lp - old
        flag_mean, flag_values = global_mean, completion_means
        if self.importance_sampling_level == "sequence":  # one ratio per completion, TRL's count clamped to 1
            completion_ratio = torch.exp(torch.zeros(completions, device=lp.device).index_add(0, owner, log_ratio)
                                         / lengths.clamp(min=1))
            ratio = completion_ratio[owner]
        else:
            ratio = torch.exp(log_ratio)
        flag_ratio, flag_advantages = ratio, advantages
        if self.importance_sampling_level == "sequence" and sequence_advantages is not None:
            # TRL's clip flags are then [B, 1]: means over the completions, empty ones included
            flag_ratio, flag_advantages = completion_ratio, sequence_advantages.to(lp.device)
            flag_mean = lambda x: global_mean(x, torch.tensor(float(completions), device=lp.device))  # noqa: E731
            flag_values = lambda x: x.float()  # noqa: E731
        if self.beta != 0.0:
            d = loss_inputs["ref_logprobs"] - lp
            kl = torch.exp(d) - d - 1
            metrics["kl"].append(global_mean(kl * ratio if self.args.use_bias_correction_kl else kl))
        metrics["entropy"].append(global_mean(output.entropy))
        if self.loss_type == "cispo":
            metrics["cispo_clip_ratio"].append(flag_mean((flag_ratio > self.epsilon_high) & (flag_advantages > 0)))
        if self.loss_type in ("cispo", "sapo"):  # TRL logs no PPO clip ratios for them
            return self._log_policy_loss(output, count, metrics, train)
        low = (flag_ratio < 1 - self.epsilon_low) & (flag_advantages < 0)
        high = (flag_ratio > 1 + self.epsilon_high) & (flag_advantages > 0)
        metrics["clip_ratio/low_mean"].append(flag_mean(low))
        metrics["clip_ratio/high_mean"].append(flag_mean(high))
        metrics["clip_ratio/region_mean"].append(flag_mean(low | high))
        metrics["clip_ratio/low_min"].append(nanmin(self.accelerator.gather(flag_values(low))).item())
        metrics["clip_ratio/high_max"].append(nanmax(self.accelerator.gather(flag_values(high))).item())
        self._log_policy_loss(output, count, metrics, train)

    def _log_policy_loss(self, output: LossOutput, count: torch.Tensor, metrics: dict, train: bool) -> None:
        if self._entropy_bonus_enabled:  # bnpo only (see unsupported_grpo_settings)
            # TRL's policy_loss is the loss before the entropy bonus and the accumulation division.
            accumulation = self.current_gradient_accumulation_steps if train else 1
            policy_loss = output.loss.detach() * accumulation + self.entropy_coef * output.entropy.sum() / count.clamp(min=1.0)
            metrics["policy_loss"].append(self.accelerator.gather(policy_loss).nanmean().item())
            if train and self.accelerator.sync_gradients:
                metrics["entropy_coef"].append(self.entropy_coef)
