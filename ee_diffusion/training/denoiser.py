"""Diffusion training of a class-conditional denoiser, from scratch or under an exit schedule (ASE).

One loop serves both recipes. Plain training: DDPM noise at uniform timesteps, MSE on what the noise scheduler's
`prediction_type` says the model predicts (the noise or the velocity), labels dropped to the null class for
classifier-free guidance, AdamW with warm-up and cosine decay, EMA weights, checkpoints.

ASE fine-tuning (Moon et al., Algorithm 1) adds three things: the exit schedule is applied to the student, so each
sample's prediction comes from its timestep's depth; the timestep embedding is frozen; the loss is weighted by
`lambda(t)`. Unlike the released code, which runs every block and then picks the exit output, a batch is grouped by
depth and each group runs only its own blocks, so a training step costs what the schedule says it should.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import DDPMScheduler
from diffusers.models.embeddings import LabelEmbedding

from ..data.digits import DigitsSplit
from ..exits import apply_exit_schedule, remove_exit_schedule, reset_exit_stats
from ..pipelines.class_conditional import null_class_label
from ..schedules import DROP, REUSE, ExitSchedule
from .config import PREDICTION_TYPES, TrainConfig
from .loop import CHECKPOINT_NAME, TrainResult, optimise

# Parameter names of the timestep embeddings of diffusers' DiT (per block) and UNet2DModel.
_TIMESTEP_EMBEDDING_NAMES = ("timestep_embedder", "time_embedding")


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


def freeze_timestep_embedding(model: torch.nn.Module) -> list[str]:
    """Stop gradients into the timestep embedding of a DiT or UNet2DModel; returns the frozen parameter names."""
    frozen = [name for name, p in model.named_parameters() if any(k in name for k in _TIMESTEP_EMBEDDING_NAMES)]
    if not frozen:
        raise ValueError(
            f"Found no timestep-embedding parameters ({_TIMESTEP_EMBEDDING_NAMES}) in {type(model).__name__}."
        )
    for name, parameter in model.named_parameters():
        if name in frozen:
            parameter.requires_grad_(False)
    return frozen


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


def _trained_depth(action: int | str) -> int:
    """The depth a plan's action trains: its own for a depth; `REUSE` (nothing: the step takes cached work, or is
    dropped) otherwise."""
    return REUSE if action == DROP or action <= REUSE else action


def depth_groups(depths: list[int]) -> dict[int, torch.Tensor]:
    """Indices of the samples at each depth, so that each group runs only the blocks it uses."""
    by_depth = torch.tensor(depths)
    return {int(depth): torch.nonzero(by_depth == depth).flatten() for depth in torch.unique(by_depth)}


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
    if config.freeze_timestep_embedding:
        freeze_timestep_embedding(model)
    model.to(device)

    def batch_loss(generator: torch.Generator) -> torch.Tensor:
        noisy, timesteps, labels, target = noised_batch(data, config, generator, noise_scheduler, null_label)
        weights = loss_weights(timesteps, noise_scheduler, config.loss_weight, config.min_snr_gamma).to(device)
        noisy, labels, target, on_device_timesteps = (x.to(device) for x in (noisy, labels, target, timesteps))
        groups = (
            {None: torch.arange(config.batch_size)}
            if exit_schedule is None
            else depth_groups([_trained_depth(a) for a in exit_schedule.depths_for(timesteps, num_train_timesteps)])
        )
        loss = torch.zeros((), device=device)
        for depth, members in groups.items():
            if depth == REUSE:  # a plan's reuse, cached-tail and dropped steps: nothing of the model to train there
                continue
            members = members.to(device)
            prediction = model(noisy[members], on_device_timesteps[members], class_labels=labels[members]).sample
            per_sample = (prediction[:, : target.shape[1]] - target[members]).pow(2).mean(dim=(1, 2, 3))
            loss = loss + (weights[members] * per_sample).sum() / config.batch_size
        return loss

    if exit_schedule is not None:
        apply_exit_schedule(model, exit_schedule, num_train_timesteps, plan_steps_only=False)
    try:
        return optimise(
            {"model": model},
            batch_loss,
            config,
            checkpoint=Path(out_dir) / CHECKPOINT_NAME if out_dir is not None else None,
            resume=resume,
            desc="ASE fine-tuning" if exit_schedule is not None else "training",
            progress=progress,
            after_step=None if exit_schedule is None else lambda: reset_exit_stats(model),
        )
    finally:
        if exit_schedule is not None:
            remove_exit_schedule(model)
        for parameter in model.parameters():  # the timestep embedding, frozen for ASE fine-tuning
            parameter.requires_grad_(True)
