"""Masked diffusion LM decoding: early-commit rules (Prophet, SchED), model adapters, the sampler."""

from ..lazy_imports import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(
    __name__,
    {
        ".adapters": ["DreamAdapter", "LLaDA2Adapter", "LLaDAAdapter", "MaskedLMAdapter", "get_adapter"],
        ".rules": ["ProphetCommit", "SchEDCommit", "ThresholdCommit", "prophet_threshold", "sched_threshold"],
        ".sampler": ["SamplerOutput", "generate"],
        ".block_schedulers": ["ProphetScheduler", "SchEDScheduler"],
    },
)
