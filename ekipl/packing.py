"""Turning selected sequences into model inputs and the packed loss layout.

Each training sequence is a prompt followed by one completion. A micro-batch pads them on the right to
``[B, T]`` for the model; the completion tokens are then gathered into the packed ``[N]`` layout of
``fused_linear_grpo_loss`` (sequence ``s`` owns tokens ``cu_seqlens[s]:cu_seqlens[s+1]``).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Optional, Sequence

import torch

from .data import Prompt
from .models import batch_multimodal_inputs


@dataclass
class TrainSequence:
    """One selected answer with everything the update needs."""

    prompt: Prompt
    completion_ids: list[int]
    origins: list[int]
    advantage: float
    behavior_logprobs: Optional[list[float]] = None
    old_logprobs: Optional[torch.Tensor] = None  # filled by the learner, [len(completion_ids)] fp32
    ref_logprobs: Optional[torch.Tensor] = None

    @property
    def num_tokens(self) -> int:
        return len(self.completion_ids)


@dataclass
class MicroBatch:
    """Padded model inputs plus the packed loss inputs of a list of sequences."""

    input_ids: torch.Tensor  # [B, T]
    attention_mask: torch.Tensor  # [B, T]
    mm_inputs: dict[str, torch.Tensor]
    hidden_index: torch.Tensor  # [N] flat positions in [B*T] whose hidden state predicts each target
    targets: torch.Tensor  # [N]
    cu_seqlens: torch.Tensor  # [B+1]
    advantages: torch.Tensor  # [B]
    origin: torch.Tensor  # [N]
    behavior_logprobs: Optional[torch.Tensor]  # [N]; NaN where the generator gave none (the learner falls back to old)
    sequences: list[TrainSequence] = field(default_factory=list)
    loss_mask: Optional[torch.Tensor] = None  # [N]; zeros in a placeholder, None (all tokens count) otherwise

    def gather(self, name: str) -> Optional[torch.Tensor]:
        """Concatenates a per-sequence log-prob field (old/ref) into ``[N]``; None if any is missing."""
        parts = [getattr(s, name) for s in self.sequences]
        if any(p is None for p in parts):
            return None
        return torch.cat(parts).float()


def make_micro_batch(seqs: Sequence[TrainSequence], pad_id: int, device: torch.device) -> MicroBatch:
    lengths = [len(s.prompt.input_ids) + s.num_tokens for s in seqs]
    width = max(lengths)
    input_ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(seqs), width), dtype=torch.long)
    hidden_index, targets, origins, behavior = [], [], [], []
    has_behavior = any(s.behavior_logprobs is not None for s in seqs)
    for row, seq in enumerate(seqs):
        ids = list(seq.prompt.input_ids) + list(seq.completion_ids)
        input_ids[row, : len(ids)] = torch.tensor(ids)
        attention_mask[row, : len(ids)] = 1
        start = len(seq.prompt.input_ids) - 1  # the hidden state at p-1 predicts token p
        hidden_index.append(torch.arange(start, start + seq.num_tokens) + row * width)
        targets.extend(seq.completion_ids)
        origins.extend(seq.origins)
        if has_behavior:
            behavior.extend(seq.behavior_logprobs if seq.behavior_logprobs is not None else [float("nan")] * seq.num_tokens)
    counts = torch.tensor([0] + [s.num_tokens for s in seqs])
    return MicroBatch(
        input_ids=input_ids.to(device),
        attention_mask=attention_mask.to(device),
        mm_inputs=batch_multimodal_inputs([s.prompt for s in seqs], device),
        hidden_index=torch.cat(hidden_index).to(device),
        targets=torch.tensor(targets, dtype=torch.long, device=device),
        cu_seqlens=torch.cumsum(counts, 0).to(device),
        advantages=torch.tensor([s.advantage for s in seqs], dtype=torch.float32, device=device),
        origin=torch.tensor(origins, dtype=torch.long, device=device),
        behavior_logprobs=torch.tensor(behavior, dtype=torch.float32, device=device) if has_behavior else None,
        sequences=list(seqs),
    )


def make_placeholder_micro_batch(template: TrainSequence, pad_id: int, device: torch.device) -> MicroBatch:
    """A micro-batch shaped like ``template`` whose loss and gradients are exactly zero (``loss_mask`` 0).

    A rank with less work than another runs these so that all ranks run the same forwards and backwards: under
    ZeRO-3 each one gathers parameters, a collective. Its log-probs are finite stand-ins, so that no NaN meets
    the mask.
    """
    zeros = torch.zeros(template.num_tokens)
    stand_in = replace(template, advantage=0.0, behavior_logprobs=[0.0] * template.num_tokens, old_logprobs=zeros,
                       ref_logprobs=zeros)
    mb = make_micro_batch([stand_in], pad_id, device)
    mb.loss_mask = torch.zeros(template.num_tokens, dtype=torch.float32, device=device)
    return mb
