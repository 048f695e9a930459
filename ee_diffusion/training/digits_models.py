"""The shipped digits denoisers: their architectures, their noise schedule, and how a trained one is saved.

Both are class-conditional, pixel-space (1 x 32 x 32, no VAE) and trained on `load_digits_split("train")` with the
1000-step linear-beta DDPM noise schedule. The DiT predicts the noise; the U-Net predicts the velocity
`v = sqrt(alpha_bar) * noise - sqrt(1 - alpha_bar) * x0` (see `digits_noise_scheduler`). The folders they are saved
in are drop-in pipeline folders: `EarlyExitDiTPipeline` / `EarlyExitUNet2DPipeline.from_pretrained(path)`, sampling
with 50-step DPM-Solver++ by default (any diffusers scheduler can be swapped in with `from_config`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import torch
from diffusers import DDPMScheduler, DiTTransformer2DModel, DPMSolverMultistepScheduler, UNet2DModel

from ..data.digits import DIGITS_IMAGE_SIZE, NUM_CLASSES
from ..exits import ExitHeads
from ..pipelines import EarlyExitDiTPipeline, EarlyExitUNet2DPipeline
from ..schedules import ExitSchedule
from .config import PREDICTION_TYPES

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


def digits_noise_scheduler(prediction_type: str = "epsilon") -> DDPMScheduler:
    """The training noise schedule: 1000 DDPM steps, linear betas 1e-4 to 0.02, and what the denoiser predicts.

    `"epsilon"` (the noise) is what `digits-dit` predicts. `"v_prediction"` is what `digits-unet` predicts: a
    noise-predicting model's clean-image estimate `(x_t - sqrt(1 - alpha_bar) * eps) / sqrt(alpha_bar)` multiplies
    its error by up to 160 at the noisiest step of this schedule; the digits U-Net's errors there put pixels at
    +-60, and Euler (which has no thresholding) never brought a third of the seeds back (62-73% class accuracy).
    A velocity-predicting model's estimate at those steps is its own output, so it stays in range.
    """
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"`prediction_type` must be one of {PREDICTION_TYPES}, got {prediction_type!r}.")
    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", prediction_type=prediction_type)


def save_digits_pipeline(
    denoiser: DiTTransformer2DModel | UNet2DModel,
    out_dir: str | Path,
    exit_schedule: ExitSchedule | None = None,
    card: str | None = None,
    noise_scheduler: DDPMScheduler | None = None,
    exit_heads: ExitHeads | None = None,
) -> EarlyExitDiTPipeline | EarlyExitUNet2DPipeline:
    """Save `denoiser` as a drop-in pipeline folder (fp16 safetensors), with its schedule or exit heads (a DiT's)
    and a README card.

    Its scheduler is DPM-Solver++ on the training `noise_scheduler`'s betas and prediction type (default:
    `digits_noise_scheduler()`).
    """
    noise_scheduler = noise_scheduler or digits_noise_scheduler()
    scheduler = DPMSolverMultistepScheduler.from_config(noise_scheduler.config, algorithm_type="dpmsolver++")
    if isinstance(denoiser, DiTTransformer2DModel):
        pipe = EarlyExitDiTPipeline(
            transformer=denoiser, vae=None, scheduler=scheduler, exit_schedule=exit_schedule, exit_heads=exit_heads
        )
    else:
        pipe = EarlyExitUNet2DPipeline(unet=denoiser, scheduler=scheduler, exit_schedule=exit_schedule)
    pipe.save_pretrained(out_dir, variant=None, safe_serialization=True)
    drop_loaded_paths(Path(out_dir))
    save_safetensors_in_half(Path(out_dir), "*/*.safetensors")
    if card is not None:
        (Path(out_dir) / "README.md").write_text(card)
    return pipe


def drop_loaded_paths(folder: Path) -> None:
    """Take `_name_or_path` (the folder a loaded pipeline or component came from, not the model's) out of a saved
    pipeline folder's `model_index.json` and components' `config.json`."""
    for path in [folder / "model_index.json", *folder.glob("*/config.json")]:
        config = json.loads(path.read_text())
        if config.pop("_name_or_path", None) is not None:
            path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def save_safetensors_in_half(folder: Path, pattern: str) -> None:
    """Store the weights of the safetensors files matching `pattern` in `folder` in fp16 (they load back into fp32
    models with `from_pretrained`)."""
    from safetensors.torch import load_file, save_file

    for path in folder.glob(pattern):
        tensors = {
            name: value.half() if value.is_floating_point() else value for name, value in load_file(path).items()
        }
        save_file(tensors, path, metadata={"format": "pt"})
