"""Training recipes: the shipped digits models (the text-to-image `digits-flux` too), ASE fine-tuning under an exit
schedule, DeeDiff exit heads, and the tiny masked LM."""

from ..lazy_imports import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(
    __name__,
    {
        ".config": ["MDLMTrainConfig", "TrainConfig"],
        ".denoiser": ["loss_weights", "train_denoiser"],
        ".under_schedule": ["depth_groups", "freeze_timestep_embedding", "trained_groups"],
        ".loop": ["TrainResult", "optimise"],
        ".exit_heads": ["exit_head_losses", "train_exit_heads"],
        ".digits_models": ["build_digits_denoiser", "digits_noise_scheduler", "save_digits_pipeline"],
        ".digits_flux": [
            "DigitsFluxConfig",
            "build_digits_flux_pipeline",
            "digits_flux_accuracy",
            "save_digits_flux_pipeline",
            "train_digits_flux",
        ],
        ".flow_matching": ["FlowMatchingConfig", "train_flow_transformer"],
    },
)
