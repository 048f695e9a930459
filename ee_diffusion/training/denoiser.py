"""Diffusion training of a class-conditional denoiser, from scratch or under an exit schedule (ASE).

One loop serves both recipes. Plain training: DDPM noise at uniform timesteps, MSE on what the noise scheduler's
`prediction_type` says the model predicts (the noise or the velocity), labels dropped to the null class for
classifier-free guidance, AdamW with warm-up and cosine decay, EMA weights, checkpoints.

ASE fine-tuning (Moon et al., Algorithm 1): the exit schedule is applied to the student, so each sample's prediction
comes from its timestep's depth, and the timestep embedding is frozen (`under_schedule`); the loss is weighted by
`lambda(t)`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import DDPMScheduler
from diffusers.models.embeddings import LabelEmbedding

from ..data.digits import DigitsSplit
from ..pipelines.class_conditional import null_class_label
from ..schedules import ExitSchedule
from .config import PREDICTION_TYPES, TrainConfig
from .loop import CHECKPOINT_NAME, TrainResult, optimise, public_config, weights_digest
from .under_schedule import frozen_teacher, trained_groups, trained_under


def loss_weights(
    timesteps: torch.Tensor, noise_scheduler: DDPMScheduler, weighting: str, gamma: float = 5.0
) -> torch.Tensor:
    """`lambda(t)` for each timestep: ones, or the min-SNR weight (Hang et al. 2023) of the scheduler's prediction
    type: `min(SNR, gamma) / SNR` for the noise, `min(SNR, gamma) / (SNR + 1)` for the velocity."""
    if weighting == "constant":
        return torch.ones(len(timesteps))
    alphas_cumprod = noise_scheduler.alphas_cumprod[timesteps]
    snr = alphas_cumprod / (1 - alphas_cumprod)
    return snr.clamp(max=gamma) / (snr + 1 if noise_scheduler.config.prediction_type == "v_prediction" else snr)


def training_target(
    images: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor, noise_scheduler: DDPMScheduler
) -> torch.Tensor:
    """What the model learns to output for `images` noised with `noise` at `timesteps`: the noise or the velocity."""
    if noise_scheduler.config.prediction_type == "v_prediction":
        return noise_scheduler.get_velocity(images, noise, timesteps)
    return noise


def noised_batch(
    data: DigitsSplit, config: TrainConfig, generator: torch.Generator, noise_scheduler: DDPMScheduler, null_label: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A training batch drawn on the CPU from `generator`: the noisy images, their timesteps, their labels (dropped to
    `null_label` with probability `config.class_dropout`) and what the model should output for them."""
    index = torch.randint(len(data), (config.batch_size,), generator=generator)
    images, labels = data.images[index], data.labels[index].clone()
    labels[torch.rand(config.batch_size, generator=generator) < config.class_dropout] = null_label
    timesteps = torch.randint(noise_scheduler.config.num_train_timesteps, (config.batch_size,), generator=generator)
    noise = torch.randn(images.shape, generator=generator)
    noisy = noise_scheduler.add_noise(images, noise, timesteps)
    return noisy, timesteps, labels, training_target(images, noise, timesteps, noise_scheduler)


def prepare_for_batches(model: torch.nn.Module, noise_scheduler: DDPMScheduler) -> int:
    """Refuse a prediction type the loops cannot train, before any step; turn the model's own label dropout off
    (`noised_batch` drops labels, once per sample, not once per DiT block); return the model's null label."""
    if noise_scheduler.config.prediction_type not in PREDICTION_TYPES:
        raise ValueError(
            f"Cannot train a model predicting {noise_scheduler.config.prediction_type!r}; expected one "
            f"of {PREDICTION_TYPES}."
        )
    null_label = null_class_label(model)
    for module in model.modules():
        if isinstance(module, LabelEmbedding):
            module.dropout_prob = 0.0
    return null_label


def train_denoiser(
    model: torch.nn.Module,
    data: DigitsSplit,
    config: TrainConfig,
    out_dir: str | Path | None = None,
    exit_schedule: ExitSchedule | None = None,
    resume: bool = False,
    noise_scheduler: DDPMScheduler | None = None,
    progress: bool = True,
    device: str | torch.device = "cpu",
) -> TrainResult:
    """Train `model` in place to denoise `data`; on return it holds the EMA weights.

    Args:
        model: A class-conditional DiT or UNet2DModel (see `null_class_label`).
        data: Training images in [-1, 1] and their labels.
        config: Hyper-parameters.
        out_dir: Where `checkpoint.pt` is written every `config.checkpoint_every` steps (`None`: no checkpoints).
        exit_schedule: Train under this schedule (ASE): each sample's output comes from its timestep's depth.
        resume: Continue from `out_dir/checkpoint.pt` (same config) instead of starting over.
        noise_scheduler: The forward process and, in its config's `prediction_type`, what the model predicts
            (`"epsilon"` or `"v_prediction"`); defaults to 1000 linear-beta DDPM steps predicting the noise.
        progress: Show a progress bar.
        device: Where the model trains. Batches, noise and label dropout are drawn on the CPU from one seeded
            generator whatever the device, so a run on a GPU sees the same data as one on the CPU.
    """
    noise_scheduler = noise_scheduler or DDPMScheduler(num_train_timesteps=1000)
    num_train_timesteps = noise_scheduler.config.num_train_timesteps
    null_label = prepare_for_batches(model, noise_scheduler)

    def batch_loss(generator: torch.Generator) -> torch.Tensor:
        noisy, timesteps, labels, target = noised_batch(data, config, generator, noise_scheduler, null_label)
        weights = loss_weights(timesteps, noise_scheduler, config.loss_weight, config.min_snr_gamma).to(device)
        noisy, labels, target, on_device_timesteps = (x.to(device) for x in (noisy, labels, target, timesteps))
        loss = torch.zeros((), device=device)
        for members in trained_groups(exit_schedule, timesteps, num_train_timesteps):
            members = members.to(device)
            inputs = (noisy[members], on_device_timesteps[members])
            prediction = model(*inputs, class_labels=labels[members]).sample[:, : target.shape[1]]
            if teacher is None:
                wanted = target[members]
            else:
                with torch.no_grad():
                    wanted = teacher(*inputs, class_labels=labels[members]).sample[:, : target.shape[1]]
            per_sample = (prediction - wanted).pow(2).mean(dim=(1, 2, 3))
            loss = loss + (weights[members] * per_sample).sum() / config.batch_size
        return loss

    model.to(device)
    teacher = frozen_teacher(model, config.target)
    # what else the run depends on, compared when it resumes: the model it starts from (its class, config and
    # weights), what it predicts, and the schedule it is fine-tuned under
    settings = {
        "model": type(model).__name__,
        "model_config": public_config(model.config),
        "start_weights": weights_digest(model),
        "noise_scheduler": public_config(noise_scheduler.config),
        "exit_schedule": None if exit_schedule is None else public_config(exit_schedule.config),
    }
    with trained_under(model, exit_schedule, num_train_timesteps, config.freeze_timestep_embedding) as after_step:
        return optimise(
            {"model": model},
            batch_loss,
            config,
            checkpoint=Path(out_dir) / CHECKPOINT_NAME if out_dir is not None else None,
            resume=resume,
            settings=settings,
            desc="ASE fine-tuning" if exit_schedule is not None else "training",
            progress=progress,
            after_step=after_step,
        )
