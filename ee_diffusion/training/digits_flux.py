"""`digits-flux`: a small text-to-image Flux model of the digits, trained here and saved as a stock `FluxPipeline`.

The parts: the word tokenizer and the two frozen text encoders of `digits_text`; the VAE of `digits_vae` (1 x 32 x 32
images to 4 x 8 x 8 latents, 16 tokens once packed); a `FluxTransformer2DModel` with 2 double-stream and 6
single-stream blocks, 64 wide (4 heads of 16), no guidance embedding; and `FlowMatchEulerDiscreteScheduler` with Flux's
dynamic shift. `train_digits_flux` trains the VAE, then the transformer on the VAE's latents with the rectified-flow
objective of `flow_matching`; `save_digits_flux_pipeline` writes its folder (transformer and VAE weights in fp16).
It samples with `pipe("a handwritten seven", height=32, width=32)`: `FluxPipeline`'s own default size is 128 latent
pixels a side (512 x 512 images here). Any `max_sequence_length` works (the transformer was trained for T5 sequences
of 8 to 512 tokens); `max_sequence_length=8` is the fast one (the default 512 runs 528 tokens per image, not 24).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

from ..data.digits import DIGITS_IMAGE_SIZE, NUM_CLASSES, DigitsSplit, digit_prompt, load_digits_split
from ..outputs import refuse_shipped
from ..schedules import ExitSchedule
from .config import TrainConfig
from .digits_models import drop_loaded_paths, save_safetensors_in_half
from .digits_text import (
    TEXT_HIDDEN_SIZE,
    TEXT_LENGTH,
    build_text_encoders,
    build_word_tokenizer,
)
from .digits_vae import LATENT_CHANNELS, build_digits_vae, encode_digits, latent_normalisation, train_vae
from .flow_matching import FlowMatchingConfig, LatentDigits, train_flow_transformer
from .loop import CHECKPOINT_NAME, TrainResult

logger = logging.getLogger(__name__)

VAE_CHECKPOINT = "vae/" + CHECKPOINT_NAME
# `FluxPipeline`'s own default step count, at which the shipped accuracy is measured.
DEFAULT_STEPS = 28
NULL_PROMPT = ""


@dataclass
class DigitsFluxConfig:
    """The `digits-flux` recipe (the defaults are the shipped one's, as `ee-diffusion train-flux` runs it): the VAE's
    training, then the transformer's.

    Args:
        vae: The VAE's steps, batch, learning rate, EMA and checkpoints (`class_dropout` does not apply).
        transformer: The transformer's; its `class_dropout` is the share of prompts replaced by the empty prompt.
        flow: How the flow stage draws noise levels and T5 sequence lengths.
        kl_weight: Weight of the VAE's KL term (per latent element) against its reconstruction error.
    """

    vae: TrainConfig = field(
        default_factory=lambda: TrainConfig(
            steps=600, batch_size=64, learning_rate=1e-3, warmup_steps=100, checkpoint_every=250
        )
    )
    transformer: TrainConfig = field(
        default_factory=lambda: TrainConfig(
            steps=4000, batch_size=128, learning_rate=1e-3, warmup_steps=100, checkpoint_every=250
        )
    )
    flow: FlowMatchingConfig = field(default_factory=FlowMatchingConfig)
    kl_weight: float = 1e-4


def build_digits_flux_transformer(seed: int = 0) -> FluxTransformer2DModel:
    """A freshly initialised digits Flux transformer: 2 double-stream and 6 single-stream blocks, 4 heads of 16
    (rotary axes 4 + 6 + 6), 16 channels per token (4 latent channels x 2x2), no guidance embedding."""
    torch.manual_seed(seed)
    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=4 * LATENT_CHANNELS,
        num_layers=2,
        num_single_layers=6,
        attention_head_dim=16,
        num_attention_heads=4,
        joint_attention_dim=TEXT_HIDDEN_SIZE,
        pooled_projection_dim=TEXT_HIDDEN_SIZE,
        guidance_embeds=False,
        axes_dims_rope=(4, 6, 6),
    )


def digits_flux_scheduler() -> FlowMatchEulerDiscreteScheduler:
    """Flux's scheduler settings: 1000 training steps, dynamic shift (`mu` from the token count: 0.46 at the 16 tokens
    of a 32 x 32 image), no static shift."""
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=True)


def build_digits_flux_pipeline(seed: int = 0, vae_seed: int = 0) -> FluxPipeline:
    """An untrained `digits-flux` pipeline: every part built from its config, seeded."""
    clip, t5 = build_text_encoders(seed)
    tokenizer = build_word_tokenizer()
    return FluxPipeline(
        scheduler=digits_flux_scheduler(),
        vae=build_digits_vae(vae_seed),
        text_encoder=clip,
        tokenizer=tokenizer,
        text_encoder_2=t5,
        tokenizer_2=tokenizer,
        transformer=build_digits_flux_transformer(seed),
    )


@torch.no_grad()
def prompt_tables(pipe: FluxPipeline, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The T5 sequences (P x `TEXT_LENGTH` x D) and pooled CLIP vectors (P x D') of `prompts`, on the CPU, exactly as
    `pipe(prompt, max_sequence_length=TEXT_LENGTH)` computes them, and which T5 tokens are padding (P x L)."""
    prompts = list(prompts)
    embeds, pooled, _ = pipe.encode_prompt(prompts, None, device=torch.device("cpu"), max_sequence_length=TEXT_LENGTH)
    ids = pipe.tokenizer_2(
        prompts, padding="max_length", max_length=TEXT_LENGTH, truncation=True, return_tensors="pt"
    ).input_ids
    return embeds.float(), pooled.float(), ids == pipe.tokenizer_2.pad_token_id


def latent_digits(pipe: FluxPipeline, labels: torch.Tensor, means: torch.Tensor, stds: torch.Tensor) -> LatentDigits:
    """The flow stage's data: the VAE posteriors of the digits (`means`, `stds`, normalised with the VAE's own
    `shift_factor` and `scaling_factor`), their prompts `"a handwritten <digit>"` (`labels`) and the empty prompt's
    row, read by `pipe`'s frozen text encoders."""
    prompts = [digit_prompt(label) for label in range(NUM_CLASSES)] + [NULL_PROMPT]
    embeds, pooled, padding = prompt_tables(pipe, prompts)
    return LatentDigits(
        means=means,
        stds=stds,
        prompts=labels,
        prompt_embeds=embeds,
        pooled_prompt_embeds=pooled,
        padding=padding,
        null_prompt=prompts.index(NULL_PROMPT),
        shift_factor=pipe.vae.config.shift_factor,
        scaling_factor=pipe.vae.config.scaling_factor,
    )


def train_digits_flux(
    pipe: FluxPipeline,
    config: DigitsFluxConfig,
    out_dir: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
    device: str | torch.device = "cpu",
) -> tuple[TrainResult, TrainResult]:
    """Train `pipe`'s VAE on the digits train split, set its latent `shift_factor` and `scaling_factor`, then train
    its transformer on the VAE's latents (prompts `"a handwritten <digit>"`); returns the two stages' results.

    Args:
        pipe: A pipeline of `build_digits_flux_pipeline` (its text encoders stay frozen).
        config: The recipe.
        out_dir: Where the checkpoints go (`vae/checkpoint.pt`, then `checkpoint.pt`); `None`: none.
        resume: Continue from the checkpoints in `out_dir`: a finished VAE stage is loaded, not run again.
        progress: Show progress bars.
        device: Where the models train; batches and noise are drawn on the CPU from the stages' seeded generators.
    """
    out = Path(out_dir) if out_dir is not None else None
    if out is not None:
        refuse_shipped(out)
    data = load_digits_split("train")
    vae_checkpoint = out / VAE_CHECKPOINT if out is not None else None
    vae_result = train_vae(
        pipe.vae,
        data.images,
        config.vae,
        kl_weight=config.kl_weight,
        checkpoint=vae_checkpoint,
        resume=resume and vae_checkpoint is not None and vae_checkpoint.exists(),
        progress=progress,
        device=device,
    )
    means, stds = encode_digits(pipe.vae, data.images)
    shift, scale = latent_normalisation(means, stds)
    pipe.vae.register_to_config(shift_factor=shift, scaling_factor=scale)
    logger.info("VAE latents: shift_factor %.4f, scaling_factor %.4f", shift, scale)
    checkpoint = out / CHECKPOINT_NAME if out is not None else None
    result = _train_transformer(
        pipe,
        data,
        means,
        stds,
        config.transformer,
        config.flow,
        checkpoint,
        resume=resume and checkpoint is not None and checkpoint.exists(),
        progress=progress,
        device=device,
    )
    return vae_result, result


def finetune_digits_flux(
    pipe: FluxPipeline,
    exit_schedule: ExitSchedule,
    config: TrainConfig,
    flow: FlowMatchingConfig | None = None,
    out_dir: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
    device: str | torch.device = "cpu",
) -> TrainResult:
    """ASE fine-tuning of a trained `digits-flux`: its transformer trains on the digits' latents (its VAE's, with the
    VAE's saved normalisation) under `exit_schedule`, with the flow-matching objective it was trained with; the VAE and
    the text encoders stay as they are. `config.freeze_timestep_embedding` freezes the timestep embedding, as ASE does.
    The checkpoint goes to `out_dir/checkpoint.pt` (`None`: none); `resume` continues from it."""
    out = Path(out_dir) if out_dir is not None else None
    if out is not None:
        refuse_shipped(out)
    if pipe.vae.config.shift_factor is None or pipe.vae.config.scaling_factor is None:
        raise ValueError("The VAE has no latent `shift_factor`/`scaling_factor`: fine-tune a trained digits-flux.")
    data = load_digits_split("train")
    means, stds = encode_digits(pipe.vae, data.images)
    checkpoint = out / CHECKPOINT_NAME if out is not None else None
    return _train_transformer(
        pipe,
        data,
        means,
        stds,
        config,
        flow,
        checkpoint,
        resume=resume,
        progress=progress,
        device=device,
        exit_schedule=exit_schedule,
    )


def _train_transformer(
    pipe: FluxPipeline,
    data: DigitsSplit,
    means: torch.Tensor,
    stds: torch.Tensor,
    config: TrainConfig,
    flow: FlowMatchingConfig | None,
    checkpoint: Path | None,
    resume: bool,
    progress: bool,
    device: str | torch.device,
    exit_schedule: ExitSchedule | None = None,
) -> TrainResult:
    """Train `pipe`'s transformer on the VAE posteriors (`means`, `stds`) of `data`'s digits with their prompts
    (under `exit_schedule`, if any), then move the pipeline back to the CPU."""
    result = train_flow_transformer(
        pipe.transformer,
        latent_digits(pipe, data.labels, means, stds),
        config,
        pipe.scheduler,
        flow=flow,
        checkpoint=checkpoint,
        resume=resume,
        progress=progress,
        device=device,
        exit_schedule=exit_schedule,
    )
    pipe.to("cpu")
    return result


def save_digits_flux_pipeline(pipe: FluxPipeline, out_dir: str | Path, card: str | None = None) -> None:
    """Save `pipe` as a `FluxPipeline` folder (transformer and VAE weights in fp16, the tiny text encoders in fp32)
    with a README card."""
    out = Path(out_dir)
    refuse_shipped(out)
    pipe.save_pretrained(out, safe_serialization=True)
    drop_loaded_paths(out)
    for component in ("transformer", "vae"):
        save_safetensors_in_half(out / component, "*.safetensors")
    prefix_clip_weights(out / "text_encoder")
    if card is not None:
        (out / "README.md").write_text(card)


def prefix_clip_weights(folder: Path) -> None:
    """Name the weights of a saved `CLIPTextModel` under `text_model.`, as transformers 5.0 reads them (later versions
    save them without the prefix and read both; 5.0 would start the encoder from random weights)."""
    from safetensors.torch import load_file, save_file

    for path in folder.glob("*.safetensors"):
        tensors = load_file(path)
        named = {name if name.startswith("text_model.") else f"text_model.{name}": v for name, v in tensors.items()}
        save_file(named, path, metadata={"format": "pt"})


@torch.no_grad()
def digits_flux_samples(
    pipe: FluxPipeline,
    labels: Sequence[int],
    num_inference_steps: int = DEFAULT_STEPS,
    true_cfg_scale: float = 1.0,
    batch_size: int = 100,
    seed: int = 0,
    max_sequence_length: int = TEXT_LENGTH,
) -> torch.Tensor:
    """Images in [0, 1] (N x 1 x 32 x 32) for the prompts of `labels`, from one generator seeded with `seed`
    (guided with `negative_prompt=""` when `true_cfg_scale > 1`)."""
    generator = torch.Generator().manual_seed(seed)
    images = []
    for start in range(0, len(labels), batch_size):
        prompts = [digit_prompt(label) for label in labels[start : start + batch_size]]
        guided = {"true_cfg_scale": true_cfg_scale, "negative_prompt": [NULL_PROMPT] * len(prompts)}
        images.append(
            pipe(
                prompts,
                height=DIGITS_IMAGE_SIZE,
                width=DIGITS_IMAGE_SIZE,
                num_inference_steps=num_inference_steps,
                max_sequence_length=max_sequence_length,
                generator=generator,
                output_type="pt",
                **(guided if true_cfg_scale > 1 else {}),
            ).images
        )
    return torch.cat(images)


def digits_flux_accuracy(
    pipe: FluxPipeline,
    num_samples: int = 100,
    num_inference_steps: int = DEFAULT_STEPS,
    true_cfg_scale: float = 1.0,
    seed: int = 0,
    max_sequence_length: int = TEXT_LENGTH,
) -> float:
    """Share of `num_samples` samples (the digits in turn, 0..9, 0..9, ...) that the shipped digits classifier
    assigns to the digit their prompt names."""
    from ..metrics import class_accuracy, load_digits_classifier

    if num_samples < 1:
        raise ValueError(f"`num_samples` must be at least 1, got {num_samples}.")
    labels = [i % NUM_CLASSES for i in range(num_samples)]
    images = digits_flux_samples(
        pipe,
        labels,
        num_inference_steps=num_inference_steps,
        true_cfg_scale=true_cfg_scale,
        seed=seed,
        max_sequence_length=max_sequence_length,
    )
    return class_accuracy(images, torch.tensor(labels), load_digits_classifier())
