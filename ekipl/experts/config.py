"""Typed configs of the expert pool: one :class:`ExpertConfig` per expert, and the pool's own knobs.

Both are frozen dataclasses, built from YAML by ``ekipl.config_loader.from_dict`` (nested in the trainer's
config, or alone by ``python -m ekipl.experts.generate``). Every value is checked when the dataclass is
built, so a bad config fails at start-up, naming the expert and the key.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Optional

from ekipl.rollout.base import SamplingParams

EXPERT_KINDS = ("sglang", "openai", "cache", "oracle")
# Kinds whose answers cost money or accelerator time: they go through the on-disk answer cache.
ONLINE_KINDS = ("sglang", "openai")
INFUSE_WHEN = ("always", "unsolved")
# What an environment variable's name looks like (POSIX). API keys hold '-', '.', '=' or spaces, or a long
# random run mixing two of lower case, upper case and digits (names are short words between underscores),
# or start with a vendor's key prefix.
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_LONG_RUN = re.compile(r"[A-Za-z0-9]{24,}")
_KEY_PREFIXES = ("sk-", "sk_", "AIza", "hf_", "gsk_", "ghp_", "xai-")


@dataclass(frozen=True)
class ExpertConfig:
    """One external generator.

    name: unique label, used in metrics and in the answer cache's key.
    kind: "sglang" (an SGLang-served model: the server at ``base_url``, or an in-process engine),
        "openai" (any OpenAI-compatible chat-completions endpoint at ``base_url``),
        "cache" (answers precomputed by ``python -m ekipl.experts.generate``, read from ``path``), or
        "oracle" (the synthetic task's solver, wrong with probability ``error_rate``).
    k: answers per prompt.
    model: the model name sent to an OpenAI-compatible endpoint, or the local folder of an SGLang expert's
        model (at least its config and processor: they encode its prompts and decode its answers).
    base_url: the endpoint, e.g. "https://api.openai.com/v1" or "http://127.0.0.1:30000" (SGLang).
    api_key_env: the name of the environment variable that holds the API key (the key itself never
        appears in a config, a log or a cache file); None sends a placeholder key (local servers). A value
        that looks like a key rather than a name is refused, without repeating it.
    max_in_flight: requests to this expert in flight at once.
    sampling: temperature, top_p, top_k, max_new_tokens (top_k is not an OpenAI parameter: an
        ``openai`` expert sends it only through ``extra_body``).
    extra_body: extra JSON fields of each OpenAI request (e.g. ``{"top_k": 50}`` for a vLLM server).
    request_timeout_s: the longest one HTTP attempt may take (always cut to the step's deadline).
    same_tokenizer: the expert uses the policy's tokenizer, so its token ids and log-probs are the
        policy's and are kept (they feed the loss's ``expert_mode: is``); otherwise answers are
        re-tokenised from their text.
    max_pixels / max_prompt_len: how an SGLang expert with its own tokenizer encodes prompts.
    error_rate: the oracle's chance of a wrong (off-by-one) answer.
    path: the JSONL file of a cache expert.
    seed: seeds the oracle's slips and the SGLang expert's sampling seeds.
    """

    name: str
    kind: str
    k: int = 1
    model: str = ""
    base_url: Optional[str] = None
    api_key_env: Optional[str] = None
    max_in_flight: int = 8
    sampling: SamplingParams = field(default_factory=SamplingParams)
    extra_body: dict[str, Any] = field(default_factory=dict)
    request_timeout_s: float = 120.0
    same_tokenizer: bool = False
    max_pixels: int = 480000
    max_prompt_len: int = 4096
    error_rate: float = 0.0
    path: Optional[str] = None
    seed: int = 0

    def __post_init__(self) -> None:
        where = f"expert {self.name!r}"
        if not self.name or "/" in self.name:
            raise ValueError(f"expert name {self.name!r} is invalid: give a non-empty name without '/'")
        if self.kind not in EXPERT_KINDS:
            raise ValueError(f"{where}: kind={self.kind!r} is invalid: expected one of {EXPERT_KINDS}")
        if self.k < 1:
            raise ValueError(f"{where}: k={self.k} is invalid: expected >= 1")
        if self.max_in_flight < 1:
            raise ValueError(f"{where}: max_in_flight={self.max_in_flight} is invalid: expected >= 1")
        if self.request_timeout_s <= 0:
            raise ValueError(f"{where}: request_timeout_s={self.request_timeout_s} is invalid: expected > 0")
        if self.api_key_env is not None and _looks_like_a_key(self.api_key_env):
            # Never echo the value: the error would carry the key into logs and terminals.
            raise ValueError(
                f"{where}: api_key_env holds what looks like an API key, not the name of an environment variable "
                "(value not shown); export the key in a variable (export OPENAI_API_KEY=...) and set "
                "api_key_env to that variable's name"
            )
        if not 0.0 <= self.error_rate <= 1.0:
            raise ValueError(f"{where}: error_rate={self.error_rate} is invalid: expected a value in [0, 1]")
        if self.kind == "openai" and not (self.base_url and self.model):
            raise ValueError(f"{where}: an openai expert needs base_url and model (the endpoint's model name)")
        if self.kind == "sglang" and not self.model:
            raise ValueError(
                f"{where}: an sglang expert needs model, the local folder of the served model's config and "
                "tokenizer (plus base_url for a running server; without it an in-process engine is launched)"
            )
        if self.kind == "cache" and not self.path:
            raise ValueError(f"{where}: a cache expert needs path, the JSONL file written by ekipl.experts.generate")

    @property
    def is_online(self) -> bool:
        """Whether answers are generated on demand (and so worth caching on disk)."""
        return self.kind in ONLINE_KINDS


def _looks_like_a_key(value: str) -> bool:
    if not _ENV_NAME.fullmatch(value) or value.startswith(_KEY_PREFIXES):
        return True
    classes = (str.islower, str.isupper, str.isdigit)
    return any(sum(any(map(test, run)) for test in classes) >= 2 for run in _LONG_RUN.findall(value))


@dataclass(frozen=True)
class ExpertPoolConfig:
    """The expert pool.

    experts: the experts, in order; expert ``e`` (1-based, in this order) tags its tokens with origin
        ``e`` (origin 0 is the policy).
    expert_timeout_s: the per-step deadline, counted from when the step's requests are submitted;
        answers that have not arrived by then are left out of the step and counted as timed out.
    infuse_when: "always" (ask the experts for every prompt) or "unsolved" (only for prompts where no
        policy sample reached ``reward_threshold``; the policy's group is scored first).
    reward_threshold: the reward that counts as solved (default 2.0: format + accuracy both earned).
    prefix_ratio: LUFFY's prefix guidance; > 0 turns ``prefix_samples`` policy samples per prompt into
        continuations of the first ``prefix_ratio`` of an expert answer's tokens.
    prefix_samples: policy samples per prompt that become prefix-guided (with ``prefix_ratio`` > 0).
    cache_dir: where online experts' answers are appended (one JSONL file per expert); None: no cache.
    """

    experts: tuple[ExpertConfig, ...] = ()
    expert_timeout_s: float = 60.0
    infuse_when: str = "always"
    reward_threshold: float = 2.0
    prefix_ratio: float = 0.0
    prefix_samples: int = 1
    cache_dir: Optional[str] = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "experts", tuple(self.experts))
        names = [expert.name for expert in self.experts]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"experts.experts: duplicate expert name(s) {duplicates}; names must be unique")
        if self.expert_timeout_s <= 0:
            raise ValueError(f"experts.expert_timeout_s={self.expert_timeout_s} is invalid: expected > 0")
        if self.infuse_when not in INFUSE_WHEN:
            raise ValueError(f"experts.infuse_when={self.infuse_when!r} is invalid: expected one of {INFUSE_WHEN}")
        if not 0.0 <= self.prefix_ratio < 1.0:
            raise ValueError(f"experts.prefix_ratio={self.prefix_ratio} is invalid: expected a value in [0, 1)")
        if self.prefix_samples < 0:
            raise ValueError(f"experts.prefix_samples={self.prefix_samples} is invalid: expected >= 0")

    def expert_id(self, name: str) -> int:
        """The origin tag of expert ``name``: its 1-based position in :attr:`experts`."""
        for index, expert in enumerate(self.experts, start=1):
            if expert.name == name:
                return index
        raise KeyError(f"no expert named {name!r}; configured: {[expert.name for expert in self.experts]}")
