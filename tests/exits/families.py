"""Tiny denoisers of the families the exit registry knows beyond DiT, PixArt and the U-Nets, built from configs with
`torch.manual_seed(0)`, and plain torch instruments that watch them.

Everything a test compares against is written here independently of the package: which block lists a model runs, in
which order (`Family.streams`), how its pipeline turns the scheduler's timestep `t` into the model's argument
(`Family.to_model`, copied from the pipelines' source), where its output layer reads the blocks' result
(`Family.output_layer`), and which submodule runs only when a block really runs (`work_module`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers import (
    ChromaTransformer2DModel,
    CogVideoXTransformer3DModel,
    Flux2Transformer2DModel,
    FluxTransformer2DModel,
    HunyuanVideoTransformer3DModel,
    LTXVideoTransformer3DModel,
    QwenImageTransformer2DModel,
    SanaTransformer2DModel,
    SD3Transformer2DModel,
    WanTransformer3DModel,
    ZImageTransformer2DModel,
)

BATCH = 2


def _randn(seed: int, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@dataclass(frozen=True)
class Family:
    """One denoiser class: a tiny model and how to call it, and what the tests know about it independently.

    `inputs(timestep, latents_seed, condition_seed)` builds one call's keyword arguments: the noisy sample from
    `latents_seed` (one per step: both calls of a step get the same), the conditioning from `condition_seed` (one per
    branch: cond and uncond differ).
    """

    name: str
    make: Callable[[], torch.nn.Module]
    inputs: Callable[[torch.Tensor, int, int], dict]
    streams: tuple[str, ...]  # block lists, in the order the forward runs them
    to_model: Callable[[float], float]  # the pipeline's conversion of the scheduler's timestep
    output_layer: str  # the module whose first input is the blocks' result
    timestep_key: str = "timestep"
    sample_key: str = "hidden_states"
    half_timestep: bool = False  # its pipeline casts the timestep to the latents' dtype (bf16 in practice)
    cache_context: bool = True  # the model has diffusers' `cache_context` (CacheMixin)

    def model_timestep(self, t: float, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """What the pipeline hands the model at scheduler timestep `t`, for the whole batch."""
        return torch.full((BATCH,), self.to_model(t), dtype=torch.float32).to(dtype)

    def units(self, model: torch.nn.Module) -> list[torch.nn.Module]:
        return [block for stream in self.streams for block in getattr(model, stream)]

    def output(self, model_output: Any) -> torch.Tensor:
        sample = model_output[0] if isinstance(model_output, tuple) else model_output.sample
        return torch.stack(sample) if isinstance(sample, list) else sample

    def call(self, model: torch.nn.Module, t: float, latents_seed: int = 0, condition_seed: int = 1) -> torch.Tensor:
        with torch.no_grad():
            return self.output(model(**self.inputs(self.model_timestep(t), latents_seed, condition_seed)))


def _flux_like(with_pooled: bool = True) -> Callable[[torch.Tensor, int, int], dict]:
    def inputs(timestep: torch.Tensor, latents_seed: int, condition_seed: int) -> dict:
        kwargs = dict(
            hidden_states=_randn(latents_seed, BATCH, 16, 4),
            encoder_hidden_states=_randn(condition_seed, BATCH, 5, 16),
            timestep=timestep,
            img_ids=torch.zeros(16, 3),
            txt_ids=torch.zeros(5, 3),
        )
        if with_pooled:
            kwargs["pooled_projections"] = _randn(condition_seed + 100, BATCH, 16)
        return kwargs

    return inputs


def make_flux() -> FluxTransformer2DModel:
    torch.manual_seed(0)
    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=4,
        num_layers=2,
        num_single_layers=2,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=16,
        pooled_projection_dim=16,
        axes_dims_rope=(4, 2, 2),
    ).eval()


def make_chroma() -> ChromaTransformer2DModel:
    torch.manual_seed(0)
    return ChromaTransformer2DModel(
        patch_size=1,
        in_channels=4,
        num_layers=2,
        num_single_layers=2,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=16,
        axes_dims_rope=(4, 2, 2),
        approximator_num_channels=8,
        approximator_hidden_dim=16,
        approximator_layers=1,
    ).eval()


def make_flux2() -> Flux2Transformer2DModel:
    torch.manual_seed(0)
    return Flux2Transformer2DModel(
        patch_size=1,
        in_channels=4,
        num_layers=2,
        num_single_layers=2,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=16,
        timestep_guidance_channels=16,
        axes_dims_rope=(2, 2, 2, 2),
    ).eval()


def flux2_inputs(timestep: torch.Tensor, latents_seed: int, condition_seed: int) -> dict:
    return dict(
        hidden_states=_randn(latents_seed, BATCH, 16, 4),
        encoder_hidden_states=_randn(condition_seed, BATCH, 5, 16),
        timestep=timestep,
        img_ids=torch.zeros(16, 4),
        txt_ids=torch.zeros(5, 4),
        guidance=torch.full((BATCH,), 3.5),
    )


def make_wan(seed: int = 0) -> WanTransformer3DModel:
    torch.manual_seed(seed)
    return WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=4,
        text_dim=16,
        freq_dim=16,
        ffn_dim=16,
        num_layers=3,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32,
    ).eval()


def wan_inputs(timestep: torch.Tensor, latents_seed: int, condition_seed: int) -> dict:
    return dict(
        hidden_states=_randn(latents_seed, BATCH, 4, 2, 4, 4),
        encoder_hidden_states=_randn(condition_seed, BATCH, 5, 16),
        timestep=timestep,
    )


def make_qwen() -> QwenImageTransformer2DModel:
    torch.manual_seed(0)
    return QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=16,
        out_channels=4,
        num_layers=3,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=16,
        axes_dims_rope=(2, 2, 4),
    ).eval()


def qwen_inputs(timestep: torch.Tensor, latents_seed: int, condition_seed: int) -> dict:
    return dict(
        hidden_states=_randn(latents_seed, BATCH, 16, 16),
        encoder_hidden_states=_randn(condition_seed, BATCH, 5, 16),
        encoder_hidden_states_mask=torch.ones(BATCH, 5, dtype=torch.long),
        timestep=timestep,
        img_shapes=[[(1, 4, 4)]] * BATCH,
    )


def make_hunyuan_video() -> HunyuanVideoTransformer3DModel:
    torch.manual_seed(0)
    return HunyuanVideoTransformer3DModel(
        in_channels=4,
        out_channels=4,
        num_attention_heads=2,
        attention_head_dim=8,
        num_layers=2,
        num_single_layers=2,
        num_refiner_layers=1,
        patch_size=1,
        patch_size_t=1,
        guidance_embeds=True,
        text_embed_dim=16,
        pooled_projection_dim=8,
        rope_axes_dim=(2, 2, 4),
    ).eval()


def hunyuan_video_inputs(timestep: torch.Tensor, latents_seed: int, condition_seed: int) -> dict:
    return dict(
        hidden_states=_randn(latents_seed, BATCH, 4, 1, 4, 4),
        encoder_hidden_states=_randn(condition_seed, BATCH, 5, 16),
        encoder_attention_mask=torch.ones(BATCH, 5),
        pooled_projections=_randn(condition_seed + 100, BATCH, 8),
        timestep=timestep,
        guidance=torch.full((BATCH,), 6000.0),
    )


def make_ltx() -> LTXVideoTransformer3DModel:
    torch.manual_seed(0)
    return LTXVideoTransformer3DModel(
        in_channels=4,
        out_channels=4,
        num_attention_heads=2,
        attention_head_dim=8,
        cross_attention_dim=16,
        num_layers=3,
        caption_channels=16,
    ).eval()


def ltx_inputs(timestep: torch.Tensor, latents_seed: int, condition_seed: int) -> dict:
    return dict(
        hidden_states=_randn(latents_seed, BATCH, 16, 4),
        encoder_hidden_states=_randn(condition_seed, BATCH, 5, 16),
        encoder_attention_mask=torch.ones(BATCH, 5),
        timestep=timestep,
        num_frames=1,
        height=4,
        width=4,
    )


def make_cogvideox() -> CogVideoXTransformer3DModel:
    torch.manual_seed(0)
    return CogVideoXTransformer3DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=4,
        time_embed_dim=4,
        text_embed_dim=16,
        num_layers=3,
        sample_width=8,
        sample_height=8,
        sample_frames=1,
        patch_size=2,
        temporal_compression_ratio=4,
        max_text_seq_length=5,
    ).eval()


def cogvideox_inputs(timestep: torch.Tensor, latents_seed: int, condition_seed: int) -> dict:
    return dict(
        hidden_states=_randn(latents_seed, BATCH, 1, 4, 8, 8),
        encoder_hidden_states=_randn(condition_seed, BATCH, 5, 16),
        timestep=timestep,
    )


def make_sana() -> SanaTransformer2DModel:
    torch.manual_seed(0)
    return SanaTransformer2DModel(
        patch_size=1,
        in_channels=4,
        out_channels=4,
        num_layers=3,
        attention_head_dim=4,
        num_attention_heads=2,
        num_cross_attention_heads=2,
        cross_attention_head_dim=4,
        cross_attention_dim=8,
        caption_channels=8,
        sample_size=4,
    ).eval()


def sana_inputs(timestep: torch.Tensor, latents_seed: int, condition_seed: int) -> dict:
    return dict(
        hidden_states=_randn(latents_seed, BATCH, 4, 4, 4),
        encoder_hidden_states=_randn(condition_seed, BATCH, 5, 8),
        timestep=timestep,
    )


def make_z_image() -> ZImageTransformer2DModel:
    torch.manual_seed(0)
    return ZImageTransformer2DModel(
        all_patch_size=(2,),
        all_f_patch_size=(1,),
        in_channels=4,
        dim=16,
        n_layers=3,
        n_refiner_layers=1,
        n_heads=2,
        n_kv_heads=2,
        qk_norm=True,
        cap_feat_dim=16,
        axes_dims=[4, 2, 2],
        axes_lens=[64, 16, 16],
    ).eval()


def z_image_inputs(timestep: torch.Tensor, latents_seed: int, condition_seed: int) -> dict:
    """Z-Image's pipeline hands its transformer lists of per-sample tensors, positionally named `x` and `cap_feats`."""
    latents = _randn(latents_seed, BATCH, 4, 1, 4, 4)
    captions = _randn(condition_seed, BATCH, 5, 16)
    return dict(x=list(latents.unbind(0)), t=timestep, cap_feats=list(captions.unbind(0)))


def make_sd35() -> SD3Transformer2DModel:
    """SD3.5's configuration: dual attention in the first layers, RMS qk norm (SD3.5 Medium's shape, tiny)."""
    torch.manual_seed(0)
    return SD3Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=4,
        num_layers=3,
        attention_head_dim=8,
        num_attention_heads=2,
        caption_projection_dim=16,
        joint_attention_dim=16,
        pooled_projection_dim=16,
        out_channels=4,
        dual_attention_layers=(0, 1),
        qk_norm="rms_norm",
        pos_embed_max_size=8,
    ).eval()


def sd35_inputs(timestep: torch.Tensor, latents_seed: int, condition_seed: int) -> dict:
    return dict(
        hidden_states=_randn(latents_seed, BATCH, 4, 8, 8),
        encoder_hidden_states=_randn(condition_seed, BATCH, 5, 16),
        pooled_projections=_randn(condition_seed + 100, BATCH, 16),
        timestep=timestep,
    )


def _over_1000(t: float) -> float:  # FluxPipeline, Flux2Pipeline, ChromaPipeline, QwenImagePipeline: `timestep / 1000`
    return t / 1000


def _as_is(t: float) -> float:
    return t


def _z_image(t: float) -> float:  # ZImagePipeline: `(1000 - timestep) / 1000`
    return (1000 - t) / 1000


DOUBLE_SINGLE = ("transformer_blocks", "single_transformer_blocks")
FAMILIES = {
    family.name: family
    for family in (
        Family("flux", make_flux, _flux_like(), DOUBLE_SINGLE, _over_1000, "norm_out", half_timestep=True),
        Family("chroma", make_chroma, _flux_like(False), DOUBLE_SINGLE, _over_1000, "norm_out", half_timestep=True),
        Family("flux2", make_flux2, flux2_inputs, DOUBLE_SINGLE, _over_1000, "norm_out", half_timestep=True),
        Family("wan", make_wan, wan_inputs, ("blocks",), _as_is, "norm_out"),
        Family(
            "qwen-image", make_qwen, qwen_inputs, ("transformer_blocks",), _over_1000, "norm_out", half_timestep=True
        ),
        Family(
            "hunyuan-video",
            make_hunyuan_video,
            hunyuan_video_inputs,
            DOUBLE_SINGLE,
            _as_is,
            "norm_out",
            half_timestep=True,
        ),
        Family("ltx-video", make_ltx, ltx_inputs, ("transformer_blocks",), _as_is, "norm_out"),
        Family("cogvideox", make_cogvideox, cogvideox_inputs, ("transformer_blocks",), _as_is, "norm_final"),
        Family("sana", make_sana, sana_inputs, ("transformer_blocks",), _as_is, "norm_out", cache_context=False),
        Family(
            "z-image",
            make_z_image,
            z_image_inputs,
            ("layers",),
            _z_image,
            "all_final_layer.2-1",
            timestep_key="t",
            sample_key="x",
            cache_context=False,
        ),
        Family("sd3.5", make_sd35, sd35_inputs, ("transformer_blocks",), _as_is, "norm_out", cache_context=False),
    )
}


def work_module(unit: torch.nn.Module) -> torch.nn.Module:
    """A submodule that runs when, and only when, `unit` runs its real forward: its (first) attention."""
    for name in ("attn1", "attn", "attention"):
        if hasattr(unit, name):
            return getattr(unit, name)
    raise TypeError(f"no work module known for {type(unit).__name__}")


def _first(args: tuple, kwargs: dict, name: str) -> torch.Tensor:
    return kwargs[name] if name in kwargs else args[0]


@dataclass
class Call:
    ran: list[int] = field(default_factory=list)  # unit indices whose work module fired, in order
    start: torch.Tensor | None = None  # the image stream entering the first unit
    end: torch.Tensor | None = None  # the blocks' result, as the output layer receives it


class Recorder:
    """Per denoiser call, with plain torch hooks only: the units that really ran, the hidden state entering the first
    unit (the image stream, as the model hands it to the block) and the one the output layer receives."""

    def __init__(self, family: Family, model: torch.nn.Module) -> None:
        self.calls: list[Call] = []
        units = family.units(model)
        key = "x" if family.sample_key == "x" else "hidden_states"
        self._handles = [
            model.register_forward_pre_hook(lambda module, args: self.calls.append(Call())),
            units[0].register_forward_pre_hook(
                lambda module, args, kwargs: setattr(self.calls[-1], "start", _first(args, kwargs, key)),
                with_kwargs=True,
            ),
            model.get_submodule(family.output_layer).register_forward_pre_hook(
                lambda module, args, kwargs: setattr(self.calls[-1], "end", _first(args, kwargs, "hidden_states")),
                with_kwargs=True,
            ),
        ]
        for index, unit in enumerate(units):
            self._handles.append(work_module(unit).register_forward_hook(self._ran(index)))

    def _ran(self, index: int) -> Callable:
        def hook(module: torch.nn.Module, args: tuple, output: Any) -> None:
            self.calls[-1].ran.append(index)

        return hook

    @property
    def depths(self) -> list[int]:
        return [len(call.ran) for call in self.calls]

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
