"""The public loss functions: validation, backend dispatch, autograd and statistics.

Nothing here waits for the device on the way to the kernels: statistics stay device tensors, and the
checks that read input values back run on CPU tensors or with ``KernelOptions.debug_checks``.
"""

from __future__ import annotations

from typing import Optional, Union

import torch

from . import reference, sequence_level
from .backends import load_backend, resolve_backend
from .config import LossConfig, LossOutput
from .inputs import check_logits_inputs, check_matrix_inputs, prepare_token_inputs, values_checked
from .options import KernelOptions

Normalizer = Union[float, torch.Tensor, None]


class _PrecomputedGradLoss(torch.autograd.Function):
    """A scalar loss whose input gradients were formed during the forward (never recomputed)."""

    @staticmethod
    def forward(ctx, loss, grad_a, grad_b, grad_c, input_a, input_b, input_c):  # noqa: D401 - autograd signature
        ctx.save_for_backward(grad_a, grad_b, grad_c)
        return loss.clone()

    @staticmethod
    def backward(ctx, grad_output):
        grads = ctx.saved_tensors
        if not torch.compiler.is_compiling() and bool(grad_output == 1):
            # The usual loss.backward(): hand the gradients over as they are; scaling them by 1 would
            # copy a [V, H] weight gradient at the peak of the step.
            return None, None, None, None, *grads
        scale = lambda g: None if g is None else g * grad_output.to(g.dtype)  # noqa: E731
        return None, None, None, None, *(scale(g) for g in grads)


def fused_linear_grpo_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    advantages: torch.Tensor,
    cu_seqlens: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    origin: Optional[torch.Tensor] = None,
    old_logprobs: Optional[torch.Tensor] = None,
    ref_logprobs: Optional[torch.Tensor] = None,
    behavior_logprobs: Optional[torch.Tensor] = None,
    loss_mask: Optional[torch.Tensor] = None,
    normalizer: Normalizer = None,
    config: LossConfig = LossConfig(),
    advantage_level: Optional[str] = None,
    return_entropy: bool = False,
    backend: Optional[str] = None,
    options: Optional[KernelOptions] = None,
) -> LossOutput:
    """GRPO loss over mixed-origin packed sequences, straight from hidden states and the LM head.

    ``hidden [N, H]`` and ``weight [V, H]`` share a dtype (fp32, bf16, fp16); ``targets [N]`` int64; ``bias [V]``
    (the LM head's bias, same dtype, or None): ``logits = hidden @ weight.T + bias``, differentiable in it too;
    ``cu_seqlens [S+1]`` (0 ... N); ``advantages [S]`` or ``[N]``, read per sequence or per token by
    ``advantage_level`` ("sequence" or "token"; None: by the shape, which raises when S == N and some
    sequence is empty, the one case where the readings differ); ``origin [N]`` (0 policy, e > 0 expert e);
    ``old/ref/behavior_logprobs [N]`` fp32; ``loss_mask [N]``: tokens where it is 0 add exactly nothing
    to the loss and its gradients, whatever their inputs hold; ``normalizer`` (finite, > 0) replaces the
    token count of token-mean, the sequence count of the seq-mean modes (pass the global count so that
    data-parallel ranks and micro-batches agree). The ``[N, V]`` logits are never materialised.
    ``return_entropy``: fill ``LossOutput.entropy`` and ``stats["entropy_mean"]`` even when
    ``config.entropy_coef == 0`` (for logging; detached, the loss and its gradients unchanged). The fused pass
    forms the entropy beside the log-sum-exp, so asking costs one more sum per logit, no extra pass.
    ``backend`` (a name) wins over ``options.backend``; ``options`` (:class:`KernelOptions`, environment
    variables override it) say how, never what.
    """
    options = _with_env(options)
    values = values_checked(hidden.device, options.debug_checks)
    check_matrix_inputs(hidden, weight, targets, bias, values=values)
    name = resolve_backend(backend or options.backend, hidden.device, hidden.dtype)
    keywords = dict(
        advantages=advantages, cu_seqlens=cu_seqlens, origin=origin, old_logprobs=old_logprobs,
        ref_logprobs=ref_logprobs, behavior_logprobs=behavior_logprobs, loss_mask=loss_mask, normalizer=normalizer,
        config=config, advantage_level=advantage_level,
    )
    if name == "reference":
        return reference.fused_linear_grpo_loss(hidden, weight, targets, bias=bias, return_entropy=return_entropy,
                                                **keywords)
    tok = prepare_token_inputs(hidden.shape[0], hidden.device, **keywords, check_values=values)
    grad_on = torch.is_grad_enabled()
    need_entropy = return_entropy or config.entropy_coef != 0
    kernels = load_backend(name)
    flags = dict(bias=bias, need_entropy=need_entropy, grad_hidden=grad_on and hidden.requires_grad,
                 grad_weight=grad_on and weight.requires_grad,
                 grad_bias=grad_on and bias is not None and bias.requires_grad, options=options)
    if config.ratio_level == "sequence":
        result = sequence_level.linear_loss(kernels, hidden, weight, targets, tok, config, **flags)
    else:
        result = kernels.linear_loss(hidden, weight, targets, tok, config, **flags)
    loss = _PrecomputedGradLoss.apply(
        result.loss, result.grad_input, result.grad_weight, result.grad_bias, hidden, weight, bias
    )
    stats = reference.statistics(result.logprobs, result.entropy, tok, config)
    return LossOutput(loss, result.logprobs, result.entropy, stats)


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
    normalizer: Normalizer = None,
    config: LossConfig = LossConfig(),
    advantage_level: Optional[str] = None,
    return_entropy: bool = False,
    backend: Optional[str] = None,
    options: Optional[KernelOptions] = None,
) -> LossOutput:
    """The same loss for callers that already hold ``[N, V]`` logits (differentiable w.r.t. ``logits``)."""
    options = _with_env(options)
    values = values_checked(logits.device, options.debug_checks)
    check_logits_inputs(logits, targets, values=values)
    name = resolve_backend(backend or options.backend, logits.device, logits.dtype)
    keywords = dict(
        advantages=advantages, cu_seqlens=cu_seqlens, origin=origin, old_logprobs=old_logprobs,
        ref_logprobs=ref_logprobs, behavior_logprobs=behavior_logprobs, loss_mask=loss_mask, normalizer=normalizer,
        config=config, advantage_level=advantage_level,
    )
    if name == "reference":
        return reference.grpo_loss(logits, targets, return_entropy=return_entropy, **keywords)
    tok = prepare_token_inputs(logits.shape[0], logits.device, **keywords, check_values=values)
    need_entropy = return_entropy or config.entropy_coef != 0
    kernels = load_backend(name)
    flags = dict(need_entropy=need_entropy, grad_logits=torch.is_grad_enabled() and logits.requires_grad)
    if config.ratio_level == "sequence":
        result = sequence_level.logits_loss(kernels, logits, targets, tok, config, **flags)
    else:
        result = kernels.logits_loss(logits, targets, tok, config, **flags)
    loss = _PrecomputedGradLoss.apply(result.loss, result.grad_input, None, None, logits, None, None)
    stats = reference.statistics(result.logprobs, result.entropy, tok, config)
    return LossOutput(loss, result.logprobs, result.entropy, stats)


def fused_linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: Optional[torch.Tensor] = None,
    temperature: float = 1.0,
    return_entropy: bool = False,
    backend: Optional[str] = None,
    options: Optional[KernelOptions] = None,
):
    """fp32 ``[N]`` log-probs of ``targets`` (and entropies) under ``softmax((hidden @ weight.T + bias) / T)``.

    For the old-policy and reference passes: no gradient, no ``[N, V]`` tensor kept.
    """
    options = _with_env(options)
    check_matrix_inputs(hidden, weight, targets, bias, values=values_checked(hidden.device, options.debug_checks))
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0; got {temperature}")
    name = resolve_backend(backend or options.backend, hidden.device, hidden.dtype)
    if name == "reference":
        return reference.fused_linear_logprobs(
            hidden, weight, targets, bias=bias, temperature=temperature, return_entropy=return_entropy
        )
    with torch.no_grad():
        lp, entropy = load_backend(name).linear_logprobs(
            hidden.detach(), weight.detach(), targets, float(temperature), return_entropy, options,
            bias=None if bias is None else bias.detach(),
        )
    return (lp, entropy) if return_entropy else lp


_DEFAULT_OPTIONS = KernelOptions()


def _with_env(options: Optional[KernelOptions]) -> KernelOptions:
    if options is None:
        options = _DEFAULT_OPTIONS
    elif not isinstance(options, KernelOptions):
        raise ValueError(f"options must be an ekipl_kernels.KernelOptions; got {type(options).__name__}")
    return options.with_env()
