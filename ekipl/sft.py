"""Supervised fine-tuning on demonstrations: the tiny policy's warm start and the SFT-on-expert baseline.

Plain next-token training: cross-entropy on the completion tokens only (the prompt and its image tokens are
context), torch AdamW in one process, deterministic from a seed. Two kinds of demonstration for the synthetic
task:

- ``weak``: weak demonstrations, the oracle's reasoning and format with every count guessed at random
  (:func:`ekipl.data.synthetic.guessed_answer`), blind to the image. The policy learns to write
  ``<think>There are N objects ...</think><answer>N</answer>`` and nothing about N, so plain GRPO meets a
  reward spread from its first step and all of the accuracy is left to RL. The embedded tiny default is
  warm-started this way (:func:`ekipl.tools.tiny_model.build_tiny_model`).
- ``expert``: the oracle expert's answers (its ``k`` answers per prompt, wrong with probability
  ``error_rate``): supervised learning on what EKIPL's expert pool offers, the baseline EKIPL must beat.

Prompts are drawn as the trainer draws them (:class:`ekipl.sampler.PromptSampler` with the same seed), so
``steps`` x ``prompts_per_step`` is the same budget of prompts as an RL run of that many steps.

    python -m ekipl.sft --model DIR --data train.jsonl --out DIR [--demos expert] [--steps 100]
        [--eval-data test.jsonl --eval-every 25]
"""

from __future__ import annotations

import argparse
import json
import math
import random
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from ekipl.data import Prompt, Record, encode_prompt, load_records
from ekipl.data.synthetic import guessed_answer, oracle_answer
from ekipl.experts.retokenize import Retokenizer
from ekipl.models import last_hidden_states, lm_head_weight
from ekipl.packing import TrainSequence, pack_sequences
from ekipl.sampler import PromptSampler

DEMONSTRATION_KINDS = ("weak", "expert")

Demonstrate = Callable[[Record, int], list[str]]  # (record, step) -> completion texts


@dataclass(frozen=True)
class SFTConfig:
    """steps: optimiser steps. prompts_per_step: prompts per step (each gives one or more demonstrations).
    lr: AdamW peak learning rate, reached after ``warmup_steps`` and decayed by a cosine to 0 at the last step.
    micro_batch_size: sequences per forward/backward (gradients accumulate over the step). max_pixels: image
    size bound of the prompts. seed: the prompt order, the demonstrations' draws and torch's RNG."""

    steps: int = 100
    prompts_per_step: int = 16
    lr: float = 3e-3
    warmup_steps: int = 5
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    micro_batch_size: int = 32
    max_pixels: int = 12544
    max_prompt_len: int = 4096
    seed: int = 0

    def __post_init__(self) -> None:
        for key in ("steps", "prompts_per_step", "micro_batch_size"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key}={getattr(self, key)} is invalid: expected >= 1")
        if not 0.0 < self.lr < math.inf:
            raise ValueError(f"lr={self.lr!r} is invalid: expected a finite number > 0")


def weak_demonstrations(seed: int) -> Demonstrate:
    """One weak demonstration per prompt, its counts guessed from (seed, step, record)."""

    def demonstrate(record: Record, step: int) -> list[str]:
        return [guessed_answer(record, random.Random(f"weak/{seed}/{step}/{record.id}"))]

    return demonstrate


def expert_demonstrations(seed: int, *, k: int, error_rate: float) -> Demonstrate:
    """The oracle expert's ``k`` answers per prompt, each wrong (off by one) with probability ``error_rate``."""

    def demonstrate(record: Record, step: int) -> list[str]:
        return [
            oracle_answer(record, error_rate=error_rate, rng=random.Random(f"expert/{seed}/{step}/{record.id}/{index}"))
            for index in range(k)
        ]

    return demonstrate


def learning_rate(cfg: SFTConfig, step: int) -> float:
    """Linear warm-up, then a cosine that reaches 0 at the last step (unlike the RL learner's ``lr_lambda``, whose
    last step still trains: an SFT run's last step may as well be at 0, and the tiny default's warm start is
    built with this one)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(cfg.steps - cfg.warmup_steps - 1, 1)
    return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def completion_loss(model, sequences: Sequence[TrainSequence], pad_id: int) -> tuple[torch.Tensor, int]:
    """Summed cross-entropy of the completion tokens of ``sequences`` and their number."""
    device = lm_head_weight(model).device
    batch = pack_sequences(sequences, pad_id, device).micro_batch()
    hidden = last_hidden_states(model, batch.input_ids, batch.attention_mask, **batch.mm_inputs)
    rows = hidden.reshape(-1, hidden.shape[-1])[batch.hidden_index]
    logits = rows @ lm_head_weight(model).t()
    loss = torch.nn.functional.cross_entropy(logits.float(), batch.targets, reduction="sum")
    return loss, batch.targets.numel()


def supervised_finetune(
    model,
    processor,
    records: Sequence[Record],
    demonstrate: Demonstrate,
    cfg: SFTConfig,
    *,
    on_step: Optional[Callable[[int, float], None]] = None,
    progress: bool = True,
    desc: str = "sft",
) -> list[float]:
    """Train ``model`` in place on ``demonstrate``'s completions of ``records``; returns the per-step mean loss
    per token. ``on_step(step, loss)`` runs after each optimiser step (1-based), e.g. to evaluate."""
    from tqdm import tqdm

    torch.manual_seed(cfg.seed)
    tokenizer = processor.tokenizer
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    retokenizer = Retokenizer(tokenizer)
    prompts: dict[str, Prompt] = {}
    sampler = PromptSampler(len(records), cfg.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    model.train()
    losses = []
    for step in tqdm(range(cfg.steps), desc=desc, disable=not progress, dynamic_ncols=True):
        sequences = []
        for index in sampler.next_batch(cfg.prompts_per_step):
            record = records[index]
            if record.id not in prompts:
                prompts[record.id] = encode_prompt(processor, record, max_pixels=cfg.max_pixels,
                                                   max_prompt_len=cfg.max_prompt_len)
            for text in demonstrate(record, step):
                ids = retokenizer.encode(text)
                sequences.append(TrainSequence(prompts[record.id], ids, [0] * len(ids), advantage=0.0))
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(cfg, step)
        optimizer.zero_grad(set_to_none=True)
        total_tokens = sum(s.num_tokens for s in sequences)
        step_loss = 0.0
        for first in range(0, len(sequences), cfg.micro_batch_size):
            loss, _ = completion_loss(model, sequences[first : first + cfg.micro_batch_size], pad_id)
            (loss / total_tokens).backward()  # the token mean over the whole step, however it is cut
            step_loss += loss.item()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        losses.append(step_loss / total_tokens)
        if on_step is not None:
            model.eval()
            on_step(step + 1, losses[-1])
            model.train()
    model.eval()
    return losses


def warm_start(model, processor, *, steps: int, seed: int, prompts: int = 256, progress: bool = True) -> list[float]:
    """SFT of ``model`` in place on weak demonstrations (the format, no knowledge of the answer), on ``prompts``
    synthetic prompts of a split of their own; deterministic in ``seed``. Returns the per-step losses."""
    from ekipl.data import SYNTHETIC_TASK
    from ekipl.data.synthetic import write_synthetic_split

    with tempfile.TemporaryDirectory(prefix="ekipl-warm-start-") as folder:  # prompts are encoded on first use
        split = write_synthetic_split(folder, "warmstart", prompts, seed=seed)
        records = load_records(split, task=SYNTHETIC_TASK, image_root=folder).records
        return supervised_finetune(model, processor, records, weak_demonstrations(seed), SFTConfig(steps=steps, seed=seed),
                                   progress=progress, desc="warm start (SFT on weak demonstrations)")


def main(argv: Optional[Sequence[str]] = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="folder of the starting model and its processor")
    parser.add_argument("--data", required=True, help="training records (JSON or JSONL; synthetic for --demos)")
    parser.add_argument("--image-root", default=None, help="folder the records' images are relative to "
                        "(default: the data file's folder)")
    parser.add_argument("--task", default="synthetic")
    parser.add_argument("--out", required=True, help="folder for the trained model, metrics.jsonl and evaluations")
    parser.add_argument("--demos", choices=DEMONSTRATION_KINDS, default="expert")
    parser.add_argument("--k", type=int, default=2, help="expert answers per prompt (--demos expert)")
    parser.add_argument("--error-rate", type=float, default=0.1, help="share of wrong expert answers (--demos expert)")
    parser.add_argument("--steps", type=int, default=SFTConfig.steps)
    parser.add_argument("--prompts-per-step", type=int, default=SFTConfig.prompts_per_step)
    parser.add_argument("--lr", type=float, default=SFTConfig.lr)
    parser.add_argument("--warmup-steps", type=int, default=SFTConfig.warmup_steps)
    parser.add_argument("--micro-batch-size", type=int, default=SFTConfig.micro_batch_size)
    parser.add_argument("--max-pixels", type=int, default=SFTConfig.max_pixels)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-data", default=None, help="held-out records to evaluate on (same image root)")
    parser.add_argument("--eval-every", type=int, default=0, help="evaluate every N steps (0: only at the end)")
    parser.add_argument("--eval-max-new-tokens", type=int, default=64)
    args = parser.parse_args(argv)

    from ekipl.models import load_policy, load_processor

    out = Path(args.out)
    earlier = [name for name in ("metrics.jsonl", "hf_export", "eval") if (out / name).exists()]
    if earlier:
        parser.error(f"--out {out} holds an earlier run ({', '.join(earlier)}): choose a new folder or delete it")
    out.mkdir(parents=True, exist_ok=True)
    processor = load_processor(args.model)
    model = load_policy(args.model, dtype=torch.float32, attn_implementation="sdpa", use_liger=False)
    records = load_records(args.data, task=args.task, image_root=args.image_root).records
    test = load_records(args.eval_data, task=args.task, image_root=args.image_root).records if args.eval_data else []
    cfg = SFTConfig(steps=args.steps, prompts_per_step=args.prompts_per_step, lr=args.lr, warmup_steps=args.warmup_steps,
                    micro_batch_size=args.micro_batch_size, max_pixels=args.max_pixels, seed=args.seed)
    demonstrate = (expert_demonstrations(args.seed, k=args.k, error_rate=args.error_rate) if args.demos == "expert"
                   else weak_demonstrations(args.seed))
    metrics = (out / "metrics.jsonl").open("w", encoding="utf-8")
    evaluation: dict = {}

    def evaluate_at(step: int) -> None:
        nonlocal evaluation
        evaluation = held_out_evaluation(model, processor, test, task=args.task, out_dir=out / "eval" / f"step_{step:08d}",
                                         max_pixels=cfg.max_pixels, max_new_tokens=args.eval_max_new_tokens, seed=args.seed)
        metrics.write(json.dumps({"step": step, **evaluation}) + "\n")

    def on_step(step: int, loss: float) -> None:
        metrics.write(json.dumps({"step": step, "sft/loss": loss}) + "\n")
        if test and (args.eval_every > 0 and step % args.eval_every == 0 or step == cfg.steps):
            evaluate_at(step)
        metrics.flush()

    with metrics:
        if test:  # as the trainer does: the starting point's score first
            evaluate_at(0)
        supervised_finetune(model, processor, records, demonstrate, cfg, on_step=on_step, desc=f"sft ({args.demos})")
    model.save_pretrained(out / "hf_export")
    processor.save_pretrained(out / "hf_export")
    if evaluation:
        print(" ".join(f"{key}={value:.3f}" for key, value in evaluation.items()))
    return evaluation


def held_out_evaluation(model, processor, records: Sequence[Record], *, task: str, out_dir: Path, max_pixels: int,
                        max_new_tokens: int, seed: int) -> dict[str, float]:
    """The trainer's held-out metrics (``eval/score``, ``eval/reward_mean``, ``eval/format_rate``) with the
    benchmark's sampling (temperature 0.1, top_p 0.9, top_k 50), one sample per question."""
    from dataclasses import replace

    from ekipl.eval import EVAL_SAMPLING, evaluate, held_out_rewards
    from ekipl.rewards import RewardSet
    from ekipl.rollout.hf import HFEngine

    summary = evaluate(HFEngine(model, processor), records, processor, task=task, out_dir=out_dir, max_pixels=max_pixels,
                       sampling=replace(EVAL_SAMPLING, max_new_tokens=max_new_tokens), seed=seed, progress=False)
    return {"eval/score": summary["score"], **held_out_rewards(summary["predictions"], records, RewardSet.for_task(task))}


if __name__ == "__main__":
    main()
