"""External experts: generators whose answers join the policy's groups (SGLang-served models,
OpenAI-compatible APIs, precomputed answer files, the synthetic task's oracle).

``pool.ExpertPool`` asks them all concurrently under a per-step deadline; ``prefix`` builds LUFFY-style
prefix-guided samples; ``generate`` precomputes answers for a dataset.
"""

from ekipl.experts.base import ExpertAnswer, ExpertReply, ExpertRequest
from ekipl.experts.config import ExpertConfig, ExpertPoolConfig
from ekipl.experts.pool import ExpertPool, ExpertStats, PendingAnswers

__all__ = [
    "ExpertAnswer",
    "ExpertConfig",
    "ExpertPool",
    "ExpertPoolConfig",
    "ExpertReply",
    "ExpertRequest",
    "ExpertStats",
    "PendingAnswers",
]
