"""Training recipes: the shipped digits models, and ASE fine-tuning under an exit schedule."""

from .denoiser import TrainConfig, TrainResult, depth_groups, freeze_timestep_embedding, loss_weights, train_denoiser
from .digits_models import build_digits_denoiser, digits_noise_scheduler, save_digits_pipeline

__all__ = [
    "TrainConfig",
    "TrainResult",
    "build_digits_denoiser",
    "depth_groups",
    "digits_noise_scheduler",
    "freeze_timestep_embedding",
    "loss_weights",
    "save_digits_pipeline",
    "train_denoiser",
]
