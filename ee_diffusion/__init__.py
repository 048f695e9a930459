"""ee-diffusion: early exit for diffusion models, as diffusers hooks and drop-in pipelines.

Names are imported on first use (`ee_diffusion.lazy_imports`): `import ee_diffusion` loads neither torch nor
diffusers until something needs them.
"""

from .lazy_imports import lazy_exports

__version__ = "0.1.0"

__getattr__, __dir__, __all__ = lazy_exports(
    __name__,
    {
        ".exits": [
            "ExitArchitecture",
            "ExitCall",
            "ExitHeads",
            "ExitStats",
            "TimestepConvention",
            "UncertaintyExitStats",
            "apply_exit_schedule",
            "apply_uncertainty_exit",
            "exit_schedule_in_force",
            "exit_units",
            "get_exit_architecture",
            "get_exit_schedule",
            "get_exit_stats",
            "get_uncertainty_exit_stats",
            "num_exit_blocks",
            "register_exit_architecture",
            "remove_exit_schedule",
            "remove_uncertainty_exit",
            "reset_exit_stats",
            "set_exit_timestep_scale",
        ],
        ".pipelines": [
            "EarlyExitDDIMPipeline",
            "EarlyExitDDPMPipeline",
            "EarlyExitDiTPipeline",
            "EarlyExitFluxPipeline",
            "EarlyExitPipelineMixin",
            "EarlyExitPixArtAlphaPipeline",
            "EarlyExitStableDiffusion3Pipeline",
            "EarlyExitStableDiffusionPipeline",
            "EarlyExitUNet2DPipeline",
            "MaskedDiffusionLMPipeline",
            "load_early_exit_pipeline",
        ],
        ".schedules": ["DROP", "REUSE", "ExitSchedule", "cached_tail"],
        ".calibration": ["Calibration", "PlanCalibrator", "calibrate_plan"],
        ".comfyui_exits": ["apply_comfyui_exit_schedule"],
        ".dllm": ["ProphetCommit", "ProphetScheduler", "SchEDCommit", "SchEDScheduler", "ThresholdCommit"],
    },
)
