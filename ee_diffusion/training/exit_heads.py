"""Training DeeDiff's exit heads (`ee-diffusion train-uem`): the uncertainty-aware layer-wise loss.

For a batch noised at uniform timesteps, with `target` what the model predicts (the noise or the velocity) and, for
each exit point `k`, the head's prediction `g_k(h_k)` and the UEM's uncertainty `u_k`:

    L = L_simple + lambda * L_u + beta * L_UAL
    L_simple = mean (model(x_t) - target)^2                    the model's own loss (joint mode only)
    L_u      = sum_k mean_batch (u_k - u_hat_k)^2,  u_hat_k = mean(tanh(|g_k(h_k) - target|)), a fixed target
    L_UAL    = sum_k mean_batch (1 - u_k) * mean (g_k(h_k) - target)^2

`lambda = beta = 1` by default (the paper's). In `L_UAL` the uncertainty is not detached, as the paper writes it: the
heads are pushed hardest where they are sure, and the UEM is pulled up where the head is wrong (balanced by `L_u`).
Frozen mode (the default) trains the heads only and leaves the denoiser bit-identical; joint mode trains both. All
heads' predictions come from one extra call of the denoiser that runs only its embeddings and output layer
(`exit_predictions`), so a step costs about one forward of the model, plus one backward in joint mode.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from diffusers import DDPMScheduler

from ..data.digits import DigitsSplit
from ..exits.heads import ExitHeads, block_outputs, exit_predictions
from ..validation import as_number
from .config import TrainConfig
from .denoiser import noised_batch, prepare_for_batches
from .loop import CHECKPOINT_NAME, TrainResult, optimise

logger = logging.getLogger(__name__)


def exit_head_losses(
    model: torch.nn.Module,
    heads: ExitHeads,
    noisy: torch.Tensor,
    timesteps: torch.Tensor,
    labels: torch.Tensor,
    target: torch.Tensor,
    joint: bool,
) -> dict[str, torch.Tensor]:
    """The three terms of the loss on one batch (`simple` is zero and costs nothing when not `joint`)."""
    channels = target.shape[1]
    with block_outputs(model) as outputs, torch.set_grad_enabled(joint and torch.is_grad_enabled()):
        final = model(noisy, timesteps, class_labels=labels).sample
    embedding = heads.embed(timesteps)
    predictions = exit_predictions(
        model,
        heads,
        outputs,
        embedding,
        lambda k: model(noisy.repeat(k, 1, 1, 1), timesteps.repeat(k), class_labels=labels.repeat(k)).sample,
    )
    errors = predictions[:, :, :channels] - target  # exit points x batch x C x H x W
    uncertainty = torch.stack(
        [heads.uncertainty(point, outputs[count - 1], embedding) for point, count in enumerate(heads.exit_blocks)]
    )
    pseudo = torch.tanh(errors.abs()).mean(dim=(2, 3, 4)).detach()
    squared = errors.pow(2).mean(dim=(2, 3, 4))
    simple = (final[:, :channels] - target).pow(2).mean() if joint else torch.zeros((), device=target.device)
    return {
        "simple": simple,
        "uncertainty": (uncertainty - pseudo).pow(2).sum(0).mean(),
        "layerwise": ((1 - uncertainty) * squared).sum(0).mean(),
    }


def train_exit_heads(
    model: torch.nn.Module,
    heads: ExitHeads,
    data: DigitsSplit,
    config: TrainConfig,
    out_dir: str | Path | None = None,
    joint: bool = False,
    uncertainty_weight: float = 1.0,
    layerwise_weight: float = 1.0,
    resume: bool = False,
    noise_scheduler: DDPMScheduler | None = None,
    progress: bool = True,
    device: str | torch.device = "cpu",
) -> TrainResult:
    """Train `heads` (and, when `joint`, `model`) in place on `data`; on return they hold the EMA weights.

    Args:
        model: A class-conditional DiT (see `null_class_label`) the heads are for.
        heads: Its exit heads (`ExitHeads(num_blocks, hidden_size)` for fresh ones).
        data: Training images in [-1, 1] and their labels.
        config: Hyper-parameters (steps, batch, learning rate, warm-up, EMA, class dropout, checkpoints, seed).
        out_dir: Where `checkpoint.pt` is written every `config.checkpoint_every` steps (`None`: no checkpoints).
        joint: Train the denoiser too (`L_simple` joins the loss); otherwise it stays frozen.
        uncertainty_weight: `lambda`, the weight of `L_u`.
        layerwise_weight: `beta`, the weight of `L_UAL`.
        resume: Continue from `out_dir/checkpoint.pt` (same settings) instead of starting over.
        noise_scheduler: The forward process and what the model predicts (its config's `prediction_type`).
        progress: Show a progress bar.
        device: Where the model and heads train (batches are drawn on the CPU, as in `train_denoiser`).
    """
    noise_scheduler = noise_scheduler or DDPMScheduler(num_train_timesteps=1000)
    weights = {
        "simple": 1.0,
        "uncertainty": as_number("uncertainty_weight", uncertainty_weight, low=0),
        "layerwise": as_number("layerwise_weight", layerwise_weight, low=0),
    }
    null_label = prepare_for_batches(model, noise_scheduler)
    model.to(device).requires_grad_(joint)
    heads.to(device)

    def batch_loss(generator: torch.Generator) -> torch.Tensor:
        batch = noised_batch(data, config, generator, noise_scheduler, null_label)
        noisy, timesteps, labels, target = (x.to(device) for x in batch)
        terms = exit_head_losses(model, heads, noisy, timesteps, labels, target, joint)
        return sum(weights[name] * term for name, term in terms.items())

    model.train(joint)  # a frozen model stays in eval mode; a jointly trained one is put in train mode
    try:
        return optimise(
            {"heads": heads, **({"model": model} if joint else {})},
            batch_loss,
            config,
            checkpoint=Path(out_dir) / CHECKPOINT_NAME if out_dir is not None else None,
            resume=resume,
            settings={"joint": joint, **weights},
            desc="training exit heads" + (" and model" if joint else ""),
            progress=progress,
        )
    finally:
        model.eval().requires_grad_(True)
