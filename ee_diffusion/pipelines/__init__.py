from .early_exit import (
    EarlyExitDDIMPipeline,
    EarlyExitDDPMPipeline,
    EarlyExitDiTPipeline,
    EarlyExitPipelineMixin,
    EarlyExitPixArtAlphaPipeline,
    EarlyExitStableDiffusion3Pipeline,
    EarlyExitStableDiffusionPipeline,
)
from .masked_diffusion_lm import MaskedDiffusionLMOutput, MaskedDiffusionLMPipeline

__all__ = [
    "EarlyExitDDIMPipeline",
    "EarlyExitDDPMPipeline",
    "EarlyExitDiTPipeline",
    "EarlyExitPipelineMixin",
    "EarlyExitPixArtAlphaPipeline",
    "EarlyExitStableDiffusion3Pipeline",
    "EarlyExitStableDiffusionPipeline",
]
