from .early_exit import (
    EarlyExitDDIMPipeline,
    EarlyExitDDPMPipeline,
    EarlyExitDiTPipeline,
    EarlyExitPipelineMixin,
    EarlyExitPixArtAlphaPipeline,
    EarlyExitStableDiffusion3Pipeline,
    EarlyExitStableDiffusionPipeline,
)

__all__ = [
    "EarlyExitDDIMPipeline",
    "EarlyExitDDPMPipeline",
    "EarlyExitDiTPipeline",
    "EarlyExitPipelineMixin",
    "EarlyExitPixArtAlphaPipeline",
    "EarlyExitStableDiffusion3Pipeline",
    "EarlyExitStableDiffusionPipeline",
]
