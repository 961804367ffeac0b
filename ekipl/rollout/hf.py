"""Rollouts with a transformers model: the CPU engine, and the reference the SGLang engine is checked against.

Each batch of prompts is prefilled once; the KV cache is then repeated ``n`` times so that the group's samples
share their prompt's prefill, and decoding runs over the whole group. Sampling is done here rather than by
``model.generate``, because every sample needs its own random stream (``seeds[i][j]``) so that a sample
depends only on its prompt, its seed and the weights, and not on what else was in the batch.

Log-probs are those of the sampled tokens under ``softmax(logits / temperature)`` over the whole vocabulary,
before top-k / top-p filtering: what the learner computes teacher-forced at the same temperature, and what
SGLang reports by default.
"""

from __future__ import annotations

import contextlib
import time
from typing import Iterable, Iterator, Sequence

import torch
from torch import nn

from ekipl.data import Prompt
from ekipl.models import batch_multimodal_inputs, eos_token_ids, rope_position_ids
from ekipl.rollout.base import Completion, GenerateStats, SamplingParams, SyncStats, check_generate_args


def filter_logits(scaled: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Set logits outside the top-k and outside the top-p nucleus to -inf (each row keeps at least one)."""
    vocab = scaled.shape[-1]
    if 0 < top_k < vocab:
        kth = scaled.topk(top_k, dim=-1).values[..., -1:]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = scaled.sort(dim=-1, descending=True)
        sorted_probs = sorted_logits.softmax(-1)
        # Drop a token when the tokens ranked above it already hold top_p of the mass.
        drop_sorted = (sorted_probs.cumsum(-1) - sorted_probs) > top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        scaled = scaled.masked_fill(drop, float("-inf"))
    return scaled


def sample_next_tokens(
    logits: torch.Tensor,
    sampling: SamplingParams,
    generators: Sequence[torch.Generator],
    suppress_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample one token per row of ``logits`` ``[B, V]`` with row ``b`` drawing from ``generators[b]``.

    Returns the tokens ``[B]`` and their log-probs ``[B]`` under the temperature-scaled full distribution.
    Temperature 0 is greedy, with log-probs of the unscaled distribution (SGLang's convention).
    ``suppress_ids`` are never sampled (like top-k/top-p, this leaves the reported log-probs unchanged).
    """
    logits = logits.float()
    temperature = sampling.temperature if sampling.temperature > 0 else 1.0
    scaled = logits / temperature
    logprobs = scaled.log_softmax(-1)
    if suppress_ids is not None and suppress_ids.numel():
        scaled = scaled.index_fill(-1, suppress_ids, float("-inf"))
    if sampling.temperature <= 0:
        tokens = scaled.argmax(-1)
    else:
        probs = filter_logits(scaled, sampling.top_k, sampling.top_p).softmax(-1)
        # Exponential race: argmax p_v / E_v with E_v ~ Exp(1) draws v with probability p_v, and each row's
        # draws come from its own generator.
        race = torch.stack([torch.empty_like(row).exponential_(generator=gen) for row, gen in zip(probs, generators)])
        tokens = (probs / race).argmax(-1)
    return tokens, logprobs.gather(-1, tokens[:, None]).squeeze(-1)



@contextlib.contextmanager
def _inference_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode (no dropout, KV cache allowed beside gradient checkpointing), restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        model.train(was_training)


class HFEngine:
    """A :class:`~ekipl.rollout.base.RolloutEngine` on a transformers model.

    ``max_batch_size`` bounds the rows decoded together (prompts x samples); a group is never split, so one
    prompt with ``n`` above it still runs as one batch of ``n``.
    """

    def __init__(
        self,
        model: nn.Module,
        processor_or_tokenizer,
        *,
        device: torch.device | str | None = None,
        max_batch_size: int = 64,
        stop_token_ids: Sequence[int] | None = None,
        shares_learner_weights: bool = False,
        suppress_token_ids: Sequence[int] | None = None,
    ):
        self.model = model
        self.tokenizer = getattr(processor_or_tokenizer, "tokenizer", processor_or_tokenizer)
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.max_batch_size = max_batch_size
        self.stop_token_ids = tuple(
            stop_token_ids or eos_token_ids(getattr(model, "generation_config", None), self.tokenizer)
        )
        self.pad_token_id = (
            self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.stop_token_ids[0]
        )
        self.shares_learner_weights = shares_learner_weights
        # A sampled image/video placeholder would not line up with any image when the learner re-reads the
        # sequence: never sample the vision special tokens.
        if suppress_token_ids is None:
            config = getattr(model, "config", None)
            names = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")
            suppress_token_ids = [getattr(config, n) for n in names if getattr(config, n, None) is not None]
        self.suppress_token_ids = tuple(suppress_token_ids)
        self.last_stats: GenerateStats | None = None

    @classmethod
    def from_shared(cls, model: nn.Module, processor_or_tokenizer, **kwargs) -> "HFEngine":
        """An engine on the learner's own module: weight sync is a no-op, and so is memory release."""
        return cls(model, processor_or_tokenizer, shares_learner_weights=True, **kwargs)

    def generate(
        self,
        prompts: Sequence[Prompt],
        n: int,
        sampling: SamplingParams,
        seeds: Sequence[Sequence[int]],
    ) -> list[list[Completion]]:
        check_generate_args(prompts, n, seeds)
        start = time.perf_counter()
        per_batch = max(1, self.max_batch_size // n)
        results: list[list[Completion]] = []
        with _inference_mode(self.model):
            for first in range(0, len(prompts), per_batch):
                chunk = slice(first, first + per_batch)
                results.extend(self._generate_batch(prompts[chunk], n, sampling, seeds[chunk]))
        prompt_tokens = sum(len(p.input_ids) for p in prompts)
        self.last_stats = GenerateStats(
            prompts=len(prompts),
            samples=len(prompts) * n,
            prompt_tokens=prompt_tokens * n,
            cached_prompt_tokens=prompt_tokens * (n - 1),
            completion_tokens=sum(len(c.token_ids) for group in results for c in group),
            seconds=time.perf_counter() - start,
        )
        return results

    def _generate_batch(
        self, prompts: Sequence[Prompt], n: int, sampling: SamplingParams, seeds: Sequence[Sequence[int]]
    ) -> list[list[Completion]]:
        from transformers import DynamicCache

        device = self.device
        longest = max(len(p.input_ids) for p in prompts)
        input_ids = torch.full((len(prompts), longest), self.pad_token_id, dtype=torch.long, device=device)
        attention_mask = torch.zeros_like(input_ids)
        for row, prompt in enumerate(prompts):  # left padding: every prompt ends in the last column
            input_ids[row, longest - len(prompt.input_ids) :] = torch.tensor(prompt.input_ids, device=device)
            attention_mask[row, longest - len(prompt.input_ids) :] = 1
        mm_inputs = batch_multimodal_inputs(prompts, device)
        mm_inputs.pop("mm_token_type_ids", None)  # derived from the ids by rope_position_ids
        position_ids = rope_position_ids(self.model, input_ids, attention_mask, mm_inputs)

        cache = DynamicCache(config=self.model.config)
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
            **mm_inputs,
        )
        # One prefill per prompt; the group's samples continue from copies of its cache.
        cache.batch_repeat_interleave(n)
        logits = out.logits[:, -1].repeat_interleave(n, dim=0)
        attention_mask = attention_mask.repeat_interleave(n, dim=0)
        next_position = (position_ids[..., -1] + 1).repeat_interleave(n, dim=-1)

        flat_seeds = [seed for group in seeds for seed in group]
        generators = [torch.Generator(device=device).manual_seed(int(seed)) for seed in flat_seeds]
        token_ids: list[list[int]] = [[] for _ in flat_seeds]
        logprobs: list[list[float]] = [[] for _ in flat_seeds]
        finish = ["length"] * len(flat_seeds)
        stop_ids = torch.tensor(self.stop_token_ids, device=device)
        suppress_ids = torch.tensor(self.suppress_token_ids, dtype=torch.long, device=device)
        active = torch.arange(len(flat_seeds), device=device)  # sample index of each live row

        for step in range(sampling.max_new_tokens):
            tokens, token_logprobs = sample_next_tokens(
                logits, sampling, [generators[i] for i in active.tolist()], suppress_ids
            )
            for sample, token, logprob in zip(active.tolist(), tokens.tolist(), token_logprobs.tolist()):
                token_ids[sample].append(token)
                logprobs[sample].append(logprob)
            stopped = torch.isin(tokens, stop_ids)
            for sample in active[stopped].tolist():
                finish[sample] = "stop"
            live = ~stopped
            if step + 1 == sampling.max_new_tokens or not live.any():
                break
            if not live.all():  # drop finished rows so the rest decode in a smaller batch
                keep = live.nonzero().squeeze(-1)
                cache.batch_select_indices(keep)
                active, tokens = active[keep], tokens[keep]
                attention_mask, next_position = attention_mask[keep], next_position[..., keep]
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones(len(active), 1)], dim=-1)
            out = self.model(
                input_ids=tokens[:, None],
                attention_mask=attention_mask,
                position_ids=next_position.unsqueeze(-1),
                past_key_values=cache,
                use_cache=True,
            )
            logits = out.logits[:, -1]
            next_position = next_position + 1

        completions = [Completion(t, lp, f) for t, lp, f in zip(token_ids, logprobs, finish)]
        return [completions[i * n : (i + 1) * n] for i in range(len(prompts))]

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> SyncStats:
        """Copy the named tensors into the model; on a shared module nothing moves and 0 bytes are reported."""
        if self.shares_learner_weights:
            return SyncStats(bytes=0, buckets=0, seconds=0.0)
        start = time.perf_counter()
        # remove_duplicate=False: a tied LM head may arrive under either of its names.
        targets = dict(self.model.named_parameters(remove_duplicate=False))
        targets.update(self.model.named_buffers(remove_duplicate=False))
        moved = 0
        with torch.no_grad():
            for name, tensor in named_tensors:
                if name not in targets:
                    raise KeyError(
                        f"update_weights got {name!r}, which the rollout model does not have; "
                        "send transformers parameter names of the same architecture"
                    )
                targets[name].copy_(tensor)
                moved += tensor.numel() * tensor.element_size()
        return SyncStats(bytes=moved, buckets=1 if moved else 0, seconds=time.perf_counter() - start)

    def release_memory(self) -> None:
        """Move a separate CUDA copy of the model to host memory (nothing to do on CPU or a shared module)."""
        if not self.shares_learner_weights and self.device.type == "cuda":
            self.model.to("cpu")
            torch.cuda.empty_cache()

    def resume_memory(self) -> None:
        if not self.shares_learner_weights and self.device.type == "cuda":
            self.model.to(self.device)

    def shutdown(self) -> None:
        self.model = None
