"""The VAE of `digits-flux`: a small `AutoencoderKL` trained on the digits, whose latents the Flux transformer learns.

1 x 32 x 32 images in [-1, 1] become `LATENT_CHANNELS` x 8 x 8 latents (three encoder levels: a scale factor of 4,
back to the 8 x 8 of the scans), which `FluxPipeline` packs into 4 x 4 = 16 tokens of 2x2 patches. Trained with the
reconstruction's mean squared error plus a small KL term (`kl_weight`, per latent element), which keeps the latents
smooth and bounded.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL

from ..data.digits import DIGITS_IMAGE_SIZE
from .config import TrainConfig
from .loop import TrainResult, optimise

VAE_BLOCK_OUT_CHANNELS = (16, 32, 32)
LATENT_CHANNELS = 4
VAE_CHECKPOINT_NAME = "vae_checkpoint.pt"


def build_digits_vae(seed: int = 0) -> AutoencoderKL:
    """A freshly initialised digits VAE: channels `VAE_BLOCK_OUT_CHANNELS`, one ResNet per level, attention in the
    middle block, `LATENT_CHANNELS` latent channels."""
    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=1,
        out_channels=1,
        down_block_types=("DownEncoderBlock2D",) * len(VAE_BLOCK_OUT_CHANNELS),
        up_block_types=("UpDecoderBlock2D",) * len(VAE_BLOCK_OUT_CHANNELS),
        block_out_channels=VAE_BLOCK_OUT_CHANNELS,
        layers_per_block=1,
        latent_channels=LATENT_CHANNELS,
        norm_num_groups=8,
        sample_size=DIGITS_IMAGE_SIZE,
    )


def vae_loss(
    vae: AutoencoderKL, images: torch.Tensor, generator: torch.Generator, kl_weight: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The reconstruction's mean squared error and the mean KL divergence per latent element of `images`, encoded
    with a posterior sample drawn from `generator` (a CPU generator serves any device); returns (loss, reconstruction
    error)."""
    posterior = vae.encode(images).latent_dist
    reconstruction = vae.decode(posterior.sample(generator)).sample
    error = F.mse_loss(reconstruction, images)
    kl = posterior.kl().sum() / posterior.mean.numel()
    return error + kl_weight * kl, error


def train_vae(
    vae: AutoencoderKL,
    images: torch.Tensor,
    config: TrainConfig,
    kl_weight: float = 1e-3,
    checkpoint: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
    device: str | torch.device = "cpu",
) -> TrainResult:
    """Train `vae` in place to reconstruct `images` (N, 1, H, W) in [-1, 1]; on return it holds its EMA weights.

    Batches and posterior samples are drawn on the CPU from one generator seeded with `config.seed` (saved in the
    checkpoint); `config.class_dropout` and the loss-weight settings do not apply.
    """
    if kl_weight < 0:
        raise ValueError(f"`kl_weight` must be >= 0, got {kl_weight}.")
    vae.to(device)

    def batch_loss(generator: torch.Generator) -> torch.Tensor:
        index = torch.randint(len(images), (config.batch_size,), generator=generator)
        loss, _ = vae_loss(vae, images[index].to(device), generator, kl_weight)
        return loss

    return optimise(
        {"model": vae},
        batch_loss,
        config,
        checkpoint=Path(checkpoint) if checkpoint is not None else None,
        resume=resume,
        settings={"kl_weight": kl_weight},
        desc="VAE",
        progress=progress,
    )


@torch.no_grad()
def encode_digits(
    vae: AutoencoderKL, images: torch.Tensor, batch_size: int = 256
) -> tuple[torch.Tensor, torch.Tensor]:
    """The posterior mean and standard deviation of each image's latent, on the CPU."""
    device = next(vae.parameters()).device
    means, stds = [], []
    for chunk in images.split(batch_size):
        posterior = vae.encode(chunk.to(device)).latent_dist
        means.append(posterior.mean.cpu())
        stds.append(posterior.std.cpu())
    return torch.cat(means), torch.cat(stds)


def latent_normalisation(means: torch.Tensor, stds: torch.Tensor) -> tuple[float, float]:
    """`(shift_factor, scaling_factor)` of the VAE config that give its latents mean 0 and variance 1 over the data
    (latents are `(z - shift_factor) * scaling_factor`; the variance counts the posterior's own)."""
    shift = means.mean()
    variance = (means - shift).pow(2).mean() + stds.pow(2).mean()
    return float(shift), float(variance.rsqrt())
