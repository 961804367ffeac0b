"""Build an expert from its config (the pool does this for every configured expert)."""

from __future__ import annotations

from ekipl.experts.base import Expert
from ekipl.experts.config import ExpertConfig


def build_expert(config: ExpertConfig) -> Expert:
    """The expert ``config`` describes; SGLang and the OpenAI client are imported only when used."""
    if config.kind == "oracle":
        from ekipl.experts.oracle_expert import OracleExpert

        return OracleExpert(config)
    if config.kind == "cache":
        from ekipl.experts.cache_expert import CacheExpert

        return CacheExpert(config)
    if config.kind == "openai":
        from ekipl.experts.openai_expert import OpenAIExpert

        return OpenAIExpert(config)
    if config.kind == "sglang":
        return _sglang_expert(config)
    raise AssertionError(f"unhandled expert kind {config.kind!r}")  # ExpertConfig validates the kind


def _sglang_expert(config: ExpertConfig) -> Expert:
    from ekipl.experts.sglang_expert import SGLangExpert
    from ekipl.models import load_processor
    from ekipl.rollout.sglang import SGLangEngine, SGLangHTTPEngine, SGLangLaunchArgs

    processor = load_processor(config.model)
    if config.base_url:
        engine = SGLangHTTPEngine.for_model(config.base_url, config.model, timeout_s=config.request_timeout_s)
        return SGLangExpert(config, engine, processor, thread_safe=True)
    engine = SGLangEngine.launch(SGLangLaunchArgs(model_path=config.model, random_seed=config.seed))
    return SGLangExpert(config, engine, processor, thread_safe=False)
