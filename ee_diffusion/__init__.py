"""ee-diffusion: early exit for diffusion models, as diffusers hooks and drop-in pipelines."""

from .exits import (
    ExitArchitecture,
    ExitCall,
    ExitStats,
    apply_exit_schedule,
    exit_units,
    get_exit_architecture,
    get_exit_schedule,
    get_exit_stats,
    num_exit_blocks,
    register_exit_architecture,
    remove_exit_schedule,
    reset_exit_stats,
    set_exit_timestep_scale,
)
from .pipelines import (
    EarlyExitDDIMPipeline,
    EarlyExitDDPMPipeline,
    EarlyExitDiTPipeline,
    EarlyExitPipelineMixin,
    EarlyExitPixArtAlphaPipeline,
    EarlyExitStableDiffusion3Pipeline,
    EarlyExitStableDiffusionPipeline,
    EarlyExitUNet2DPipeline,
    load_early_exit_pipeline,
)
from .schedules import ExitSchedule

from .dllm import ProphetCommit, ProphetScheduler, SchEDCommit, SchEDScheduler, ThresholdCommit  # isort: skip
from .pipelines import MaskedDiffusionLMPipeline  # isort: skip

__version__ = "0.1.0"

__all__ = [
    "EarlyExitDDIMPipeline",
    "EarlyExitDDPMPipeline",
    "EarlyExitDiTPipeline",
    "EarlyExitPipelineMixin",
    "EarlyExitPixArtAlphaPipeline",
    "EarlyExitStableDiffusion3Pipeline",
    "EarlyExitStableDiffusionPipeline",
    "EarlyExitUNet2DPipeline",
    "ExitArchitecture",
    "ExitCall",
    "ExitSchedule",
    "ExitStats",
    "MaskedDiffusionLMPipeline",
    "ProphetCommit",
    "ProphetScheduler",
    "SchEDCommit",
    "SchEDScheduler",
    "ThresholdCommit",
    "apply_exit_schedule",
    "exit_units",
    "get_exit_architecture",
    "get_exit_schedule",
    "get_exit_stats",
    "load_early_exit_pipeline",
    "num_exit_blocks",
    "register_exit_architecture",
    "remove_exit_schedule",
    "reset_exit_stats",
    "set_exit_timestep_scale",
]
