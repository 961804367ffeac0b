"""An expert served by SGLang (in-process engine or server), through the rollout engine's client.

The ``k`` samples of a prompt go in one ``generate`` call, so the engine prefills the prompt once and the
samples share its prefix in the radix cache; each sample has its own seed. An expert that shares the
policy's tokenizer keeps its token ids and log-probs (the loss's ``expert_mode: is`` needs them) and is sent
the policy's own prompt; any other is sent the prompt encoded by its own processor, and the pool
re-tokenises its text.
"""

from __future__ import annotations

import threading
import time
from contextlib import nullcontext
from typing import Sequence

from ekipl.data.prompts import decode_completion, encode_prompt
from ekipl.experts.base import ExpertReply, ExpertRequest, seconds_left, stable_seed
from ekipl.experts.config import ExpertConfig
from ekipl.data import Prompt
from ekipl.rollout.base import RolloutEngine


class SGLangExpert:
    """``processor`` is the expert model's own (it decodes answers, and encodes prompts when the policy's
    cannot be reused). ``thread_safe``: the engine takes concurrent calls (an HTTP client); otherwise calls
    are serialised (an in-process engine runs one batch at a time)."""

    shares_prefix = True

    def __init__(self, config: ExpertConfig, engine: RolloutEngine, processor, *, thread_safe: bool):
        self.config = config
        self.engine = engine
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self._lock = nullcontext() if thread_safe else threading.Lock()

    def answer(self, request: ExpertRequest, sample_indices: Sequence[int], deadline: float) -> list[ExpertReply]:
        prompt = self._prompt(request)
        config = self.config
        seeds = [[stable_seed(config.seed, config.name, request.seed, request.prompt_hash, i) for i in sample_indices]]
        with self._lock:
            seconds_left(deadline)  # a call queued behind the lock past the deadline is not worth making
            started = time.monotonic()
            (completions,) = self.engine.generate([prompt], len(sample_indices), self.config.sampling, seeds)
        latency = time.monotonic() - started
        keep_tokens = self.config.same_tokenizer
        return [
            ExpertReply(
                sample_index=index,
                text=decode_completion(self.tokenizer, completion.token_ids),
                token_ids=list(completion.token_ids) if keep_tokens else None,
                logprobs=list(completion.logprobs) if keep_tokens else None,
                finish_reason=completion.finish_reason,
                latency_s=latency,
            )
            for index, completion in zip(sample_indices, completions)
        ]

    def close(self) -> None:
        self.engine.shutdown()

    def _prompt(self, request: ExpertRequest) -> Prompt:
        if self.config.same_tokenizer and request.prompt is not None:
            return request.prompt
        return encode_prompt(
            self.processor, request.record, max_pixels=self.config.max_pixels, max_prompt_len=self.config.max_prompt_len
        )
