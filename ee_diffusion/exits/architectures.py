"""Which units of each denoiser class an exit schedule may skip, what a skipped unit returns, and which timestep the
denoiser receives.

One registry, keyed by model class. An entry lists the skippable units of a model in execution order; the exit hook
runs the first `depth` of them and replaces the rest by their *skip output*:

- Transformer denoisers: the units are the transformer blocks, in the order the model's forward runs them; a model
  with a double-stream then a single-stream stack (Flux, Chroma, Flux2, HunyuanVideo) has one list, the double-stream
  blocks first. A skipped block returns its input unchanged, in the order the model's forward unpacks its output, so
  the model's own output layer reads the hidden state of the last block run (ASE's exit). Blocks are never removed
  from the model: DiT's forward reads `transformer_blocks[0]` after the loop, and SD3's last block stays
  `context_pre_only`, since skipped blocks hand `(encoder_hidden_states, hidden_states)` back in the order its
  forward unpacks. Each entry's docstring below says why no unit of its model has to keep running.
- U-Nets (`UNet2DModel`, `UNet2DConditionModel`): dropping trailing blocks would drop the decoder layers that consume
  the encoder's skip connections. The units are instead the decoder's (`up_blocks`) resnets and attentions, in
  execution order, so the trailing units are the high-resolution end of the decoder. A skipped resnet keeps only its
  1x1 `conv_shortcut`, the linear layer that merges the concatenated encoder skip (ASE keeps U-ViT's skip-merging
  linear layers the same way), and drops both 3x3 convolutions; a skipped attention returns its residual input.
  Upsamplers, the encoder, the mid block and the output convolution always run.

Modules that are not units always run: the embedders, HunyuanVideo's token refiner (its `context_embedder`), Z-Image's
noise and context refiners, the output layers.

Timesteps: an `ExitSchedule` reads the position `s = t / num_train_timesteps` of the pipeline scheduler's timestep `t`
(1 = noise). Not every pipeline hands its denoiser `t`: Flux, Flux2, Chroma and Qwen-Image pass `t / 1000`, Z-Image
`(1000 - t) / 1000` (1 at the clean end), Sana `t * timestep_scale`. Each entry states its model's
`TimestepConvention`, and the hook converts the model's argument back to `t` before the schedule sees it, so a plan
(whose steps are the scheduler's timesteps) matches at run time whatever the model receives.

Register another class with `register_exit_architecture(cls, ExitArchitecture(units=...))`; units whose class is
known to diffusers' transformer-block registry, and resnets and attentions, need no skip function of their own.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from diffusers import (
    ChromaTransformer2DModel,
    CogVideoXTransformer3DModel,
    DiTTransformer2DModel,
    Flux2Transformer2DModel,
    FluxTransformer2DModel,
    HunyuanVideoTransformer3DModel,
    LTXVideoTransformer3DModel,
    PixArtTransformer2DModel,
    QwenImageTransformer2DModel,
    SanaTransformer2DModel,
    SD3Transformer2DModel,
    UNet2DConditionModel,
    UNet2DModel,
    WanTransformer3DModel,
    ZImageTransformer2DModel,
)
from diffusers.hooks._helpers import TransformerBlockRegistry
from diffusers.models.attention_processor import Attention
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.resnet import ResnetBlock2D
from diffusers.models.transformers.transformer_2d import Transformer2DModel
from diffusers.models.transformers.transformer_chroma import ChromaTransformerBlock

SkipFn = Callable[[torch.nn.Module, tuple, dict], Any]


@dataclass(frozen=True)
class TimestepConvention:
    """How a denoiser's timestep argument relates to its pipeline scheduler's timestep `t` (in
    `[0, num_train_timesteps]`, high at the noise end).

    Args:
        divisor: The model receives `t / divisor` (1 for `t` itself; 1000 for Flux's `t / 1000`).
        reversed: The model receives `(divisor - t) / divisor` instead: high at the clean end (Z-Image).
    """

    divisor: float = 1.0
    reversed: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.divisor, bool) or not isinstance(self.divisor, (int, float)):
            raise TypeError(f"`divisor` must be a positive number, got {self.divisor!r}.")
        if not self.divisor > 0:
            raise ValueError(f"`divisor` must be a positive number, got {self.divisor!r}.")

    def to_scheduler(self, value: float) -> float:
        """The scheduler timestep `t` of a value the model received."""
        return self.divisor * (1.0 - value) if self.reversed else value * self.divisor

    def to_model(self, t: float) -> float:
        """What the model receives at scheduler timestep `t`."""
        return (self.divisor - t) / self.divisor if self.reversed else t / self.divisor

    def describe(self) -> str:
        """The convention as a formula of the scheduler's `t`."""
        if self.reversed:
            return f"({self.divisor:g} - t) / {self.divisor:g}"
        return "t" if self.divisor == 1 else f"t / {self.divisor:g}"


SCHEDULER_TIMESTEP = TimestepConvention()
TIMESTEP_OVER_1000 = TimestepConvention(divisor=1000.0)
REVERSED_TIMESTEP_OVER_1000 = TimestepConvention(divisor=1000.0, reversed=True)


@dataclass(frozen=True)
class ExitArchitecture:
    """How early exit applies to one denoiser class.

    Args:
        units: Returns the skippable units of a model instance, in execution order.
        skip: Returns what a skipped unit outputs, from `(unit, args, kwargs)` of its call. `None` picks the built-in
            rule for the unit's class (transformer blocks known to diffusers, `ResnetBlock2D`, `Attention`,
            `Transformer2DModel`).
        timestep_argument: Name of the denoiser's forward argument that carries the timestep.
        sample_argument: Name of the denoiser's forward argument that carries the noisy sample (a tensor whose first
            dimension is the batch, or a list of per-sample tensors).
        reuse: What a plan's reuse step reuses: `"residual"`, the last computed step's change across the units
            (the last unit's output minus what it would have received with every unit skipped), added to what the
            last unit receives at the reuse step -- for units whose input and output have one shape, like transformer
            blocks; or `"output"`, the last computed step's whole prediction (a U-Net's decoder units change shape, so
            they have no residual span).
        timestep_convention: What the denoiser receives as its timestep (`TimestepConvention`), or a function of the
            model returning it (Sana's depends on its config).
        bridge: Under `"residual"` reuse, what the model's own code makes of the first unit's skip output on its way
            to the last unit when every unit is skipped, `(model, start) -> start`; `None`: it arrives unchanged.
            Flux2 and Chroma concatenate the text and image streams before their single-stream blocks.
        runs_all_units: `(args, kwargs) -> bool` of a denoiser call: whether that call must run every unit whatever
            the schedule says (Flux2's KV-cache extract call stores each block's keys and values for later steps).
    """

    units: Callable[[torch.nn.Module], list[torch.nn.Module]]
    skip: SkipFn | None = None
    timestep_argument: str = "timestep"
    sample_argument: str = "hidden_states"
    reuse: str = "output"
    timestep_convention: TimestepConvention | Callable[[torch.nn.Module], TimestepConvention] = SCHEDULER_TIMESTEP
    bridge: Callable[[torch.nn.Module, Any], Any] | None = None
    runs_all_units: Callable[[tuple, dict], bool] | None = None

    def __post_init__(self) -> None:
        if self.reuse not in ("residual", "output"):
            raise ValueError(f"`reuse` must be 'residual' or 'output', got {self.reuse!r}.")
        if not isinstance(self.timestep_convention, TimestepConvention) and not callable(self.timestep_convention):
            raise TypeError(
                "`timestep_convention` must be a TimestepConvention or a function of the model returning one, got "
                f"{type(self.timestep_convention).__name__}."
            )

    def convention_of(self, model: torch.nn.Module) -> TimestepConvention:
        """The timestep convention of `model`."""
        convention = self.timestep_convention
        if isinstance(convention, TimestepConvention):
            return convention
        convention = convention(model)
        if not isinstance(convention, TimestepConvention):
            raise TypeError(
                f"The timestep convention of {type(model).__name__} must be a TimestepConvention, got "
                f"{type(convention).__name__}."
            )
        return convention


@functools.cache
def _parameter_index(cls: type, name: str) -> int:
    return list(inspect.signature(cls.forward).parameters).index(name) - 1


def _argument(module: torch.nn.Module, name: str, args: tuple, kwargs: dict) -> Any:
    if name in kwargs:
        return kwargs[name]
    index = _parameter_index(type(module), name)
    if index >= len(args):
        raise ValueError(f"{type(module).__name__} was called without its `{name}` argument.")
    return args[index]


def _skip_transformer_block(block: torch.nn.Module, args: tuple, kwargs: dict) -> Any:
    metadata = TransformerBlockRegistry.get(type(block))
    hidden_states = metadata._get_parameter_from_args_kwargs(metadata.hidden_states_argument_name, args, kwargs)
    if metadata.return_encoder_hidden_states_index is None:
        return hidden_states
    encoder_hidden_states = metadata._get_parameter_from_args_kwargs(
        metadata.encoder_hidden_states_argument_name, args, kwargs
    )
    output = [None, None]
    output[metadata.return_hidden_states_index] = hidden_states
    output[metadata.return_encoder_hidden_states_index] = encoder_hidden_states
    return tuple(output)


def _skip_resnet(resnet: ResnetBlock2D, args: tuple, kwargs: dict) -> torch.Tensor:
    shortcut = _argument(resnet, "input_tensor", args, kwargs)
    if resnet.conv_shortcut is not None:
        shortcut = resnet.conv_shortcut(shortcut)
    return shortcut / resnet.output_scale_factor


def _skip_attention(attention: Attention, args: tuple, kwargs: dict) -> torch.Tensor:
    return _argument(attention, "hidden_states", args, kwargs) / attention.rescale_output_factor


def _skip_transformer_2d(transformer: Transformer2DModel, args: tuple, kwargs: dict) -> Any:
    hidden_states = _argument(transformer, "hidden_states", args, kwargs)
    if kwargs.get("return_dict", True):
        return Transformer2DModelOutput(sample=hidden_states)
    return (hidden_states,)


def default_skip(unit: torch.nn.Module, args: tuple, kwargs: dict) -> Any:
    """The built-in skip output of a unit, chosen by its class."""
    if isinstance(unit, ResnetBlock2D):
        return _skip_resnet(unit, args, kwargs)
    if isinstance(unit, Attention):
        return _skip_attention(unit, args, kwargs)
    if isinstance(unit, Transformer2DModel):
        return _skip_transformer_2d(unit, args, kwargs)
    try:
        TransformerBlockRegistry.get(type(unit))
    except ValueError:
        raise TypeError(
            f"No skip rule for units of class {type(unit).__name__}; give the architecture's `ExitArchitecture` a "
            "`skip` function."
        ) from None
    return _skip_transformer_block(unit, args, kwargs)


def _returns_argument(name: str) -> SkipFn:
    """A skip rule for blocks that return one tensor: their argument `name`, unchanged."""

    def skip(unit: torch.nn.Module, args: tuple, kwargs: dict) -> Any:
        return _argument(unit, name, args, kwargs)

    skip.__doc__ = f"A skipped unit returns its `{name}` argument unchanged."
    return skip


def _skip_chroma(block: torch.nn.Module, args: tuple, kwargs: dict) -> Any:
    """Chroma's blocks are not in diffusers' block registry: a double-stream block returns
    `(encoder_hidden_states, hidden_states)`, a single-stream block the joint `hidden_states`."""
    hidden_states = _argument(block, "hidden_states", args, kwargs)
    if isinstance(block, ChromaTransformerBlock):
        return _argument(block, "encoder_hidden_states", args, kwargs), hidden_states
    return hidden_states


def _transformer_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    return list(model.transformer_blocks)


def _double_then_single(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [*model.transformer_blocks, *model.single_transformer_blocks]


def _wan_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    return list(model.blocks)


def _z_image_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    return list(model.layers)


def _join_text_and_image(model: torch.nn.Module, start: Any) -> Any:
    """Flux2's and Chroma's forward, between the streams: `torch.cat([encoder_hidden_states, hidden_states], dim=1)`
    (only when both streams have blocks: otherwise the first and last unit are of one stream)."""
    if model.transformer_blocks and model.single_transformer_blocks:
        encoder_hidden_states, hidden_states = start
        return torch.cat([encoder_hidden_states, hidden_states], dim=1)
    return start


def _flux2_kv_extract(args: tuple, kwargs: dict) -> bool:
    """Flux2's KV-cache extract call (`kv_cache_mode="extract"`, Flux2KleinKVPipeline's first step) stores every
    block's reference keys and values for the later steps: a skipped block would leave its cache empty."""
    return kwargs.get("kv_cache_mode") == "extract"


def _unet_decoder_units(model: torch.nn.Module) -> list[torch.nn.Module]:
    units = []
    for up_block in model.up_blocks:
        attentions = getattr(up_block, "attentions", None) or [None] * len(up_block.resnets)
        for resnet, attention in zip(up_block.resnets, attentions):
            if isinstance(resnet, ResnetBlock2D) and resnet.upsample is None and resnet.downsample is None:
                units.append(resnet)
            if isinstance(attention, Transformer2DModel) or (
                isinstance(attention, Attention) and attention.residual_connection
            ):
                units.append(attention)
    return units


def _sana_convention(model: torch.nn.Module) -> TimestepConvention:
    """SanaPipeline passes `t * transformer.config.timestep_scale` (1.0 for Sana; other values for its variants)."""
    scale = float(getattr(model.config, "timestep_scale", 1.0) or 1.0)
    return TimestepConvention(divisor=1.0 / scale)


# One entry per class. Why no unit has to keep running, per model (read from its diffusers 0.42 forward):
# - DiT, PixArt, LTX-Video, Sana, Wan: one stream of blocks that each return the hidden state; the output layer reads
#   the last one's. (DiT's forward reads `transformer_blocks[0].norm1` after its loop: a module, not an output.)
# - SD3 / SD3.5 (dual attention layers, qk norm: the same `JointTransformerBlock` class), CogVideoX, Qwen-Image: one
#   stream of joint blocks returning both streams; the forward keeps only the image stream (SD3's last block is
#   `context_pre_only`: a skipped one hands the text stream back, which the forward then drops).
# - Flux, HunyuanVideo: double- then single-stream blocks that all take and return both streams as two tensors (the
#   single-stream blocks concatenate and split them inside), so any prefix can run.
# - Flux2, Chroma: the forward concatenates the two streams between the stacks and the single-stream blocks take and
#   return the joint sequence; a skipped block returns exactly what it was given, so the concatenation and the final
#   slice see the shapes they expect whichever units ran.
# - Z-Image: the main `layers` return the unified sequence; the noise and context refiners before them always run.
_ARCHITECTURES: dict[type, ExitArchitecture] = {
    DiTTransformer2DModel: ExitArchitecture(units=_transformer_blocks, reuse="residual"),
    PixArtTransformer2DModel: ExitArchitecture(units=_transformer_blocks, reuse="residual"),
    SD3Transformer2DModel: ExitArchitecture(units=_transformer_blocks, reuse="residual"),
    UNet2DModel: ExitArchitecture(units=_unet_decoder_units, sample_argument="sample"),
    UNet2DConditionModel: ExitArchitecture(units=_unet_decoder_units, sample_argument="sample"),
    FluxTransformer2DModel: ExitArchitecture(
        units=_double_then_single, reuse="residual", timestep_convention=TIMESTEP_OVER_1000
    ),
    ChromaTransformer2DModel: ExitArchitecture(
        units=_double_then_single,
        skip=_skip_chroma,
        reuse="residual",
        timestep_convention=TIMESTEP_OVER_1000,
        bridge=_join_text_and_image,
    ),
    Flux2Transformer2DModel: ExitArchitecture(
        units=_double_then_single,
        reuse="residual",
        timestep_convention=TIMESTEP_OVER_1000,
        bridge=_join_text_and_image,
        runs_all_units=_flux2_kv_extract,
    ),
    QwenImageTransformer2DModel: ExitArchitecture(
        units=_transformer_blocks, reuse="residual", timestep_convention=TIMESTEP_OVER_1000
    ),
    WanTransformer3DModel: ExitArchitecture(units=_wan_blocks, reuse="residual"),
    HunyuanVideoTransformer3DModel: ExitArchitecture(units=_double_then_single, reuse="residual"),
    LTXVideoTransformer3DModel: ExitArchitecture(units=_transformer_blocks, reuse="residual"),
    CogVideoXTransformer3DModel: ExitArchitecture(units=_transformer_blocks, reuse="residual"),
    SanaTransformer2DModel: ExitArchitecture(
        units=_transformer_blocks,
        skip=_returns_argument("hidden_states"),
        reuse="residual",
        timestep_convention=_sana_convention,
    ),
    ZImageTransformer2DModel: ExitArchitecture(
        units=_z_image_layers,
        skip=_returns_argument("x"),
        timestep_argument="t",
        sample_argument="x",
        reuse="residual",
        timestep_convention=REVERSED_TIMESTEP_OVER_1000,
    ),
}


def register_exit_architecture(model_class: type, architecture: ExitArchitecture) -> None:
    """Teach the exit hooks a new denoiser class (or replace the rule for a known one)."""
    if not isinstance(model_class, type) or not issubclass(model_class, torch.nn.Module):
        raise TypeError(f"`model_class` must be a torch.nn.Module subclass, got {model_class!r}.")
    if not isinstance(architecture, ExitArchitecture):
        raise TypeError(f"`architecture` must be an ExitArchitecture, got {type(architecture).__name__}.")
    _ARCHITECTURES[model_class] = architecture


def supported_classes() -> list[str]:
    """The names of the denoiser classes the registry knows, sorted."""
    return sorted(cls.__name__ for cls in _ARCHITECTURES)


def get_exit_architecture(model: torch.nn.Module) -> ExitArchitecture:
    """The registered rule for `model`'s class (or its nearest registered base class)."""
    for cls in type(model).__mro__:
        if cls in _ARCHITECTURES:
            architecture = _ARCHITECTURES[cls]
            if architecture.skip is None:
                architecture = dataclasses.replace(architecture, skip=default_skip)
            return architecture
    raise TypeError(
        f"Early exit does not support {type(model).__name__}. Supported classes: {', '.join(supported_classes())}. "
        "Register another with `ee_diffusion.register_exit_architecture(cls, ExitArchitecture(units=...))`."
    )
