"""Helpers for the pipeline tests: tiny drop-in pipelines built from configs, and an independent depth recorder.

Everything is built in code (no Hub access). `DepthRecorder` measures the depth each denoiser call executed with plain
torch hooks only -- a forward pre-hook on the denoiser for the call's timestep and batch, and forward hooks on a
submodule of each unit that only its *real* forward runs (a transformer block's attention, a resnet's `conv1`, an
attention's `to_q`, a spatial transformer's `proj_in`) -- so it does not rely on the package's own counters.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DDPMScheduler,
    DiTTransformer2DModel,
    FlowMatchEulerDiscreteScheduler,
    PixArtTransformer2DModel,
    SD3Transformer2DModel,
    UNet2DConditionModel,
    UNet2DModel,
)
from diffusers.models.attention_processor import Attention
from diffusers.models.resnet import ResnetBlock2D
from diffusers.models.transformers.transformer_2d import Transformer2DModel

from ee_diffusion import (
    EarlyExitDDIMPipeline,
    EarlyExitDDPMPipeline,
    EarlyExitDiTPipeline,
    EarlyExitPixArtAlphaPipeline,
    EarlyExitStableDiffusion3Pipeline,
    EarlyExitStableDiffusionPipeline,
    ExitSchedule,
)
from tests.conftest import make_tiny_dit

NUM_DIT_BLOCKS = 4
NUM_PIXART_BLOCKS = 4
NUM_SD3_BLOCKS = 4
# Decoder units of the tiny U-Nets below, counted from their configs (see `decoder_units`):
# UNet2DModel: up_blocks = (AttnUpBlock2D, UpBlock2D), layers_per_block=1 -> 2 resnets + 2 attentions, 2 resnets.
NUM_UNET2D_UNITS = 6
# UNet2DConditionModel: up_blocks = (CrossAttnUpBlock2D, UpBlock2D) -> 2 resnets + 2 transformers, 2 resnets.
NUM_UNET_COND_UNITS = 6


# ---------------------------------------------------------------------------------------------- tiny components
def make_dit(num_layers: int = NUM_DIT_BLOCKS, sample_size: int = 8, seed: int = 0) -> DiTTransformer2DModel:
    return make_tiny_dit(num_layers=num_layers, sample_size=sample_size, seed=seed)


def make_vae(seed: int = 0, **overrides) -> AutoencoderKL:
    """A tiny 4-channel-latent VAE with two levels (vae_scale_factor 2)."""
    torch.manual_seed(seed)
    config = dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(4, 8),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=2,
        sample_size=16,
    )
    config.update(overrides)
    return AutoencoderKL(**config).eval()


def make_dit_pipe(exit_schedule: ExitSchedule | None = None, pipeline_cls=EarlyExitDiTPipeline, **kwargs):
    components = dict(transformer=make_dit(), vae=make_vae(), scheduler=DDIMScheduler(num_train_timesteps=1000))
    if exit_schedule is not None:
        components["exit_schedule"] = exit_schedule
    pipe = pipeline_cls(**components, **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def make_pixart_pipe(exit_schedule: ExitSchedule | None = None):
    torch.manual_seed(0)
    transformer = PixArtTransformer2DModel(
        sample_size=8,
        num_layers=NUM_PIXART_BLOCKS,
        patch_size=2,
        attention_head_dim=8,
        num_attention_heads=2,
        caption_channels=16,
        in_channels=4,
        cross_attention_dim=16,
        out_channels=8,
        attention_bias=True,
        activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000,
        norm_type="ada_norm_single",
        norm_elementwise_affine=False,
        norm_eps=1e-6,
    ).eval()
    pipe = EarlyExitPixArtAlphaPipeline(
        tokenizer=None,
        text_encoder=None,
        vae=make_vae(),
        transformer=transformer,
        scheduler=DDIMScheduler(num_train_timesteps=1000),
        exit_schedule=exit_schedule,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pixart_inputs(batch: int = 1, seq: int = 6) -> dict:
    g = torch.Generator().manual_seed(1)
    mask = torch.ones(batch, seq, dtype=torch.long)
    return dict(
        prompt_embeds=torch.randn(batch, seq, 16, generator=g),
        prompt_attention_mask=mask,
        negative_prompt_embeds=torch.randn(batch, seq, 16, generator=g),
        negative_prompt_attention_mask=mask.clone(),
        negative_prompt=None,
        use_resolution_binning=False,
    )


def make_sd3_pipe(exit_schedule: ExitSchedule | None = None):
    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(
        sample_size=8,
        patch_size=1,
        in_channels=4,
        num_layers=NUM_SD3_BLOCKS,
        attention_head_dim=8,
        num_attention_heads=2,
        caption_projection_dim=16,
        joint_attention_dim=16,
        pooled_projection_dim=16,
        out_channels=4,
    ).eval()
    vae = make_vae(shift_factor=0.0609, scaling_factor=1.5035, use_quant_conv=False, use_post_quant_conv=False)
    pipe = EarlyExitStableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=vae,
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=None,
        tokenizer_2=None,
        text_encoder_3=None,
        tokenizer_3=None,
        exit_schedule=exit_schedule,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sd3_inputs(batch: int = 1, seq: int = 6) -> dict:
    g = torch.Generator().manual_seed(1)
    return dict(
        prompt_embeds=torch.randn(batch, seq, 16, generator=g),
        negative_prompt_embeds=torch.randn(batch, seq, 16, generator=g),
        pooled_prompt_embeds=torch.randn(batch, 16, generator=g),
        negative_pooled_prompt_embeds=torch.randn(batch, 16, generator=g),
    )


def make_unet2d(seed: int = 0) -> UNet2DModel:
    torch.manual_seed(seed)
    return UNet2DModel(
        sample_size=8,
        in_channels=3,
        out_channels=3,
        layers_per_block=1,
        block_out_channels=(4, 8),
        norm_num_groups=4,
        attention_head_dim=4,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    ).eval()


def make_ddpm_pipe(exit_schedule: ExitSchedule | None = None, pipeline_cls=EarlyExitDDPMPipeline):
    components = dict(unet=make_unet2d(), scheduler=DDPMScheduler(num_train_timesteps=1000))
    if exit_schedule is not None:
        components["exit_schedule"] = exit_schedule
    pipe = pipeline_cls(**components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def make_ddim_pipe(exit_schedule: ExitSchedule | None = None):
    pipe = EarlyExitDDIMPipeline(
        unet=make_unet2d(), scheduler=DDIMScheduler(num_train_timesteps=1000), exit_schedule=exit_schedule
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def make_sd_pipe(exit_schedule: ExitSchedule | None = None):
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(4, 8),
        norm_num_groups=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=16,
        attention_head_dim=2,
    ).eval()
    pipe = EarlyExitStableDiffusionPipeline(
        vae=make_vae(),
        text_encoder=None,
        tokenizer=None,
        unet=unet,
        scheduler=DDIMScheduler(
            num_train_timesteps=1000,
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule="scaled_linear",
            clip_sample=False,
            steps_offset=1,
        ),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
        exit_schedule=exit_schedule,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sd_inputs(batch: int = 1, seq: int = 5) -> dict:
    g = torch.Generator().manual_seed(1)
    return dict(
        prompt_embeds=torch.randn(batch, seq, 16, generator=g),
        negative_prompt_embeds=torch.randn(batch, seq, 16, generator=g),
        height=16,
        width=16,
    )


def generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------------------------------- depth recording
def decoder_units(unet: torch.nn.Module) -> list[torch.nn.Module]:
    """The U-Net decoder's resnets and attentions in the order `up_block.forward` runs them (resnet, then its
    attention), derived here from the model structure, independently of the package's unit list."""
    units = []
    for up_block in unet.up_blocks:
        attentions = list(getattr(up_block, "attentions", None) or [])
        for i, resnet in enumerate(up_block.resnets):
            units.append(resnet)
            if i < len(attentions):
                units.append(attentions[i])
    return units


def work_module(unit: torch.nn.Module) -> torch.nn.Module:
    """A submodule that runs when, and only when, `unit` runs its real forward."""
    if isinstance(unit, ResnetBlock2D):
        return unit.conv1  # a skipped resnet may still run conv_shortcut, never conv1
    if isinstance(unit, Attention):
        return unit.to_q
    if isinstance(unit, Transformer2DModel):
        return unit.proj_in
    for name in ("attn1", "attn"):  # BasicTransformerBlock (DiT, PixArt) / JointTransformerBlock (SD3)
        if hasattr(unit, name):
            return getattr(unit, name)
    raise TypeError(f"no work module known for {type(unit).__name__}")


@dataclass
class RecordedCall:
    timesteps: list[float]
    batch: int
    ran: list[int] = field(default_factory=list)  # unit indices whose work module fired, in order

    @property
    def depth(self) -> int:
        return len(self.ran)


class DepthRecorder:
    """Per denoiser call: the timestep(s) and batch size it received and the units that really ran."""

    def __init__(self, denoiser: torch.nn.Module, units: list[torch.nn.Module]) -> None:
        self.calls: list[RecordedCall] = []
        self._handles = [denoiser.register_forward_pre_hook(self._pre_hook, with_kwargs=True)]
        for index, unit in enumerate(units):
            self._handles.append(work_module(unit).register_forward_hook(self._unit_hook(index)))

    @classmethod
    def for_transformer(cls, pipe) -> DepthRecorder:
        return cls(pipe.transformer, list(pipe.transformer.transformer_blocks))

    @classmethod
    def for_unet(cls, pipe) -> DepthRecorder:
        return cls(pipe.unet, decoder_units(pipe.unet))

    def _pre_hook(self, module, args, kwargs):
        timestep = kwargs["timestep"] if "timestep" in kwargs else args[1]
        sample = next(kwargs[k] for k in ("hidden_states", "sample") if k in kwargs) if not args else args[0]
        values = torch.as_tensor(timestep).detach().reshape(-1).float().cpu().tolist()
        self.calls.append(RecordedCall(timesteps=values, batch=sample.shape[0]))

    def _unit_hook(self, index: int):
        def hook(module, args, output):
            assert self.calls, "a unit ran outside any denoiser call"
            self.calls[-1].ran.append(index)

        return hook

    def reset(self) -> None:
        self.calls.clear()

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()

    @property
    def depths(self) -> list[int]:
        return [call.depth for call in self.calls]


def assert_depths_follow_schedule(
    recorder: DepthRecorder, schedule: ExitSchedule, num_train_timesteps: int, stats=None
) -> list[int]:
    """Each recorded call ran exactly units 0..d-1, once each, with d = schedule.blocks_at(t); `stats` (the package's
    own `ExitStats`), when given, records the same calls. Returns the per-call depths."""
    assert recorder.calls, "the denoiser was never called"
    depths = []
    for i, call in enumerate(recorder.calls):
        assert len(set(call.timesteps)) == 1, f"call {i}: samples with different timesteps {call.timesteps}"
        expected = schedule.blocks_at(call.timesteps[0], num_train_timesteps)
        assert call.ran == list(range(expected)), (
            f"call {i} at t={call.timesteps[0]}: units run {call.ran}, expected the first {expected}"
        )
        depths.append(call.depth)
    if stats is not None:
        assert stats.num_blocks == schedule.config.num_blocks
        assert len(stats.calls) == len(recorder.calls)
        for i, (mine, theirs) in enumerate(zip(recorder.calls, stats.calls)):
            assert list(theirs.timesteps) == pytest.approx(mine.timesteps, rel=0, abs=1e-4), f"call {i}"
            assert theirs.depths == (mine.depth,) * len(mine.timesteps), f"call {i}: {theirs.depths} vs {mine.depth}"
            assert theirs.units_executed == mine.depth, f"call {i}"
        assert stats.blocks_per_call == depths
        assert abs(stats.block_fraction - sum(depths) / (len(depths) * schedule.config.num_blocks)) < 1e-12
    return depths


def images_of(output) -> torch.Tensor:
    images = output.images
    return images if isinstance(images, torch.Tensor) else torch.from_numpy(images)


# ---------------------------------------------------------------------------------------------- one table of cases
@dataclass(frozen=True)
class PipelineCase:
    """How to build, instrument and call one drop-in pipeline."""

    name: str
    make: object  # (exit_schedule=None) -> pipeline
    num_units: int
    is_unet: bool
    guided: bool  # whether the pipeline has classifier-free guidance

    def recorder(self, pipe) -> DepthRecorder:
        return DepthRecorder.for_unet(pipe) if self.is_unet else DepthRecorder.for_transformer(pipe)

    def inputs(self, batch: int = 1, guidance: bool = False, steps: int = 4, seed: int = 0) -> dict:
        kwargs = dict(num_inference_steps=steps, generator=generator(seed), output_type="pt")
        if self.name == "dit":
            kwargs.update(class_labels=list(range(1, batch + 1)), guidance_scale=4.0 if guidance else 1.0)
        elif self.name == "pixart":
            kwargs.update(pixart_inputs(batch), guidance_scale=4.5 if guidance else 1.0)
        elif self.name == "sd3":
            kwargs.update(sd3_inputs(batch), guidance_scale=5.0 if guidance else 1.0)
        elif self.name == "sd":
            kwargs.update(sd_inputs(batch), guidance_scale=7.5 if guidance else 1.0)
        else:
            assert not guidance, f"{self.name} has no guidance"
            kwargs.update(batch_size=batch)
        return kwargs


CASES = {
    case.name: case
    for case in (
        PipelineCase("dit", make_dit_pipe, NUM_DIT_BLOCKS, is_unet=False, guided=True),
        PipelineCase("pixart", make_pixart_pipe, NUM_PIXART_BLOCKS, is_unet=False, guided=True),
        PipelineCase("sd3", make_sd3_pipe, NUM_SD3_BLOCKS, is_unet=False, guided=True),
        PipelineCase("ddpm", make_ddpm_pipe, NUM_UNET2D_UNITS, is_unet=True, guided=False),
        PipelineCase("ddim", make_ddim_pipe, NUM_UNET2D_UNITS, is_unet=True, guided=False),
        PipelineCase("sd", make_sd_pipe, NUM_UNET_COND_UNITS, is_unet=True, guided=True),
    )
}
