from ..shipped import shipped_model_path
from .early_exit import (
    EarlyExitDDIMPipeline,
    EarlyExitDDPMPipeline,
    EarlyExitDiTPipeline,
    EarlyExitFluxPipeline,
    EarlyExitPipelineMixin,
    EarlyExitPixArtAlphaPipeline,
    EarlyExitStableDiffusion3Pipeline,
    EarlyExitStableDiffusionPipeline,
    EarlyExitUNet2DPipeline,
)
from .loading import load_early_exit_pipeline
from .masked_diffusion_lm import MaskedDiffusionLMOutput, MaskedDiffusionLMPipeline

__all__ = [
    "EarlyExitDDIMPipeline",
    "EarlyExitDDPMPipeline",
    "EarlyExitDiTPipeline",
    "EarlyExitFluxPipeline",
    "EarlyExitPipelineMixin",
    "EarlyExitPixArtAlphaPipeline",
    "EarlyExitStableDiffusion3Pipeline",
    "EarlyExitStableDiffusionPipeline",
    "EarlyExitUNet2DPipeline",
    "MaskedDiffusionLMOutput",
    "MaskedDiffusionLMPipeline",
    "load_early_exit_pipeline",
    "shipped_model_path",
]
