"""Training recipes: the shipped digits models, ASE fine-tuning under an exit schedule, DeeDiff exit heads, and the
tiny masked LM."""

from ..lazy_imports import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(
    __name__,
    {
        ".config": ["MDLMTrainConfig", "TrainConfig"],
        ".denoiser": ["TrainResult", "depth_groups", "freeze_timestep_embedding", "loss_weights", "train_denoiser"],
        ".exit_heads": ["exit_head_losses", "train_exit_heads"],
        ".digits_models": ["build_digits_denoiser", "digits_noise_scheduler", "save_digits_pipeline"],
    },
)
