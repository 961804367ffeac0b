"""The learner: a DeepSpeed engine over the policy, old/reference log-probs, and the EKIPL update.

The model runs to its last hidden states; ``fused_linear_grpo_loss`` turns them and the LM-head weight
into the loss and its gradients without materialising the logits. The loss is computed *inside* the LM
head module's call (:func:`_through_head`), so ZeRO-3 gathers that weight for the forward and again for
the backward, exactly as it would for the head's own forward.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import math
import time
import types
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn

from ekipl_kernels import KernelOptions, LossConfig, fused_linear_grpo_loss, fused_linear_logprobs, normalizer_count

from . import checkpoint
from .models import last_hidden_states
from .packing import MicroBatch, PackedBatch, TrainSequence, make_placeholder_micro_batch, pack_sequences


@dataclass(frozen=True)
class OptimConfig:
    """Optimiser, schedule and the shape of the update.

    lr, weight_decay, betas: AdamW (lr > 0, weight_decay >= 0, each beta in [0, 1)).
    warmup_steps: step ``s < warmup_steps`` trains at ``lr * (s + 1) / warmup_steps``.
    schedule: after the warm-up, "cosine" decays to ``min_lr_ratio * lr``, reached at the last step
    (``run.max_steps - 1``), or "constant" holds ``lr``. The schedule counts EKIPL steps (``run.max_steps``),
    not optimiser steps: it advances once per update, however many optimiser steps that update takes
    (``ppo_epochs`` x mini-batches, and the mini-batch count varies from step to step with group selection),
    so every optimiser step of one EKIPL step uses the same lr. min_lr_ratio: the floor of "cosine", as a
    share of ``lr`` (in [0, 1]). grad_clip: global norm (0 disables).
    ppo_epochs: passes over each rollout (Reason-RFT: 1, one update per rollout). mini_batch_size:
    sequences per optimiser step per rank (0 = the whole rollout). micro_batch_size: sequences per
    forward/backward (gradient accumulation up to the mini-batch). Ranks hold different numbers of
    sequences; every rank runs as many mini-batches, and micro-batches in each, as the rank with the most,
    padding with placeholder micro-batches that add nothing (see :meth:`Learner.update`). max_bad_steps:
    consecutive steps with a non-finite loss that are skipped before the run stops.
    """

    lr: float = 1e-6
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 0
    schedule: str = "cosine"
    min_lr_ratio: float = 0.0
    grad_clip: float = 1.0
    ppo_epochs: int = 1
    mini_batch_size: int = 0
    micro_batch_size: int = 4
    max_bad_steps: int = 3

    def __post_init__(self) -> None:
        if self.schedule not in ("cosine", "constant"):
            raise ValueError(f"optim.schedule={self.schedule!r} is invalid: expected 'cosine' or 'constant'")
        for key in ("ppo_epochs", "micro_batch_size", "max_bad_steps"):
            if getattr(self, key) < 1:
                raise ValueError(f"optim.{key}={getattr(self, key)} is invalid: expected >= 1")
        if self.mini_batch_size < 0:
            raise ValueError(f"optim.mini_batch_size={self.mini_batch_size} is invalid: expected >= 0")
        if self.warmup_steps < 0:
            raise ValueError(f"optim.warmup_steps={self.warmup_steps} is invalid: expected >= 0")
        # Written so that NaN fails every range test.
        if not 0.0 < self.lr < math.inf:
            raise ValueError(f"optim.lr={self.lr!r} is invalid: expected a finite number > 0")
        for key in ("weight_decay", "grad_clip"):
            if not 0.0 <= getattr(self, key) < math.inf:
                raise ValueError(f"optim.{key}={getattr(self, key)!r} is invalid: expected a finite number >= 0")
        if not all(0.0 <= beta < 1.0 for beta in self.betas):
            raise ValueError(f"optim.betas={tuple(self.betas)!r} is invalid: expected two values in [0, 1)")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"optim.min_lr_ratio={self.min_lr_ratio!r} is invalid: expected a value in [0, 1]")


class NonFiniteLossError(RuntimeError):
    """Raised after ``max_bad_steps`` consecutive updates with a NaN/Inf loss."""


class NonFiniteWeightsError(NonFiniteLossError):
    """Raised when an optimiser step leaves a NaN/Inf in the weights or the optimiser state."""


def _through_head(head: nn.Module, fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], hidden: torch.Tensor):
    """Calls ``fn(hidden, head.weight)`` as the head's forward, so module hooks (ZeRO-3 gathering) apply."""
    original = head.forward
    head.forward = types.MethodType(lambda module, h: fn(h, module.weight), head)
    try:
        return head(hidden)
    finally:
        head.forward = original


class PolicyLoss(nn.Module):
    """What the DeepSpeed engine wraps: the policy, with a forward that returns the fused loss.

    Going through ``engine(...)`` (not the bare module) lets DeepSpeed do its per-forward bookkeeping:
    ZeRO's micro-step counter, which decides whether a backward accumulates into or overwrites the
    gradient partitions, and its backward hooks on the output.
    """

    def __init__(self, policy: nn.Module) -> None:
        super().__init__()
        self.policy = policy

    def forward(self, batch: MicroBatch, loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
        hidden = completion_hidden_states(self.policy, batch)
        return _through_head(self.policy.get_output_embeddings(), loss_fn, hidden)


def completion_hidden_states(model: nn.Module, batch: MicroBatch) -> torch.Tensor:
    """The ``[N, H]`` last hidden states that predict the batch's completion tokens."""
    hidden = last_hidden_states(model, batch.input_ids, batch.attention_mask, **batch.mm_inputs)
    return hidden.reshape(-1, hidden.shape[-1])[batch.hidden_index]


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main_rank() -> bool:
    return world_size() == 1 or dist.get_rank() == 0


def all_reduce_sum(value: float, device: torch.device) -> float:
    if world_size() == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t.item())


def all_reduce_max(value: float, device: torch.device) -> float:
    if world_size() == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def all_gather_int(value: int, device: torch.device) -> list[int]:
    """``value`` of every rank, in rank order."""
    if world_size() == 1:
        return [value]
    t = torch.tensor([value], dtype=torch.int64, device=device)
    gathered = [torch.zeros_like(t) for _ in range(world_size())]
    dist.all_gather(gathered, t)
    return [int(g.item()) for g in gathered]


def lr_lambda(cfg: OptimConfig, max_steps: int) -> Callable[[int], float]:
    """``cfg``'s lr factor at EKIPL step ``step`` (see :class:`OptimConfig`).

    Written out rather than taken from transformers: its warm-up helpers train step 0 at lr 0, and its
    ``..._warmup_lr_rate`` cosine trains the last step at ``min_lr_ratio`` (0 by default); either wastes a whole
    step's rollout, and a one-step run would not train at all.
    """

    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.schedule == "constant":
            return 1.0
        progress = min((step - cfg.warmup_steps) / max(max_steps - cfg.warmup_steps, 1), 1.0)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


class StepSchedule:
    """The lr schedule, advanced once per EKIPL step by :meth:`Learner.update` (:meth:`advance`).

    DeepSpeed holds it so that its checkpoints save and restore it, and calls :meth:`step` after every
    optimiser step; an EKIPL step takes several of those (and a varying number), so :meth:`step` does nothing.
    """

    def __init__(self, scheduler: torch.optim.lr_scheduler.LRScheduler) -> None:
        self.scheduler = scheduler

    def step(self, *args, **kwargs) -> None:
        """DeepSpeed's per-optimiser-step call: the schedule does not move within an EKIPL step."""

    def advance(self) -> None:
        self.scheduler.step()

    def get_last_lr(self) -> list[float]:
        return self.scheduler.get_last_lr()

    def state_dict(self) -> dict:
        return self.scheduler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.scheduler.load_state_dict(state)


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _placeholder_template(seqs: Sequence[TrainSequence]) -> Optional[TrainSequence]:
    """The sequence placeholder micro-batches copy: one with completion tokens, so that they reach the LM head."""
    return next((s for s in seqs if s.num_tokens), seqs[0]) if seqs else None


class Learner:
    """Owns the DeepSpeed engine, the frozen reference model and the update.

    offload_reference: keep the reference model in host memory and bring it onto the learner's device only
    for its log-prob pass (:meth:`fill_logprobs`), then back; a reference handed over on another device than
    the learner's is treated the same way. expert_names: the experts' names in origin order (origin ``e`` is
    ``expert_names[e - 1]``), for warnings.
    """

    def __init__(
        self,
        policy: nn.Module,
        *,
        loss: LossConfig,
        optim: OptimConfig,
        ds_config: dict,
        max_steps: int,
        pad_id: int,
        reference: Optional[nn.Module] = None,
        offload_reference: bool = False,
        expert_names: Sequence[str] = (),
        kernel_options: KernelOptions = KernelOptions(),
    ) -> None:
        import deepspeed

        self.loss_cfg, self.optim_cfg, self.pad_id, self.kernel_options = loss, optim, pad_id, kernel_options
        self.expert_names = list(expert_names)
        if loss.beta > 0 and reference is None:
            # copied before DeepSpeed wraps the policy: ZeRO-3 partitions its weights in place
            reference = copy.deepcopy(policy).eval().requires_grad_(False)
        if reference is not None and offload_reference:
            reference = reference.to("cpu")
        self.reference = reference
        params = [p for p in policy.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=optim.lr, betas=optim.betas, weight_decay=optim.weight_decay)
        self.schedule = StepSchedule(torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(optim, max_steps)))
        self.engine, _, _, _ = deepspeed.initialize(
            model=PolicyLoss(policy), optimizer=optimizer, lr_scheduler=self.schedule,
            config=engine_config(ds_config, optim, next(policy.parameters()).dtype)
        )
        self.device = self.engine.device
        self.bad_steps = 0
        self._warned_without_behavior: set[str] = set()

    @property
    def model(self) -> nn.Module:
        """The policy itself (transformers names), inside the engine's wrapper."""
        return self.engine.module.policy

    # -- how the work is split --------------------------------------------------------------------------
    # Ranks hold different numbers of sequences (group selection, skipped prompts). Under ZeRO-3 every forward
    # and backward gathers parameters, a collective, and at every stage each optimiser step reduces gradients:
    # so every rank runs the same number of mini-batches, and of micro-batches in each, as the rank with the
    # most, padding with placeholder micro-batches whose loss and gradients are exactly zero. A short rank
    # would otherwise wait at the next collective anyway, so the padding costs no wall time.

    def _mini_batches(self, num_seqs: int, counts: Sequence[int]) -> tuple[list[slice], list[int]]:
        """This rank's mini-batches as ranges of its ``num_seqs`` sequences (some maybe empty), and the micro-batch
        count every rank runs in each."""
        def sizes(n: int) -> list[int]:
            size = self.optim_cfg.mini_batch_size or n
            return [min(size, n - start) for start in range(0, n, size)] if n else []

        per_rank = [sizes(n) for n in counts]
        num_mini = max(len(s) for s in per_rank)
        micro = self.optim_cfg.micro_batch_size
        micro_counts = [max(math.ceil(s[j] / micro) if j < len(s) else 0 for s in per_rank) for j in range(num_mini)]
        bounds = [0, *itertools.accumulate(sizes(num_seqs))]
        mine = [slice(a, b) for a, b in zip(bounds, bounds[1:])]
        return mine + [slice(num_seqs, num_seqs)] * (num_mini - len(mine)), micro_counts

    def _template(self, seqs: Sequence[TrainSequence], counts: Sequence[int]) -> Optional[TrainSequence]:
        """What this rank's placeholders copy. A rank without sequences borrows one from the first rank with some,
        so that its placeholders run the same modules (the vision tower included) as the others' micro-batches."""
        if min(counts) > 0 or max(counts) == 0:
            return _placeholder_template(seqs)
        box = [_placeholder_template(seqs)]
        dist.broadcast_object_list(box, src=next(r for r, n in enumerate(counts) if n), device=self.device)
        return _placeholder_template(seqs) or box[0]

    def needs_old_logprobs(self, batch: PackedBatch) -> bool:
        """Whether the update needs old log-probs, the same answer on every rank: not when it is one optimiser step
        (pi_old is then pi_theta, ratio 1), unless the loss reads behaviour log-probs (missing ones fall back to old)."""
        mini_batches, _ = self._mini_batches(batch.num_sequences, all_gather_int(batch.num_sequences, self.device))
        return self.optim_cfg.ppo_epochs > 1 or len(mini_batches) > 1 or self.loss_cfg.needs_behavior

    # -- log-probs -------------------------------------------------------------------------------------
    def pack(self, seqs: Sequence[TrainSequence]) -> PackedBatch:
        """A step's sequences as the batch that :meth:`fill_logprobs` and :meth:`update` take, on the learner's device."""
        return pack_sequences(seqs, self.pad_id, self.device)

    @torch.no_grad()
    def fill_logprobs(self, batch: PackedBatch, *, old: Optional[bool] = None) -> float:
        """Teacher-forced log-probs of every completion token into ``batch``: ``old_logprobs`` (the policy now)
        and/or ``ref_logprobs``, ``[N]`` fp32 on the learner's device.

        ``old``: None computes them when the update needs them (:meth:`needs_old_logprobs`); a rank asked for
        them computes them on every rank, so that all run the same passes.
        """
        start = time.perf_counter()
        old = self.needs_old_logprobs(batch) if old is None else old
        old = all_reduce_sum(float(old), self.device) > 0
        if not old and self.loss_cfg.beta <= 0:
            return time.perf_counter() - start
        counts = all_gather_int(batch.num_sequences, self.device)
        template = self._template(batch.sequences, counts)
        num_micro = max(math.ceil(n / self.optim_cfg.micro_batch_size) for n in counts)
        if old:
            batch.old_logprobs = self._logprobs_pass(self.model, batch, num_micro, template)
        if self.loss_cfg.beta > 0:
            batch.ref_logprobs = self._logprobs_pass(self.reference, batch, num_micro, template)
        return time.perf_counter() - start

    def _logprobs_pass(self, model: nn.Module, batch: PackedBatch, num_micro: int,
                       template: Optional[TrainSequence]) -> torch.Tensor:
        """``model``'s log-probs of ``batch``'s tokens, ``[N]`` fp32, over ``num_micro`` micro-batches (placeholders
        past this rank's own), each written into its slice."""
        out = torch.empty(batch.num_tokens, dtype=torch.float32, device=self.device)
        micro = self.optim_cfg.micro_batch_size
        starts = range(0, batch.num_sequences, micro)
        was_training = model.training
        model.eval()
        with self._on_learner_device(model):
            for index in range(num_micro):
                if index >= len(starts):
                    self._logprobs(model, make_placeholder_micro_batch(template, self.pad_id, self.device))
                    continue
                a, b = starts[index], min(starts[index] + micro, batch.num_sequences)
                out[batch.tokens(a, b)] = self._logprobs(model, batch[a:b].micro_batch())
        model.train(was_training)
        return out

    def _logprobs(self, model: nn.Module, mb: MicroBatch) -> torch.Tensor:
        hidden = completion_hidden_states(model, mb)
        return _through_head(
            model.get_output_embeddings(),
            lambda h, w: fused_linear_logprobs(h, w, mb.targets, temperature=self.loss_cfg.temperature,
                                               options=self.kernel_options),
            hidden,
        )

    @contextlib.contextmanager
    def _on_learner_device(self, model: nn.Module):
        """Runs ``model`` on the learner's device: a model kept elsewhere (an offloaded reference) moves there for
        the pass and back after, so that it holds no accelerator memory during rollout and update."""
        home = _device_of(model)
        if home == self.device:
            yield
            return
        model.to(self.device)
        try:
            yield
        finally:
            model.to(home)

    # -- the update -------------------------------------------------------------------------------------
    def update(self, batch: PackedBatch) -> dict[str, float]:
        """PPO epochs x mini-batches x micro-batches; one optimiser step per mini-batch, one schedule step per call."""
        counts = all_gather_int(batch.num_sequences, self.device)
        mini_batches, micro_counts = self._mini_batches(batch.num_sequences, counts)
        template = self._template(batch.sequences, counts)
        loss_batch = self._with_behavior_fallback(batch) if self.loss_cfg.needs_behavior else batch
        stats: dict[str, list[float]] = {}
        for _ in range(self.optim_cfg.ppo_epochs):
            for mini_batch, num_micro in zip(mini_batches, micro_counts):
                for key, value in self._mini_batch_step(loss_batch[mini_batch], num_micro, template).items():
                    stats.setdefault(key, []).append(value)
        metrics = {key: sum(v) / len(v) for key, v in stats.items()}
        if self.loss_cfg.needs_behavior:
            metrics.update(self._tokens_without_behavior(batch))
        metrics["lr"] = self.schedule.get_last_lr()[0]
        self.schedule.advance()
        return metrics

    def _with_behavior_fallback(self, batch: PackedBatch) -> PackedBatch:
        """``batch`` with the behaviour log-probs the loss reads: the generator's where it gave them, the old policy's
        elsewhere, so that the ratio of those tokens becomes pi/pi_old (counted and warned about by
        :meth:`_tokens_without_behavior`)."""
        if batch.old_logprobs is None:
            missing = int((~batch.behavior_mask).sum())
            if missing:
                raise ValueError(
                    f"{missing} tokens have no behaviour log-probs and there are no old log-probs to use instead: "
                    "call Learner.fill_logprobs(batch) (old=None or True) before update"
                )
            return batch
        return replace(batch, behavior_logprobs=torch.where(batch.behavior_mask, batch.behavior_logprobs,
                                                            batch.old_logprobs))

    def _normalizer(self, batch: PackedBatch) -> float:
        """The global count that the loss divides by, summed over micro-batches and data-parallel ranks."""
        local = normalizer_count(self.loss_cfg, torch.tensor(batch.offsets)) if batch.num_sequences else 0
        # at least 1: when every sequence is empty the loss is 0 anyway, and the loss refuses a 0 normaliser
        return max(all_reduce_sum(float(local), self.device), 1.0)

    def _mini_batch_step(self, batch: PackedBatch, num_micro: int,
                         template: Optional[TrainSequence]) -> dict[str, float]:
        """``batch`` (a mini-batch) in ``num_micro`` micro-batches (placeholders past this rank's own), then one
        optimiser step."""
        normalizer = self._normalizer(batch)
        # DeepSpeed averages gradients over ranks; the normaliser is already global, so undo the mean.
        rank_scale = float(world_size())
        micro = self.optim_cfg.micro_batch_size
        starts = range(0, batch.num_sequences, micro)
        loss_sum, tokens, finite = 0.0, 0, True
        weighted: dict[str, float] = {}  # token-weighted sums of the loss statistics (counts summed as is)
        for index in range(num_micro):
            self.engine.set_gradient_accumulation_boundary(index == num_micro - 1)
            if index >= len(starts):
                placeholder = make_placeholder_micro_batch(template, self.pad_id, self.device)
                self.engine.backward(self._micro_batch_loss(placeholder, normalizer).loss, scale_wrt_gas=False)
                continue
            chunk = batch[starts[index] : starts[index] + micro]
            out = self._micro_batch_loss(chunk.micro_batch(), normalizer)
            # A non-finite loss still goes backward (a collective under ZeRO-3); the step then drops its gradients.
            self.engine.backward(out.loss * rank_scale, scale_wrt_gas=False)
            if not torch.isfinite(out.loss):
                finite = False
                continue
            loss_sum += float(out.loss.detach())
            tokens += chunk.num_tokens
            for key, value in out.stats.items():
                weighted[key] = weighted.get(key, 0.0) + value * (1 if key.startswith("tokens_") else chunk.num_tokens)
        finite = all_reduce_sum(0.0 if finite else 1.0, self.device) == 0.0
        if not finite:
            self._skip_step()
            return {"skipped_steps": 1.0}
        self.bad_steps = 0
        local_norm = self._grad_norm_before_step()
        self.engine.step()
        if not self.state_is_finite():
            raise NonFiniteWeightsError(
                f"an optimiser step left NaN/Inf in the weights or the optimiser state (optim.lr={self.optim_cfg.lr:g}, "
                f"grad norm {local_norm:g}); lower optim.lr or set optim.grad_clip"
            )
        # float() also takes statistics that the loss returns as 0-dim tensors (one sync per key, here)
        metrics = {f"loss/{key}": float(value if key.startswith("tokens_") else value / max(tokens, 1))
                   for key, value in weighted.items()}
        metrics["loss"] = all_reduce_sum(loss_sum, self.device)
        grad_norm = self.engine.get_global_grad_norm()
        metrics["grad_norm"] = float(grad_norm) if grad_norm is not None else local_norm
        metrics["skipped_steps"] = 0.0
        return metrics

    def _micro_batch_loss(self, mb: MicroBatch, normalizer: float):
        result = {}

        def loss_fn(h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
            result["out"] = fused_linear_grpo_loss(
                h, w, mb.targets, advantages=mb.advantages, cu_seqlens=mb.cu_seqlens, origin=mb.origin,
                old_logprobs=mb.old_logprobs, ref_logprobs=mb.ref_logprobs,
                behavior_logprobs=mb.behavior_logprobs if self.loss_cfg.needs_behavior else None,
                loss_mask=mb.loss_mask, normalizer=normalizer, config=self.loss_cfg, advantage_level="sequence",
                options=self.kernel_options, return_entropy=True,  # logged whatever loss.entropy_coef
            )
            return result["out"].loss

        loss = self.engine(mb, loss_fn)
        out = result["out"]
        out.loss = loss
        return out

    def _tokens_without_behavior(self, batch: PackedBatch) -> dict[str, float]:
        """Counts (over all ranks) the tokens whose behaviour log-prob the loss needs but the generator did not give,
        and warns once per kind: they fall back to the old policy's log-prob (see :meth:`_with_behavior_fallback`).

        Expert tokens under ``expert_mode="is"``: API experts return text, not the policy tokenizer's log-probs.
        Policy tokens under ``tis_cap``: the rollout engine returned no log-probs.
        """
        # tokens without behaviour log-probs per origin, [max origin + 1]
        counts = torch.bincount(batch.origin, weights=(~batch.behavior_mask).double(), minlength=1)
        if world_size() > 1:
            width = int(all_reduce_max(float(counts.numel()), self.device))
            counts = torch.nn.functional.pad(counts, (0, width - counts.numel()))
            dist.all_reduce(counts)
        counts = counts.tolist()
        width = len(counts)
        metrics = {}
        if self.loss_cfg.expert_mode == "is":
            lacking = [e for e in range(1, width) if counts[e]]
            metrics["loss/tokens_expert_without_behavior"] = float(sum(counts[1:]))
            if lacking:
                names = ", ".join(self._expert_label(e) for e in lacking)
                self._warn_once(
                    "expert",
                    f"loss.expert_mode=is: {int(sum(counts[1:]))} tokens of {names} carry no behaviour log-probs "
                    "(an API expert returns text, not the policy tokenizer's log-probs), so their importance weight "
                    "falls back to the unclipped ratio to the old policy, pi/pi_old. Serve the expert through sglang "
                    "with the policy's tokenizer, or set loss.expert_mode=ratio or shaped. Counted in "
                    "loss/tokens_expert_without_behavior.",
                )
        if self.loss_cfg.tis_cap is not None:
            metrics["loss/tokens_policy_without_behavior"] = float(counts[0])
            if counts[0]:
                self._warn_once(
                    "policy",
                    f"loss.tis_cap={self.loss_cfg.tis_cap:g}: {int(counts[0])} policy tokens carry no behaviour log-probs "
                    "(the rollout engine returned none), so their truncated importance weight is 1 (no correction). "
                    "Use a rollout engine that returns log-probs, or set loss.tis_cap=null. Counted in "
                    "loss/tokens_policy_without_behavior.",
                )
        return metrics

    def _expert_label(self, origin: int) -> str:
        if origin <= len(self.expert_names):
            return f"expert {self.expert_names[origin - 1]!r} (origin {origin})"
        return f"expert origin {origin}"

    def _warn_once(self, kind: str, message: str) -> None:
        if kind not in self._warned_without_behavior and is_main_rank():
            warnings.warn(message, stacklevel=4)
        self._warned_without_behavior.add(kind)

    @torch.no_grad()
    def state_is_finite(self) -> bool:
        """Whether this rank's weights (its partitions under ZeRO-3) and optimiser state are all finite, on every rank.

        Checked after every optimiser step, so that no checkpoint or export ever holds a NaN weight.
        """
        tensors = [getattr(p, "ds_tensor", p) for p in self.model.parameters()]
        optimizer = self.engine.optimizer
        while optimizer is not None:  # DeepSpeed's ZeRO wrappers hold the torch optimiser as .optimizer
            for state in getattr(optimizer, "state", {}).values():
                tensors.extend(v for v in state.values() if torch.is_tensor(v) and v.is_floating_point())
            optimizer = getattr(optimizer, "optimizer", None)
        # min and max propagate NaN and show +-Inf, with no tensor-sized temporary; one sync per device
        extremes: dict[torch.device, list[torch.Tensor]] = {}
        for t in tensors:
            if t.numel():
                extremes.setdefault(t.device, []).extend(torch.aminmax(t.detach().reshape(-1)))
        bad = sum(int(not torch.isfinite(torch.stack(values).float()).all()) for values in extremes.values())
        return all_reduce_sum(float(bad), self.device) == 0.0

    def _grad_norm_before_step(self) -> float:
        """The gradient norm where DeepSpeed does not report one (ZeRO-0: gradients live on the parameters)."""
        if self.engine.zero_optimization_stage() > 0:
            return float("nan")
        norms = [p.grad.detach().float().norm() for p in self.model.parameters() if p.grad is not None]
        return float(torch.stack(norms).norm()) if norms else 0.0

    def _skip_step(self) -> None:
        """Drops the accumulated gradients of a mini-batch with a non-finite loss; stops after K in a row."""
        self.engine.zero_grad()
        if hasattr(self.engine.optimizer, "zero_grad"):
            self.engine.optimizer.zero_grad()
        self.bad_steps += 1
        if self.bad_steps >= self.optim_cfg.max_bad_steps:
            raise NonFiniteLossError(
                f"the loss was NaN/Inf in {self.bad_steps} consecutive updates (optim.max_bad_steps="
                f"{self.optim_cfg.max_bad_steps}); lower optim.lr, check the rewards and the data, or raise "
                "optim.max_bad_steps"
            )

    def gathered_weights(self) -> contextlib.AbstractContextManager:
        """The policy's whole weights on this rank while the context is open (ZeRO-3 partitions them), for
        generation with the shared module."""
        if self.engine.zero_optimization_stage() == 3:
            import deepspeed

            return deepspeed.zero.GatheredParameters(list(self.model.parameters()), modifier_rank=None)
        return contextlib.nullcontext()

    # -- checkpoints and export ------------------------------------------------------------------------
    def save_checkpoint(self, root: Path, step: int, client_state: dict, keep_last: int) -> Path:
        return checkpoint.save(self.engine, root, step, client_state, keep_last)

    def load_checkpoint(self, path: Path) -> dict:
        return checkpoint.load_from(self.engine, path)

    def load_latest_checkpoint(self, root: Path) -> Optional[tuple[Path, dict]]:
        return checkpoint.load_latest(self.engine, root)

    def export(self, out: Path, processor) -> Path:
        """The policy and ``processor`` as an HF folder at ``out``, written by rank 0 (a collective under ZeRO-3)."""
        from .export import save_hf_folder

        state = None
        if self.engine.zero_optimization_stage() == 3:  # gather the partitions; drop the engine wrapper's prefix
            state = {k.removeprefix("policy."): v for k, v in self.engine._zero3_consolidated_16bit_state_dict().items()}
        if is_main_rank():
            save_hf_folder(self.model, processor, out, state_dict=state)
        return out

    def named_weights(self):
        """The policy's parameters by transformers name, for the rollout engine's weight sync.

        Under ZeRO-3 each parameter is gathered in turn (a collective: every rank must consume the whole
        iterator) and handed out as a full copy, so the engine can bucket it.
        """
        if self.engine.zero_optimization_stage() != 3:
            yield from ((name, p.detach()) for name, p in self.model.named_parameters())
            return
        import deepspeed

        for name, param in self.model.named_parameters():
            with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
                yield name, param.detach().clone()


def engine_config(ds_config: dict, optim: OptimConfig, dtype: torch.dtype) -> dict:
    """A DeepSpeed config (``deepspeed.config``) with the keys the learner decides: clipping from
    ``optim.grad_clip``, one sequence batch per forward (the learner packs and accumulates itself), and bf16
    when the policy is bf16."""
    return {**ds_config, "gradient_clipping": optim.grad_clip, "train_micro_batch_size_per_gpu": 1,
            "gradient_accumulation_steps": 1, "bf16": {"enabled": dtype == torch.bfloat16}}

