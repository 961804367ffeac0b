"""Validation of the loss inputs and their reduction to per-token vectors.

Every backend consumes the same :class:`TokenInputs`: per-token advantages, per-token aggregation
weights (the mask and the normaliser folded in, so the loss is ``sum_t w_t * l_t``) and an expert flag.
Doing this once, in torch, keeps the aggregation rules in one place and the kernels purely per-token.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Optional, Union

import torch

from .config import AGGREGATIONS, LossConfig

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
ADVANTAGE_LEVELS = ("sequence", "token")


@dataclass
class TokenInputs:
    """Per-token inputs shared by every backend; all tensors are ``[N]`` on the input's device."""

    advantages: torch.Tensor  # fp32
    agg_weight: torch.Tensor  # fp32, w_t: loss = sum_t w_t * l_t
    mask: torch.Tensor  # fp32, m_t
    is_expert: torch.Tensor  # bool
    old_logprobs: Optional[torch.Tensor]  # fp32; None = ratio 1 (old = stop_grad(lp))
    ref_logprobs: Optional[torch.Tensor]  # fp32
    behavior_logprobs: Optional[torch.Tensor]  # fp32
    seq_start: Optional[torch.Tensor] = None  # int64, the position of the first token of each token's sequence

    def select(self, index: Union[slice, torch.Tensor]) -> "TokenInputs":
        """The inputs of the tokens ``index`` (a slice or an index tensor)."""
        return TokenInputs(**{f.name: None if getattr(self, f.name) is None else getattr(self, f.name)[index]
                              for f in fields(self)})


def _shape(t: torch.Tensor) -> str:
    return "[" + ", ".join(str(s) for s in t.shape) + "]"


def values_checked(device: torch.device, debug: bool) -> bool:
    """Whether the checks that read input values back from ``device`` run: always for CPU tensors, where that
    costs nothing; on an accelerator each read is a host sync in the training step, so only when ``debug``."""
    return (debug or device.type == "cpu") and not torch.compiler.is_compiling()


def check_matrix_inputs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                        bias: Optional[torch.Tensor] = None, values: bool = True) -> None:
    """Checks ``hidden [N, H]``, ``weight [V, H]``, ``bias [V]`` (or None) and ``targets [N]`` of the fused-linear
    entry points (the target ids themselves only with ``values``)."""
    if not isinstance(hidden, torch.Tensor) or hidden.dim() != 2:
        raise ValueError(f"hidden must be a 2-D tensor [N, H]; got {_describe(hidden)}")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError(f"weight must be a 2-D tensor [V, H] (the LM head); got {_describe(weight)}")
    if hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"hidden {_shape(hidden)} and weight {_shape(weight)} disagree on H: weight must be [V, {hidden.shape[1]}]"
        )
    if hidden.dtype not in FLOAT_DTYPES:
        raise ValueError(f"hidden must be fp32, bf16, fp16 (or fp64); got {hidden.dtype}")
    if weight.dtype != hidden.dtype:
        raise ValueError(f"weight dtype {weight.dtype} must equal hidden dtype {hidden.dtype}")
    if weight.device != hidden.device:
        raise ValueError(f"weight is on {weight.device} but hidden is on {hidden.device}; put both on one device")
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or bias.shape != (weight.shape[0],):
            raise ValueError(f"bias must be a tensor of shape [V]=[{weight.shape[0]}] (the LM head's); got {_describe(bias)}")
        if bias.dtype != weight.dtype or bias.device != weight.device:
            raise ValueError(f"bias ({bias.dtype} on {bias.device}) must match weight ({weight.dtype} on {weight.device})")
    check_targets(targets, hidden.shape[0], hidden.device, vocab=weight.shape[0], values=values)


def check_logits_inputs(logits: torch.Tensor, targets: torch.Tensor, values: bool = True) -> None:
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
        raise ValueError(f"logits must be a 2-D tensor [N, V]; got {_describe(logits)}")
    if logits.dtype not in FLOAT_DTYPES:
        raise ValueError(f"logits must be fp32, bf16, fp16 (or fp64); got {logits.dtype}")
    check_targets(targets, logits.shape[0], logits.device, vocab=logits.shape[1], values=values)


def check_targets(targets: torch.Tensor, n: int, device: torch.device, vocab: int, values: bool = True) -> None:
    if not isinstance(targets, torch.Tensor) or targets.shape != (n,):
        raise ValueError(f"targets must be a tensor of shape [{n}] (one token id per row); got {_describe(targets)}")
    if targets.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"targets must be int64 (or int32) token ids; got {targets.dtype}")
    if targets.device != device:
        raise ValueError(f"targets is on {targets.device}; expected {device}")
    if n and values and not torch.compiler.is_compiling():
        lo, hi = int(targets.min()), int(targets.max())
        if lo < 0 or hi >= vocab:
            raise ValueError(f"targets must lie in [0, {vocab}); got values in [{lo}, {hi}]")


def _describe(x: object) -> str:
    if isinstance(x, torch.Tensor):
        return f"{_shape(x)} {x.dtype} on {x.device}"
    return type(x).__name__


def _per_token(name: str, x: Optional[torch.Tensor], n: int, device: torch.device) -> Optional[torch.Tensor]:
    if x is None:
        return None
    if not isinstance(x, torch.Tensor) or x.shape != (n,):
        raise ValueError(f"{name} must be a tensor of shape [{n}] (one value per token); got {_describe(x)}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating tensor (fp32 log-probs); got {x.dtype}")
    if x.device != device:
        raise ValueError(f"{name} is on {x.device}; expected {device}")
    return x.detach().float()


def prepare_token_inputs(
    n: int,
    device: torch.device,
    *,
    advantages: torch.Tensor,
    cu_seqlens: torch.Tensor,
    origin: Optional[torch.Tensor] = None,
    old_logprobs: Optional[torch.Tensor] = None,
    ref_logprobs: Optional[torch.Tensor] = None,
    behavior_logprobs: Optional[torch.Tensor] = None,
    loss_mask: Optional[torch.Tensor] = None,
    normalizer: Union[float, torch.Tensor, None] = None,
    config: LossConfig,
    advantage_level: Optional[str] = None,
    check_values: bool = True,
) -> TokenInputs:
    """Validates the keyword inputs and reduces them to per-token vectors (see :class:`TokenInputs`).

    Shapes, dtypes and devices are always checked; the values of tensors (``cu_seqlens`` bounds and order,
    ``origin >= 0``, a tensor ``normalizer``) only with ``check_values`` (see :func:`values_checked`)."""
    if not isinstance(config, LossConfig):
        raise ValueError(f"config must be an ekipl_kernels.LossConfig; got {type(config).__name__}")
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens must be a 1-D tensor [S+1] with S >= 1; got {_describe(cu_seqlens)}")
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"cu_seqlens must be int32 or int64; got {cu_seqlens.dtype}")
    if cu_seqlens.device != device:
        raise ValueError(f"cu_seqlens is on {cu_seqlens.device}; expected {device}")
    cu = cu_seqlens.long()
    lengths = cu[1:] - cu[:-1]
    if check_values and not torch.compiler.is_compiling():
        if int(cu[0]) != 0 or int(cu[-1]) != n:
            raise ValueError(f"cu_seqlens must start at 0 and end at N={n}; got {cu[0].item()} ... {cu[-1].item()}")
        if bool((lengths < 0).any()):
            raise ValueError("cu_seqlens must be non-decreasing (sequence s owns tokens cu_seqlens[s]:cu_seqlens[s+1])")
    num_seqs = lengths.numel()
    seq_index = torch.repeat_interleave(torch.arange(num_seqs, device=device), lengths, output_size=n)

    adv = _advantages_per_token(advantages, advantage_level, lengths, seq_index, n, device)

    if origin is None:
        is_expert = torch.zeros(n, dtype=torch.bool, device=device)
    else:
        if not isinstance(origin, torch.Tensor) or origin.shape != (n,) or origin.is_floating_point():
            raise ValueError(f"origin must be an integer tensor of shape [{n}] (0 policy, e>0 expert e); got {_describe(origin)}")
        if origin.device != device:
            raise ValueError(f"origin is on {origin.device}; expected {device}")
        if n and check_values and not torch.compiler.is_compiling() and int(origin.min()) < 0:
            raise ValueError(f"origin must be >= 0 (0 policy, e>0 expert e); got {int(origin.min())}")
        is_expert = origin > 0

    if loss_mask is None:
        mask = torch.ones(n, dtype=torch.float32, device=device)
    else:
        if not isinstance(loss_mask, torch.Tensor) or loss_mask.shape != (n,):
            raise ValueError(f"loss_mask must be a tensor of shape [{n}] (bool or float); got {_describe(loss_mask)}")
        if loss_mask.device != device:
            raise ValueError(f"loss_mask is on {loss_mask.device}; expected {device}")
        mask = loss_mask.detach().float()

    old = _per_token("old_logprobs", old_logprobs, n, device)
    ref = _per_token("ref_logprobs", ref_logprobs, n, device)
    beh = _per_token("behavior_logprobs", behavior_logprobs, n, device)
    if config.needs_ref and ref is None:
        raise ValueError(f"ref_logprobs [N]=[{n}] is required when beta > 0 (beta={config.beta})")
    if config.needs_behavior and beh is None:
        why = "expert_mode='is'" if config.expert_mode == "is" else f"tis_cap={config.tis_cap}"
        raise ValueError(f"behavior_logprobs [N]=[{n}] is required with {why}")

    if config.tis_level == "sequence":
        beh = _sequence_level_behavior(old, beh, mask, is_expert, seq_index, num_seqs)

    agg_weight = mask * _aggregation_scale(mask, seq_index, lengths, num_seqs, normalizer, config, check_values)
    return TokenInputs(adv, agg_weight, mask, is_expert, old, ref, beh, cu[:-1][seq_index])


def _sequence_level_behavior(old: Optional[torch.Tensor], beh: torch.Tensor, mask: torch.Tensor,
                             is_expert: torch.Tensor, seq_index: torch.Tensor, num_seqs: int) -> torch.Tensor:
    """Behaviour log-probs under which the per-token TIS weight ``min(exp(old - beh), cap)`` of every backend is the
    sequence's (LossConfig.tis_level="sequence"): a policy token's becomes ``old - S``, ``S`` the sum of ``old - beh``
    over its sequence's unmasked policy tokens; expert tokens keep theirs ("is" reads them)."""
    if old is None:
        raise ValueError("tis_level='sequence' needs old_logprobs [N]: the weight sums old - behavior over each "
                         "sequence (pass the trainer's log-probs of the sampled tokens, or use tis_level='token')")
    counted = (mask != 0) & ~is_expert
    log_ratio = torch.where(counted, old - beh, 0.0)  # masked tokens may hold NaN or inf: selected, not multiplied
    sums = log_ratio.new_zeros(num_seqs).index_add_(0, seq_index, log_ratio)
    return torch.where(is_expert, beh, old - sums[seq_index])


def _advantages_per_token(
    advantages: torch.Tensor,
    level: Optional[str],
    lengths: torch.Tensor,
    seq_index: torch.Tensor,
    n: int,
    device: torch.device,
) -> torch.Tensor:
    """``advantages`` ``[S]`` (per sequence) or ``[N]`` (per token) as fp32 ``[N]``.

    Without ``level`` the shape decides; when S == N both shapes match, and the readings agree only if
    every sequence holds one token (otherwise some sequence is empty): then the caller must say which.
    """
    num_seqs = lengths.numel()
    if level is not None and level not in ADVANTAGE_LEVELS:
        raise ValueError(f"advantage_level must be 'sequence', 'token' or None (from the shape); got {level!r}")
    if not isinstance(advantages, torch.Tensor) or advantages.dim() != 1 or (
        level is None and advantages.shape[0] not in (num_seqs, n)
    ):
        raise ValueError(
            f"advantages must have shape [S]=[{num_seqs}] (per sequence) or [N]=[{n}] (per token); "
            f"got {_describe(advantages)}"
        )
    if level is not None and advantages.shape[0] != (num_seqs if level == "sequence" else n):
        name, size = ("S", num_seqs) if level == "sequence" else ("N", n)
        raise ValueError(
            f"advantages must have shape [{name}]=[{size}] with advantage_level={level!r}; got {_shape(advantages)}"
        )
    if level is None and num_seqs == n and not torch.compiler.is_compiling() and bool((lengths != 1).any()):
        raise ValueError(
            f"advantages [{n}] is ambiguous: S = N = {n} but some sequences are empty, so per-sequence and "
            "per-token readings differ; pass advantage_level='sequence' or 'token'"
        )
    if advantages.device != device:
        raise ValueError(f"advantages is on {advantages.device}; expected {device}")
    adv = advantages.detach().float()
    per_sequence = level == "sequence" or (level is None and adv.shape[0] != n)
    return adv[seq_index] if per_sequence else adv


def _aggregation_scale(
    mask: torch.Tensor,
    seq_index: torch.Tensor,
    lengths: torch.Tensor,
    num_seqs: int,
    normalizer: Union[float, torch.Tensor, None],
    config: LossConfig,
    check_values: bool,
) -> torch.Tensor:
    """The per-token factor ``w_t / m_t`` of the chosen aggregation."""
    norm = None
    if normalizer is not None:
        norm = torch.as_tensor(normalizer, dtype=torch.float32, device=mask.device)
        if norm.dim() != 0:
            raise ValueError(f"normalizer must be a float or a 0-dim tensor; got shape {tuple(norm.shape)}")
        # A Python number is checked for free; a tensor's value only where reading it back is cheap or asked for.
        is_tensor = isinstance(normalizer, torch.Tensor)
        if (check_values or not is_tensor) and not torch.compiler.is_compiling():
            value = float(normalizer)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"normalizer must be a finite number > 0 (a token or sequence count); "
                                 f"got {value if is_tensor else normalizer!r}")
    per_seq = torch.zeros(num_seqs, dtype=torch.float32, device=mask.device).index_add_(0, seq_index, mask)
    denom = _count(config.agg, per_seq) if norm is None else norm
    if config.agg == "token-mean":
        return _safe_inverse(denom).expand_as(mask)
    if config.agg == "seq-mean-token-mean":
        return (_safe_inverse(per_seq) * _safe_inverse(denom))[seq_index]
    return _safe_inverse(denom * config.max_len).expand_as(mask)


def _count(agg: str, per_seq: torch.Tensor) -> torch.Tensor:
    """The default normaliser of ``agg`` from each sequence's unmasked weight."""
    if agg == "token-mean":
        return per_seq.sum()
    if agg == "seq-mean-token-mean":
        # A sequence with no unmasked token carries no data: it neither contributes nor counts.
        return (per_seq > 0).sum().float()
    return torch.tensor(float(per_seq.numel()), device=per_seq.device)


def normalizer_count(
    config: Union[LossConfig, str], cu_seqlens: Optional[torch.Tensor], loss_mask: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """The count that the aggregation of ``config`` (or an aggregation name) divides by when no ``normalizer`` is
    given: unmasked tokens ("token-mean"), sequences with an unmasked token ("seq-mean-token-mean"), sequences
    ("seq-mean-token-sum-norm"). 0-dim fp32 on the inputs' device, nothing read back.

    To make micro-batches and data-parallel ranks agree, sum it over the micro-batches of a step and all-reduce
    it over ranks, then pass the total as ``normalizer`` (at least 1: with nothing unmasked the loss is 0 anyway).
    Packed: ``cu_seqlens [S+1]`` and ``loss_mask [N]`` as for the loss (None: every token). Padded:
    ``cu_seqlens=None`` and ``loss_mask [B, T]``, one sequence a row.
    """
    agg = config.agg if isinstance(config, LossConfig) else config
    if agg not in AGGREGATIONS:
        raise ValueError(f"aggregation must be one of {AGGREGATIONS}; got {agg!r}")
    if cu_seqlens is None:
        if loss_mask is None or loss_mask.dim() != 2:
            raise ValueError("normalizer_count: without cu_seqlens, loss_mask must be a padded [B, T] mask")
        per_seq = loss_mask.detach().float().sum(-1)
    elif loss_mask is None:
        per_seq = cu_seqlens.diff().float()
    else:  # segment sums through a running sum: no per-token sequence index, no length read back
        cu = cu_seqlens.long()
        running = torch.nn.functional.pad(loss_mask.detach().double().cumsum(0), (1, 0))
        per_seq = (running[cu[1:]] - running[cu[:-1]]).float()
    return _count(agg, per_seq)


def _safe_inverse(x: torch.Tensor) -> torch.Tensor:
    """1/x, and 0 where x == 0 (an all-masked batch gives a zero loss, never NaN)."""
    x = x.float()
    return torch.where(x != 0, 1.0 / torch.where(x != 0, x, torch.ones_like(x)), torch.zeros_like(x))
