"""Turning selected sequences into the packed loss layout and the model's padded inputs.

Each training sequence is a prompt followed by one completion. A step's sequences are packed once into a
columnar :class:`PackedBatch`: the completion tokens in the ``[N]`` layout of ``fused_linear_grpo_loss``
(sequence ``s`` owns tokens ``cu_seqlens[s]:cu_seqlens[s+1]``), on the learner's device, where the learner
also writes the old and reference log-probs. Mini- and micro-batches are slices of it (views of its columns);
only the padded ``[B, T]`` model inputs are built per micro-batch (:meth:`PackedBatch.micro_batch`), since
their padding depends on the slice.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, replace
from typing import Optional, Sequence

import torch

from .data import Prompt
from .models import batch_multimodal_inputs


@dataclass
class TrainSequence:
    """One selected answer with everything the update needs.

    behavior_logprobs: the generator's log-prob of each completion token; None when it gave none, NaN for a
    token it gave none for (the prefix of a guided answer whose expert returned text).
    """

    prompt: Prompt
    completion_ids: list[int]
    origins: list[int]
    advantage: float
    behavior_logprobs: Optional[list[float]] = None

    @property
    def num_tokens(self) -> int:
        return len(self.completion_ids)


@dataclass
class MicroBatch:
    """What one forward takes: the padded model inputs of a slice of a :class:`PackedBatch`, and views of its
    loss columns."""

    input_ids: torch.Tensor  # [B, T]
    attention_mask: torch.Tensor  # [B, T]
    mm_inputs: dict[str, torch.Tensor]
    hidden_index: torch.Tensor  # [N] flat positions in [B*T] whose hidden state predicts each target
    targets: torch.Tensor  # [N]
    cu_seqlens: torch.Tensor  # [B+1]
    advantages: torch.Tensor  # [B]
    origin: torch.Tensor  # [N]
    old_logprobs: Optional[torch.Tensor]  # [N] fp32, or None
    ref_logprobs: Optional[torch.Tensor]  # [N] fp32, or None
    behavior_logprobs: torch.Tensor  # [N] fp32 (see PackedBatch.behavior_logprobs)
    loss_mask: Optional[torch.Tensor] = None  # [N]; zeros in a placeholder, None (all tokens count) otherwise


@dataclass
class PackedBatch:
    """A step's sequences packed column by column, made once per step (:func:`pack_sequences`).

    Every tensor lives on one device (the learner's). ``batch[a:b]`` is sequences ``a..b-1``: views of the
    token columns ``cu_seqlens[a]:cu_seqlens[b]`` (``cu_seqlens`` rebased to 0), so what is written into a
    slice lands in the batch. ``old_logprobs`` and ``ref_logprobs`` are None until the learner fills them
    (:meth:`ekipl.learner.Learner.fill_logprobs`). ``behavior_logprobs`` holds the generator's log-probs where
    ``behavior_mask`` is True, and 0 where it gave none (the learner falls back to the old log-probs there).
    """

    sequences: list[TrainSequence]
    pad_id: int
    offsets: tuple[int, ...]  # [S+1] the host copy of cu_seqlens, for slicing without reading the device
    cu_seqlens: torch.Tensor  # [S+1] long
    targets: torch.Tensor  # [N] long
    origin: torch.Tensor  # [N] long: 0 policy, e expert e
    advantages: torch.Tensor  # [S] fp32
    behavior_logprobs: torch.Tensor  # [N] fp32
    behavior_mask: torch.Tensor  # [N] bool: True where the generator gave a log-prob
    old_logprobs: Optional[torch.Tensor] = None  # [N] fp32
    ref_logprobs: Optional[torch.Tensor] = None  # [N] fp32

    @property
    def num_sequences(self) -> int:
        return len(self.sequences)

    @property
    def num_tokens(self) -> int:
        return self.offsets[-1]

    @property
    def device(self) -> torch.device:
        return self.targets.device

    def tokens(self, start: int, stop: int) -> slice:
        """The token range of sequences ``start..stop-1``."""
        return slice(self.offsets[start], self.offsets[stop])

    def __getitem__(self, index: slice) -> "PackedBatch":
        if not isinstance(index, slice) or index.step not in (None, 1):
            raise TypeError(f"a PackedBatch is sliced by a range of sequences (batch[a:b]); got {index!r}")
        start, stop, _ = index.indices(self.num_sequences)
        stop = max(start, stop)
        tokens = self.tokens(start, stop)
        base = self.offsets[start]

        def column(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
            return None if t is None else t[tokens]

        return PackedBatch(
            sequences=self.sequences[start:stop], pad_id=self.pad_id,
            offsets=tuple(o - base for o in self.offsets[start : stop + 1]),
            cu_seqlens=self.cu_seqlens[start : stop + 1] - base, targets=self.targets[tokens],
            origin=self.origin[tokens], advantages=self.advantages[start:stop],
            behavior_logprobs=self.behavior_logprobs[tokens], behavior_mask=self.behavior_mask[tokens],
            old_logprobs=column(self.old_logprobs), ref_logprobs=column(self.ref_logprobs),
        )

    def micro_batch(self) -> MicroBatch:
        """All of this batch (usually a slice) as one forward: its sequences padded on the right to ``[B, T]``."""
        seqs = self.sequences
        width = max(len(s.prompt.input_ids) + s.num_tokens for s in seqs)
        input_ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(seqs), width), dtype=torch.long)
        hidden_index = []
        for row, seq in enumerate(seqs):
            ids = list(seq.prompt.input_ids) + list(seq.completion_ids)
            input_ids[row, : len(ids)] = torch.tensor(ids)
            attention_mask[row, : len(ids)] = 1
            start = len(seq.prompt.input_ids) - 1  # the hidden state at p-1 predicts token p
            hidden_index.append(torch.arange(start, start + seq.num_tokens) + row * width)
        device = self.device
        return MicroBatch(
            input_ids=input_ids.to(device),
            attention_mask=attention_mask.to(device),
            mm_inputs=batch_multimodal_inputs([s.prompt for s in seqs], device),
            hidden_index=torch.cat(hidden_index).to(device),
            targets=self.targets, cu_seqlens=self.cu_seqlens, advantages=self.advantages, origin=self.origin,
            old_logprobs=self.old_logprobs, ref_logprobs=self.ref_logprobs, behavior_logprobs=self.behavior_logprobs,
        )


def pack_sequences(seqs: Sequence[TrainSequence], pad_id: int, device: torch.device) -> PackedBatch:
    """``seqs`` as one :class:`PackedBatch` on ``device`` (one host-to-device copy per column)."""
    nan = float("nan")
    offsets = tuple(itertools.accumulate((s.num_tokens for s in seqs), initial=0))
    behavior = torch.tensor(
        [x for s in seqs for x in (s.behavior_logprobs if s.behavior_logprobs is not None else [nan] * s.num_tokens)],
        dtype=torch.float32,
    )
    given = ~torch.isnan(behavior)
    return PackedBatch(
        sequences=list(seqs), pad_id=pad_id, offsets=offsets,
        cu_seqlens=torch.tensor(offsets, dtype=torch.long, device=device),
        targets=torch.tensor([t for s in seqs for t in s.completion_ids], dtype=torch.long, device=device),
        origin=torch.tensor([o for s in seqs for o in s.origins], dtype=torch.long, device=device),
        advantages=torch.tensor([s.advantage for s in seqs], dtype=torch.float32, device=device),
        behavior_logprobs=torch.where(given, behavior, 0.0).to(device),
        behavior_mask=given.to(device),
    )


def make_placeholder_micro_batch(template: TrainSequence, pad_id: int, device: torch.device) -> MicroBatch:
    """A micro-batch shaped like ``template`` whose loss and gradients are exactly zero (``loss_mask`` 0).

    A rank with less work than another runs these so that all ranks run the same forwards and backwards: under
    ZeRO-3 each one gathers parameters, a collective. Its log-probs are finite stand-ins, so that no NaN meets
    the mask.
    """
    stand_in = replace(template, advantage=0.0, behavior_logprobs=[0.0] * template.num_tokens)
    batch = pack_sequences([stand_in], pad_id, device)
    zeros = torch.zeros(template.num_tokens, dtype=torch.float32, device=device)
    batch.old_logprobs = batch.ref_logprobs = zeros
    mb = batch.micro_batch()
    mb.loss_mask = torch.zeros(template.num_tokens, dtype=torch.float32, device=device)
    return mb
