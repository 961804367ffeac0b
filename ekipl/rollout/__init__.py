"""Rollout engines: sample groups of completions from the policy (and from expert models).

``base`` holds the protocol; ``hf`` the transformers engine (CPU, small models, the reference);
``sglang`` the SGLang engines (in-process beside the learner, or an HTTP client), which import sglang lazily.
"""

from ekipl.rollout.base import (
    Completion,
    GenerateStats,
    Prompt,
    RolloutEngine,
    SamplingParams,
    SyncStats,
    check_generate_args,
)
from ekipl.rollout.hf import HFEngine
from ekipl.rollout.sglang import SGLangEngine, SGLangError, SGLangHTTPEngine, SGLangLaunchArgs

__all__ = [
    "Completion",
    "GenerateStats",
    "HFEngine",
    "Prompt",
    "RolloutEngine",
    "SGLangEngine",
    "SGLangError",
    "SGLangHTTPEngine",
    "SGLangLaunchArgs",
    "SamplingParams",
    "SyncStats",
    "check_generate_args",
]
