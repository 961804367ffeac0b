"""The learner: a DeepSpeed engine over the policy, old/reference log-probs, and the EKIPL update.

The model runs to its last hidden states; ``fused_linear_grpo_loss`` turns them and the LM-head weight
into the loss and its gradients without materialising the logits. The loss is computed *inside* the LM
head module's call (:func:`_through_head`), so ZeRO-3 gathers that weight for the forward and again for
the backward, exactly as it would for the head's own forward.
"""

from __future__ import annotations

import copy
import math
import time
import types
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn

from ekipl_kernels import LossConfig, fused_linear_grpo_loss, fused_linear_logprobs

from .models import last_hidden_states
from .packing import MicroBatch, TrainSequence, make_micro_batch


@dataclass(frozen=True)
class OptimConfig:
    """Optimiser, schedule and the shape of the update.

    lr, weight_decay, betas: AdamW (lr > 0, weight_decay >= 0, each beta in [0, 1)). warmup_steps: linear
    warm-up; then ``schedule`` "cosine" (to ``min_lr_ratio * lr`` at ``run.max_steps``, ratio in [0, 1]) or
    "constant". grad_clip: global norm (0 disables).
    ppo_epochs: passes over each rollout (Reason-RFT: 1, one update per rollout). mini_batch_size:
    sequences per optimiser step per rank (0 = the whole rollout). micro_batch_size: sequences per
    forward/backward (gradient accumulation up to the mini-batch). max_bad_steps: consecutive steps with
    a non-finite loss that are skipped before the run stops.
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


def all_reduce_sum(value: float, device: torch.device) -> float:
    if world_size() == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t.item())


def lr_lambda(cfg: OptimConfig, max_steps: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.schedule == "constant":
            return 1.0
        progress = min((step - cfg.warmup_steps) / max(max_steps - cfg.warmup_steps, 1), 1.0)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


class Learner:
    """Owns the DeepSpeed engine, the frozen reference model and the update."""

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
    ) -> None:
        import deepspeed

        self.loss_cfg, self.optim_cfg, self.pad_id = loss, optim, pad_id
        params = [p for p in policy.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=optim.lr, betas=optim.betas, weight_decay=optim.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(optim, max_steps))
        self.engine, _, _, self.scheduler = deepspeed.initialize(
            model=PolicyLoss(policy), optimizer=optimizer, lr_scheduler=scheduler, config=ds_config
        )
        self.device = self.engine.device
        self.reference = reference
        if loss.beta > 0 and reference is None:
            self.reference = copy.deepcopy(policy).eval().requires_grad_(False)
        self.bad_steps = 0

    @property
    def model(self) -> nn.Module:
        """The policy itself (transformers names), inside the engine's wrapper."""
        return self.engine.module.policy

    # -- log-probs -------------------------------------------------------------------------------------
    @torch.no_grad()
    def fill_logprobs(self, seqs: Sequence[TrainSequence], *, old: bool) -> float:
        """Teacher-forced log-probs of every completion token: old (the policy now) and/or reference."""
        start = time.perf_counter()
        models = []
        if old:
            models.append(("old_logprobs", self.model))
        if self.loss_cfg.beta > 0:
            models.append(("ref_logprobs", self.reference))
        for name, model in models:
            was_training = model.training
            model.eval()
            for chunk in _chunks(seqs, self.optim_cfg.micro_batch_size):
                mb = make_micro_batch(chunk, self.pad_id, self.device)
                hidden = completion_hidden_states(model, mb)
                lp = _through_head(
                    model.get_output_embeddings(),
                    lambda h, w: fused_linear_logprobs(h, w, mb.targets, temperature=self.loss_cfg.temperature),
                    hidden,
                )
                for seq, part in zip(chunk, torch.split(lp.float().cpu(), [s.num_tokens for s in chunk])):
                    setattr(seq, name, part)
            model.train(was_training)
        return time.perf_counter() - start

    # -- the update -------------------------------------------------------------------------------------
    def update(self, seqs: Sequence[TrainSequence]) -> dict[str, float]:
        """PPO epochs x mini-batches x micro-batches; one optimiser step per mini-batch."""
        cfg = self.optim_cfg
        mini = cfg.mini_batch_size or len(seqs)
        stats: dict[str, list[float]] = {}
        for _ in range(cfg.ppo_epochs):
            for mini_batch in _chunks(seqs, mini):
                for key, value in self._mini_batch_step(mini_batch).items():
                    stats.setdefault(key, []).append(value)
        return {key: sum(v) / len(v) for key, v in stats.items()}

    def _normalizer(self, seqs: Sequence[TrainSequence]) -> float:
        """The global count that the loss divides by, summed over micro-batches and data-parallel ranks."""
        if self.loss_cfg.agg == "token-mean":
            local = sum(s.num_tokens for s in seqs)
        elif self.loss_cfg.agg == "seq-mean-token-mean":
            local = sum(1 for s in seqs if s.num_tokens > 0)
        else:
            local = len(seqs)
        return all_reduce_sum(float(local), self.device)

    def _mini_batch_step(self, seqs: Sequence[TrainSequence]) -> dict[str, float]:
        normalizer = self._normalizer(seqs)
        # DeepSpeed averages gradients over ranks; the normaliser is already global, so undo the mean.
        rank_scale = float(world_size())
        micro_batches = list(_chunks(seqs, self.optim_cfg.micro_batch_size))
        loss_sum, tokens, finite = 0.0, 0, True
        weighted: dict[str, float] = {}  # token-weighted sums of the loss statistics (counts summed as is)
        for index, chunk in enumerate(micro_batches):
            self.engine.set_gradient_accumulation_boundary(index == len(micro_batches) - 1)
            mb = make_micro_batch(chunk, self.pad_id, self.device)
            out = self._micro_batch_loss(mb, normalizer)
            if not torch.isfinite(out.loss):
                finite = False
                continue
            self.engine.backward(out.loss * rank_scale, scale_wrt_gas=False)
            chunk_tokens = sum(s.num_tokens for s in chunk)
            loss_sum += float(out.loss.detach())
            tokens += chunk_tokens
            for key, value in out.stats.items():
                weighted[key] = weighted.get(key, 0.0) + value * (1 if key.startswith("tokens_") else chunk_tokens)
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
        metrics = {f"loss/{key}": value if key.startswith("tokens_") else value / max(tokens, 1)
                   for key, value in weighted.items()}
        metrics["loss"] = all_reduce_sum(loss_sum, self.device)
        grad_norm = self.engine.get_global_grad_norm()
        metrics["grad_norm"] = float(grad_norm) if grad_norm is not None else local_norm
        metrics["lr"] = self.scheduler.get_last_lr()[0]
        metrics["skipped_steps"] = 0.0
        return metrics

    def _micro_batch_loss(self, mb: MicroBatch, normalizer: float):
        old = mb.gather("old_logprobs")
        ref = mb.gather("ref_logprobs")
        behavior = mb.behavior_logprobs
        if behavior is not None:
            # Tokens whose generator gave no log-probs take the old policy's: their ratio stays pi/pi_old.
            fallback = old if old is not None else torch.full_like(behavior, float("nan"))
            behavior = torch.where(torch.isnan(behavior), fallback.to(self.device), behavior)
        result = {}

        def loss_fn(h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
            result["out"] = fused_linear_grpo_loss(
                h, w, mb.targets, advantages=mb.advantages, cu_seqlens=mb.cu_seqlens, origin=mb.origin,
                old_logprobs=None if old is None else old.to(self.device),
                ref_logprobs=None if ref is None else ref.to(self.device),
                behavior_logprobs=behavior if self.loss_cfg.needs_behavior else None,
                normalizer=normalizer, config=self.loss_cfg,
            )
            return result["out"].loss

        loss = self.engine(mb, loss_fn)
        out = result["out"]
        out.loss = loss
        return out

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


def _chunks(items: Sequence, size: int):
    for start in range(0, len(items), size):
        yield items[start : start + size]
