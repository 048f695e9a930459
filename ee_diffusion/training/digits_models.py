"""The shipped digits denoisers: their architectures, their noise schedule, and how a trained one is saved.

Both are class-conditional, pixel-space (1 x 32 x 32, no VAE) and trained on `load_digits_split("train")` with the
1000-step linear-beta DDPM noise schedule, predicting the noise. The folders they are saved in are drop-in pipeline
folders: `EarlyExitDiTPipeline` / `EarlyExitUNet2DPipeline.from_pretrained(path)`, sampling with 50-step
DPM-Solver++ by default (any diffusers scheduler can be swapped in with `from_config`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from diffusers import DDPMScheduler, DiTTransformer2DModel, DPMSolverMultistepScheduler, UNet2DModel

from ..data.digits import DIGITS_IMAGE_SIZE, NUM_CLASSES
from ..pipelines import EarlyExitDiTPipeline, EarlyExitUNet2DPipeline
from ..schedules import ExitSchedule

ARCHITECTURES = ("dit", "unet")


def build_digits_denoiser(arch: Literal["dit", "unet"], seed: int = 0) -> DiTTransformer2DModel | UNet2DModel:
    """A freshly initialised digits denoiser.

    `dit`: `DiTTransformer2DModel`, 12 blocks, hidden size 96 (3 heads of 32), patch 4 (64 tokens), fixed variance,
    10 classes plus its null class. `unet`: `UNet2DModel`, channels (16, 32, 64), 2 ResNets per level, attention at
    8x8 only, 11 class embeddings (10 digits and the null class); its decoder has 12 exit units.
    """
    torch.manual_seed(seed)
    if arch == "dit":
        return DiTTransformer2DModel(
            in_channels=1,
            out_channels=1,
            sample_size=DIGITS_IMAGE_SIZE,
            patch_size=4,
            num_layers=12,
            num_attention_heads=3,
            attention_head_dim=32,
            num_embeds_ada_norm=NUM_CLASSES,
        )
    if arch == "unet":
        return UNet2DModel(
            sample_size=DIGITS_IMAGE_SIZE,
            in_channels=1,
            out_channels=1,
            block_out_channels=(16, 32, 64),
            layers_per_block=2,
            down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
            up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
            norm_num_groups=8,
            attention_head_dim=32,
            num_class_embeds=NUM_CLASSES + 1,
        )
    raise ValueError(f"`arch` must be one of {ARCHITECTURES}, got {arch!r}.")


def digits_noise_scheduler() -> DDPMScheduler:
    """The training noise schedule: 1000 DDPM steps, linear betas 1e-4 to 0.02, epsilon prediction."""
    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", prediction_type="epsilon")


def save_digits_pipeline(
    denoiser: DiTTransformer2DModel | UNet2DModel,
    out_dir: str | Path,
    exit_schedule: ExitSchedule | None = None,
    card: str | None = None,
) -> EarlyExitDiTPipeline | EarlyExitUNet2DPipeline:
    """Save `denoiser` as a drop-in pipeline folder (fp16 safetensors), with its schedule and a README card."""
    # The digits U-Net's clean-image predictions leave [-1, 1] at the noisy steps, and DPM-Solver++ diverges on about
    # half the seeds from there (class accuracy 62% on 40 samples); Imagen's dynamic thresholding keeps them in the
    # data range (95%). The DiT needs none (100% either way); its shipped tables are measured without it.
    scheduler = DPMSolverMultistepScheduler.from_config(digits_noise_scheduler().config, algorithm_type="dpmsolver++",
                                                        thresholding=isinstance(denoiser, UNet2DModel))  # fmt: skip
    if isinstance(denoiser, DiTTransformer2DModel):
        pipe = EarlyExitDiTPipeline(transformer=denoiser, vae=None, scheduler=scheduler, exit_schedule=exit_schedule)
    else:
        pipe = EarlyExitUNet2DPipeline(unet=denoiser, scheduler=scheduler, exit_schedule=exit_schedule)
    pipe.save_pretrained(out_dir, variant=None, safe_serialization=True)
    _halve_weights(Path(out_dir))
    if card is not None:
        (Path(out_dir) / "README.md").write_text(card)
    return pipe


def _halve_weights(folder: Path) -> None:
    """Store the weights in fp16 (they load back into fp32 models with `from_pretrained`)."""
    from safetensors.torch import load_file, save_file

    for path in folder.glob("*/*.safetensors"):
        tensors = {name: value.half() if value.is_floating_point() else value for name, value in load_file(path).items()}
        save_file(tensors, path, metadata={"format": "pt"})
