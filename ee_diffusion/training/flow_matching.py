"""Rectified-flow training of a `FluxTransformer2DModel` on VAE latents, the way `FluxPipeline` samples it.

A batch: latents `x0` (drawn from each image's VAE posterior, normalised with the VAE's `shift_factor` and
`scaling_factor`, packed into 2x2 patches as the pipeline packs them), noise `n`, a noise level `sigma` per sample, the
noisy latents `x_t = (1 - sigma) x0 + sigma n`, and the target `n - x0` (the velocity the scheduler integrates from
`sigma = 1` to 0). `sigma` is drawn uniformly or logit-normally (`u = sigmoid(N(mean, std))`) and then shifted as the
pipeline's scheduler shifts its grid at the latents' token count (`mu` of `calculate_shift`, or the static `shift`).
The transformer sees `sigma` as its timestep (the pipeline passes `t / 1000`), the prompt's T5 sequence and pooled CLIP
vector (looked up in a table of the frozen encoders' outputs, as `FluxPipeline.encode_prompt` gives them), and the
pipeline's text and image position ids. The prompt is replaced by the empty prompt with probability
`config.class_dropout`, so `true_cfg_scale` with `negative_prompt=""` can guide.

Text lengths: `FluxPipeline` pads the T5 sequence to `max_sequence_length` (512 by default) and masks nothing. When the
text encoder treats each token alone (`digits_text`), the padding tokens are identical all through the transformer
(same input, same position id), so `k` of them weigh in attention exactly as one whose attention logit is raised by
`log k`. Training draws a text length per sample (the table's own length, or log-uniformly up to `max_text_length`)
and gives the table's padding tokens that raise through the attention mask: one model for any `max_sequence_length`,
at the cost of the table's length.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from diffusers.pipelines.flux.pipeline_flux import calculate_shift

from ..schedules import ExitSchedule
from .config import TrainConfig
from .loop import TrainResult, optimise, public_config
from .under_schedule import frozen_teacher, trained_groups, trained_under

SIGMA_SAMPLINGS = ("logit-normal", "uniform")


@dataclass
class FlowMatchingConfig:
    """How noise levels are drawn.

    Args:
        sigma_sampling: `"logit-normal"` (SD3's default: more steps at middle noise levels) or `"uniform"`; either is
            then shifted as the scheduler shifts its grid.
        logit_mean: Mean of the logit-normal's normal.
        logit_std: Standard deviation of the logit-normal's normal.
        max_text_length: The longest T5 sequence emulated (`FluxPipeline`'s `max_sequence_length`, at most 512); at
            or below the text table's length, none is.
        long_text_share: Share of samples given an emulated length (log-uniform between the table's and
            `max_text_length`); the others keep the table's.
    """

    sigma_sampling: Literal["logit-normal", "uniform"] = "logit-normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    max_text_length: int = 512
    long_text_share: float = 0.5

    def __post_init__(self) -> None:
        if self.sigma_sampling not in SIGMA_SAMPLINGS:
            raise ValueError(f"`sigma_sampling` must be one of {SIGMA_SAMPLINGS}, got {self.sigma_sampling!r}.")
        if not self.logit_std > 0:
            raise ValueError(f"`logit_std` must be > 0, got {self.logit_std}.")
        if not 1 <= self.max_text_length <= 512:
            raise ValueError(
                f"`max_text_length` must be in [1, 512] (FluxPipeline's limit), got {self.max_text_length}."
            )
        if not 0.0 <= self.long_text_share <= 1.0:
            raise ValueError(f"`long_text_share` must be in [0, 1], got {self.long_text_share}.")


@dataclass(frozen=True)
class LatentDigits:
    """The flow stage's data: each image's VAE posterior (`means`, `stds`: N x C x h x w, unnormalised; latents are
    `(z - shift_factor) * scaling_factor`), its prompt's row of the text tables (`prompts`: N), and the text tables
    (`prompt_embeds`: P x L x D from the T5 encoder, `pooled_prompt_embeds`: P x D' from the CLIP encoder, `padding`:
    P x L, which tokens are padding), whose row `null_prompt` is the empty prompt's."""

    means: torch.Tensor
    stds: torch.Tensor
    prompts: torch.Tensor
    prompt_embeds: torch.Tensor
    pooled_prompt_embeds: torch.Tensor
    padding: torch.Tensor
    null_prompt: int
    shift_factor: float
    scaling_factor: float

    def __len__(self) -> int:
        return len(self.prompts)


def image_shift(scheduler_config, image_seq_len: int) -> float:
    """`mu`, the shift exponent `FluxPipeline` gives the scheduler for latents of `image_seq_len` tokens."""
    return calculate_shift(
        image_seq_len,
        scheduler_config.get("base_image_seq_len", 256),
        scheduler_config.get("max_image_seq_len", 4096),
        scheduler_config.get("base_shift", 0.5),
        scheduler_config.get("max_shift", 1.15),
    )


def sample_sigmas(
    n: int,
    generator: torch.Generator,
    flow: FlowMatchingConfig,
    scheduler: FlowMatchEulerDiscreteScheduler,
    image_seq_len: int,
) -> torch.Tensor:
    """`n` noise levels in [0, 1]: uniform or logit-normal, then shifted as `scheduler` shifts its sampling grid in
    `FluxPipeline` (dynamically with `mu`, or by its static `shift`)."""
    if flow.sigma_sampling == "uniform":
        u = torch.rand(n, generator=generator)
    else:
        u = torch.sigmoid(flow.logit_mean + flow.logit_std * torch.randn(n, generator=generator))
    if scheduler.config.use_dynamic_shifting:
        return scheduler.time_shift(image_shift(scheduler.config, image_seq_len), 1.0, u)
    shift = scheduler.config.shift
    return shift * u / (1 + (shift - 1) * u)


def pack(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) latents as `FluxPipeline` packs them: (B, h/2 * w/2, 4C)."""
    batch, channels, height, width = latents.shape
    return FluxPipeline._pack_latents(latents, batch, channels, height, width)


def padding_bias(padding: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Attention-logit raises (B x L) that make the padding tokens of sequences of `L` tokens (`padding`: B x L) weigh
    as the padding of sequences of `lengths` tokens would: `log` of the padding tokens each stands for."""
    count = padding.sum(dim=1)
    multiplicity = (lengths - (padding.shape[1] - count)) / count.clamp(min=1)
    return torch.where(padding, multiplicity.clamp(min=1).log().unsqueeze(1), 0.0)


def sample_text_lengths(n: int, generator: torch.Generator, flow: FlowMatchingConfig, length: int) -> torch.Tensor:
    """`n` T5 sequence lengths: `length`, or with probability `flow.long_text_share` log-uniform in
    `[length, flow.max_text_length]`."""
    long = torch.rand(n, generator=generator) < flow.long_text_share
    top = max(flow.max_text_length, length)
    drawn = torch.exp(math.log(length) + (math.log(top) - math.log(length)) * torch.rand(n, generator=generator))
    return torch.where(long, drawn, torch.full((n,), float(length)))


def flux_velocity(
    transformer: FluxTransformer2DModel,
    packed: torch.Tensor,
    sigmas: torch.Tensor,
    prompt_embeds: torch.Tensor,
    pooled_prompt_embeds: torch.Tensor,
    grid: tuple[int, int],
    text_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """The transformer's output for packed latents of an `h x w` latent `grid`, called as `FluxPipeline` calls it;
    `text_bias` (B x L) raises the attention logits of the text tokens (`padding_bias`)."""
    device, dtype = packed.device, packed.dtype
    img_ids = FluxPipeline._prepare_latent_image_ids(None, grid[0] // 2, grid[1] // 2, device, dtype)
    txt_ids = torch.zeros(prompt_embeds.shape[1], 3, device=device, dtype=dtype)
    kwargs = None
    if text_bias is not None:  # Flux attends over [text tokens, image tokens]
        bias = torch.cat([text_bias.to(dtype), torch.zeros(packed.shape[:2], device=device, dtype=dtype)], dim=1)
        kwargs = {"attention_mask": bias[:, None, None, :]}
    return transformer(
        hidden_states=packed,
        timestep=sigmas.to(dtype),
        guidance=None,
        pooled_projections=pooled_prompt_embeds,
        encoder_hidden_states=prompt_embeds,
        txt_ids=txt_ids,
        img_ids=img_ids,
        joint_attention_kwargs=kwargs,
        return_dict=False,
    )[0]


def flow_batch(
    data: LatentDigits,
    config: TrainConfig,
    flow: FlowMatchingConfig,
    scheduler: FlowMatchEulerDiscreteScheduler,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A batch drawn on the CPU from `generator`: packed noisy latents, their sigmas, their prompt rows (dropped to
    the empty prompt with probability `config.class_dropout`), the packed target `noise - x0`, and the text tokens'
    attention raises of the sampled text lengths (`padding_bias`)."""
    index = torch.randint(len(data), (config.batch_size,), generator=generator)
    means, stds = data.means[index], data.stds[index]
    x0 = (means + stds * torch.randn(means.shape, generator=generator) - data.shift_factor) * data.scaling_factor
    prompts = data.prompts[index].clone()
    prompts[torch.rand(config.batch_size, generator=generator) < config.class_dropout] = data.null_prompt
    image_seq_len = x0.shape[2] * x0.shape[3] // 4
    sigmas = sample_sigmas(config.batch_size, generator, flow, scheduler, image_seq_len)
    noise = torch.randn(x0.shape, generator=generator)
    lengths = sample_text_lengths(config.batch_size, generator, flow, data.padding.shape[1])
    s = sigmas.view(-1, 1, 1, 1)
    return (
        pack((1 - s) * x0 + s * noise),
        sigmas,
        prompts,
        pack(noise - x0),
        padding_bias(data.padding[prompts], lengths),
    )


def train_flow_transformer(
    transformer: FluxTransformer2DModel,
    data: LatentDigits,
    config: TrainConfig,
    scheduler: FlowMatchEulerDiscreteScheduler,
    flow: FlowMatchingConfig | None = None,
    checkpoint: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
    device: str | torch.device = "cpu",
    exit_schedule: ExitSchedule | None = None,
) -> TrainResult:
    """Train `transformer` in place with the rectified-flow objective on `data`; on return it holds its EMA weights.

    Args:
        transformer: A `FluxTransformer2DModel` without a guidance embedding, whose `in_channels` are 4x the latents'.
        data: The VAE posteriors, prompts and text tables.
        config: Hyper-parameters; `class_dropout` is the share of prompts replaced by the empty prompt; the loss is
            unweighted (`loss_weight="constant"`); `target="teacher"` learns the velocity of a frozen copy of
            `transformer` at full depth instead of `noise - x0`.
        scheduler: The pipeline's scheduler, whose shift the noise levels follow.
        flow: How noise levels are drawn (default: logit-normal(0, 1), shifted).
        checkpoint: The checkpoint file (`None`: none).
        resume: Continue from `checkpoint`.
        progress: Show a progress bar.
        device: Where the transformer trains; batches are drawn on the CPU whatever the device.
        exit_schedule: Train under this schedule (ASE, `under_schedule`): each sample's output comes from the depth
            of its timestep `sigma * num_train_timesteps`; `config.freeze_timestep_embedding` freezes the embedding.
    """
    flow = flow or FlowMatchingConfig()
    if transformer.config.guidance_embeds:
        raise ValueError("`transformer` has a guidance embedding (`guidance_embeds=True`); this loop trains without.")
    if config.loss_weight != "constant":
        raise ValueError(
            f"Flow matching here is unweighted: `loss_weight` must be 'constant', got {config.loss_weight!r}."
        )
    channels = data.means.shape[1] * 4
    if transformer.config.in_channels != channels:
        raise ValueError(
            f"`transformer` takes {transformer.config.in_channels} channels per token; latents with "
            f"{data.means.shape[1]} channels pack into {channels}."
        )
    if not isinstance(scheduler, FlowMatchEulerDiscreteScheduler):
        raise TypeError(f"`scheduler` must be a FlowMatchEulerDiscreteScheduler, got {type(scheduler).__name__}.")
    transformer.to(device)
    grid = tuple(data.means.shape[2:])
    prompt_embeds, pooled = data.prompt_embeds.to(device), data.pooled_prompt_embeds.to(device)

    num_train_timesteps = scheduler.config.num_train_timesteps
    teacher = frozen_teacher(transformer, config.target)

    def batch_loss(generator: torch.Generator) -> torch.Tensor:
        batch = flow_batch(data, config, flow, scheduler, generator)
        noisy, sigmas, prompts, target, text_bias = (x.to(device) for x in batch)
        loss = torch.zeros((), device=device)
        for members in trained_groups(exit_schedule, batch[1] * num_train_timesteps, num_train_timesteps):
            members = members.to(device)
            rows = prompts[members]
            inputs = (noisy[members], sigmas[members], prompt_embeds[rows], pooled[rows], grid, text_bias[members])
            prediction = flux_velocity(transformer, *inputs)
            if teacher is None:
                wanted = target[members]
            else:
                with torch.no_grad():
                    wanted = flux_velocity(teacher, *inputs)
            loss = loss + (prediction - wanted).pow(2).mean() * (len(members) / config.batch_size)
        return loss

    settings = {**asdict(flow), "scheduler": public_config(scheduler.config), "latents": list(data.means.shape)}
    if exit_schedule is not None:
        settings["exit_schedule"] = exit_schedule.describe()
    if not math.isfinite(data.scaling_factor):
        raise ValueError(f"The latents' `scaling_factor` must be finite, got {data.scaling_factor}.")
    with trained_under(transformer, exit_schedule, num_train_timesteps, config.freeze_timestep_embedding) as after:
        return optimise(
            {"model": transformer},
            batch_loss,
            config,
            checkpoint=Path(checkpoint) if checkpoint is not None else None,
            resume=resume,
            settings=settings,
            desc="flow matching" if exit_schedule is None else "ASE fine-tuning",
            progress=progress,
            after_step=after,
        )
