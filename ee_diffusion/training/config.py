"""The settings of the training recipes, with their shipped defaults (torch-free, so the CLI can show them)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

LOSS_WEIGHTS = ("constant", "min-snr")
TARGETS = ("data", "teacher")
# What a denoiser trained here may predict (a diffusers scheduler's `prediction_type`): the noise or the velocity.
PREDICTION_TYPES = ("epsilon", "v_prediction")


@dataclass
class TrainConfig:
    """Hyper-parameters of `train_denoiser`.

    Args:
        steps: Optimiser steps.
        batch_size: Samples per step.
        learning_rate: Peak AdamW learning rate (reached after `warmup_steps`, then cosine decay to 0).
        warmup_steps: Linear warm-up steps.
        weight_decay: AdamW weight decay.
        ema_decay: Highest EMA decay (warmed up as `1 - (1 + step) ** -0.75`, capped here).
        class_dropout: Probability of replacing a label by the null class (classifier-free guidance).
        loss_weight: `lambda(t)`: `"constant"` (1) or `"min-snr"` (`min(SNR(t), gamma) / SNR(t)`, which keeps the
            noisy timesteps, where exit schedules cut deepest, at full weight and down-weights the clean ones).
        min_snr_gamma: `gamma` of the min-SNR weight.
        freeze_timestep_embedding: Keep the timestep embedding fixed (ASE fine-tuning).
        target: What the model learns to output: the objective's own target, from the data and the noise (`"data"`),
            or the output of a frozen full-depth copy of the model as it was before the run (`"teacher"`: fine-tuning
            under an exit schedule by self-distillation, whose targets have none of the data's noise).
        checkpoint_every: Save `checkpoint.pt` (model, EMA, optimiser, generator) every this many steps.
        seed: Seed of initial noise, timesteps, batches and label dropout.
    """

    steps: int = 3000
    batch_size: int = 128
    learning_rate: float = 5e-4
    warmup_steps: int = 100
    weight_decay: float = 0.0
    ema_decay: float = 0.999
    class_dropout: float = 0.1
    loss_weight: Literal["constant", "min-snr"] = "constant"
    min_snr_gamma: float = 5.0
    freeze_timestep_embedding: bool = False
    target: Literal["data", "teacher"] = "data"
    checkpoint_every: int = 500
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"`{name}` must be at least 1, got {getattr(self, name)}.")
        if self.loss_weight not in LOSS_WEIGHTS:
            raise ValueError(f"`loss_weight` must be one of {LOSS_WEIGHTS}, got {self.loss_weight!r}.")
        if self.target not in TARGETS:
            raise ValueError(f"`target` must be one of {TARGETS}, got {self.target!r}.")
        if not 0.0 <= self.class_dropout < 1.0:
            raise ValueError(f"`class_dropout` must be in [0, 1), got {self.class_dropout}.")
        if not 0.0 < self.ema_decay < 1.0:
            raise ValueError(f"`ema_decay` must be in (0, 1), got {self.ema_decay}.")


@dataclass
class MDLMTrainConfig:
    """Everything `train_mdlm` needs; the defaults are the shipped `tiny-mdlm` recipe (whose weights are the step-20000
    checkpoint of its 24000-step schedule: `stop_at=20000`).

    `tasks` are drawn in turn within each batch (a task named twice gets twice the share); `init_from` (a model folder
    or shipped model name) starts from that model's weights instead of a fresh initialisation (the architecture
    settings are then the model's own). `stop_at` ends the run after that step (checkpointed) while keeping the
    learning-rate schedule of `steps`, so that `resume` can continue it, with other tasks if need be.
    """

    output_dir: str
    steps: int = 24000
    batch_size: int = 128
    learning_rate: float = 1e-3
    warmup_steps: int = 500
    weight_decay: float = 0.01
    eps: float = 1e-3
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    gen_length: int = 18
    max_prompt_length: int = 22
    tasks: tuple[str, ...] = ("addition", "sorting")
    init_from: str | None = None
    seed: int = 0
    checkpoint_every: int = 2000
    resume: bool = False
    stop_at: int | None = None

    @property
    def last_step(self) -> int:
        """The step the run ends after: `stop_at`, else `steps`."""
        return self.steps if self.stop_at is None else self.stop_at

    def __post_init__(self) -> None:
        if self.stop_at is not None and not 1 <= self.stop_at <= self.steps:
            raise ValueError(
                f"`stop_at` must be a step of the run, from 1 to steps={self.steps}, got {self.stop_at}; it ends the "
                "run early while keeping the learning-rate schedule of `steps`."
            )
