"""What every expert shares: the request it answers, the reply it returns, the answer the pool hands out.

An expert answers one prompt at a time: :meth:`Expert.answer` takes the request and the sample indices
wanted (``0 .. k-1``) and returns one :class:`ExpertReply` per sample it could produce before the deadline.
The pool turns replies into :class:`ExpertAnswer` objects: token ids in the policy's tokenizer, the
expert's origin tag, the reward.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Optional, Protocol, Sequence

from ekipl.data.prompts import prompt_text
from ekipl.data.records import Record
from ekipl.experts.config import ExpertConfig
from ekipl.data import Prompt


class ExpertError(Exception):
    """An expert could not produce an answer (network, server, engine); the pool counts it as failed."""


class MalformedReplyError(ExpertError):
    """A reply arrived but cannot be used (no text, bad JSON, does not re-tokenise); counted as dropped."""


class ExpertTimeoutError(ExpertError):
    """The step's deadline passed before the reply arrived; counted as timed out."""


@dataclass
class ExpertRequest:
    """One prompt for the experts: the record (question text and image paths) and, when the policy has
    encoded it, the policy's prompt (token ids with expanded image placeholders, and the images).

    ``seed`` (the run's seed and step) varies what experts that sample locally draw from step to step; it is
    not part of the answer cache's key, so a cached answer serves every later step.
    """

    record: Record
    prompt: Optional[Prompt] = None
    seed: int = 0

    @property
    def uid(self) -> str:
        return self.record.id

    @cached_property
    def text(self) -> str:
        """The user turn's text, as the benchmark words it (question + instruction)."""
        return prompt_text(self.record)

    @cached_property
    def prompt_hash(self) -> str:
        """A digest of what an expert sees: the prompt text and the bytes of every image, in order."""
        digest = hashlib.sha256(self.text.encode("utf-8"))
        for path in self.record.images:
            digest.update(b"\x00image\x00")
            digest.update(hashlib.sha256(Path(path).read_bytes()).digest())
        return digest.hexdigest()


@dataclass
class ExpertReply:
    """One sample as an expert returned it.

    ``token_ids`` / ``logprobs`` are set only by experts that share the policy's tokenizer; otherwise the
    pool re-tokenises ``text``.
    """

    sample_index: int
    text: str
    token_ids: Optional[list[int]] = None
    logprobs: Optional[list[float]] = None
    finish_reason: str = "stop"
    latency_s: float = 0.0
    from_cache: bool = False


@dataclass
class ExpertAnswer:
    """One expert answer, ready to join its prompt's group.

    ``token_ids`` are in the policy's tokenizer and end as the policy's own turn would (with the end-of-turn
    token); they are None only from a pool built without the policy's tokenizer (precomputing answers).
    ``logprobs`` are the expert's own per-token log-probs when it shares the policy's tokenizer.
    ``expert_id`` is the origin tag of every token (1-based position in the pool's config). ``reward`` is
    filled by the pool's reward function or by the trainer.
    """

    uid: str
    expert: str
    expert_id: int
    sample_index: int
    text: str
    token_ids: Optional[list[int]]
    logprobs: Optional[list[float]] = None
    finish_reason: str = "stop"
    latency_s: float = 0.0
    from_cache: bool = False
    reward: Optional[float] = None

    @property
    def origins(self) -> list[int]:
        """The origin of every token: this expert's id throughout."""
        return [self.expert_id] * len(self.token_ids or ())


class Expert(Protocol):
    """An external generator of answers."""

    config: ExpertConfig
    # True: all wanted samples of a prompt go in one call (an engine that shares the prompt's prefix across
    # the group); False: one call per sample, so samples run concurrently and fail independently.
    shares_prefix: bool

    def answer(self, request: ExpertRequest, sample_indices: Sequence[int], deadline: float) -> list[ExpertReply]:
        """Replies for the wanted samples, by ``deadline`` (a ``time.monotonic()`` time).

        May return fewer replies than asked (the missing ones are counted as dropped); raises
        :class:`ExpertError` (or a subclass) when nothing usable came back.
        """
        ...

    def close(self) -> None:
        """Release connections and engines."""
        ...


def seconds_left(deadline: float) -> float:
    """Time until ``deadline`` (``time.monotonic()`` based); raises ExpertTimeoutError once it has passed."""
    left = deadline - time.monotonic()
    if left <= 0:
        raise ExpertTimeoutError(f"the deadline passed {-left:.2f} s ago")
    return left


def stable_seed(*parts: object) -> int:
    """A 31-bit seed derived from ``parts``, the same in every process (unlike ``hash``)."""
    digest = hashlib.sha256("\x00".join(map(str, parts)).encode("utf-8")).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF
