"""Masked diffusion LM decoding: early-commit rules (Prophet, SchED), model adapters, the sampler."""

from .adapters import DreamAdapter, LLaDA2Adapter, LLaDAAdapter, MaskedLMAdapter, get_adapter
from .rules import ProphetCommit, SchEDCommit, ThresholdCommit, prophet_threshold, sched_threshold
from .sampler import SamplerOutput, generate
from .schedulers import ProphetScheduler, SchEDScheduler

__all__ = [
    "DreamAdapter",
    "LLaDA2Adapter",
    "LLaDAAdapter",
    "MaskedLMAdapter",
    "ProphetCommit",
    "ProphetScheduler",
    "SamplerOutput",
    "SchEDCommit",
    "SchEDScheduler",
    "ThresholdCommit",
    "generate",
    "get_adapter",
    "prophet_threshold",
    "sched_threshold",
]
