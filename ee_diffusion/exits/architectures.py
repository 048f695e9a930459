"""Which units of each denoiser class an exit schedule may skip, and what a skipped unit returns.

One registry, keyed by model class. An entry lists the skippable units of a model in execution order; the exit hook
runs the first `depth` of them and replaces the rest by their *skip output*:

- Transformer denoisers (DiT, PixArt-alpha, SD3): the units are the `transformer_blocks`. A skipped block returns its
  input unchanged, so the model's own output layer reads the hidden state of the last block run (ASE's exit). Blocks
  are never removed from the model: DiT's forward reads `transformer_blocks[0]` after the loop, and SD3's last block
  stays `context_pre_only`, since skipped blocks hand `(encoder_hidden_states, hidden_states)` back in the order its
  forward unpacks.
- U-Nets (`UNet2DModel`, `UNet2DConditionModel`): dropping trailing blocks would drop the decoder layers that consume
  the encoder's skip connections. The units are instead the decoder's (`up_blocks`) resnets and attentions, in
  execution order, so the trailing units are the high-resolution end of the decoder. A skipped resnet keeps only its
  1x1 `conv_shortcut`, the linear layer that merges the concatenated encoder skip (ASE keeps U-ViT's skip-merging
  linear layers the same way), and drops both 3x3 convolutions; a skipped attention returns its residual input.
  Upsamplers, the encoder, the mid block and the output convolution always run.

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
    DiTTransformer2DModel,
    PixArtTransformer2DModel,
    SD3Transformer2DModel,
    UNet2DConditionModel,
    UNet2DModel,
)
from diffusers.hooks._helpers import TransformerBlockRegistry
from diffusers.models.attention_processor import Attention
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.resnet import ResnetBlock2D
from diffusers.models.transformers.transformer_2d import Transformer2DModel

SkipFn = Callable[[torch.nn.Module, tuple, dict], Any]


@dataclass(frozen=True)
class ExitArchitecture:
    """How early exit applies to one denoiser class.

    Args:
        units: Returns the skippable units of a model instance, in execution order.
        skip: Returns what a skipped unit outputs, from `(unit, args, kwargs)` of its call. `None` picks the built-in
            rule for the unit's class (transformer blocks known to diffusers, `ResnetBlock2D`, `Attention`,
            `Transformer2DModel`).
        timestep_argument: Name of the denoiser's forward argument that carries the timestep.
        sample_argument: Name of the denoiser's forward argument that carries the noisy sample (its batch size).
        reuse: What a plan's reuse step reuses: `"residual"`, the last computed step's change across the units
            (their output minus the first unit's skip output), added to this step's input of the first unit -- for
            units whose input and output have one shape, like transformer blocks; or `"output"`, the last computed
            step's whole prediction (a U-Net's decoder units change shape, so they have no residual span).
    """

    units: Callable[[torch.nn.Module], list[torch.nn.Module]]
    skip: SkipFn | None = None
    timestep_argument: str = "timestep"
    sample_argument: str = "hidden_states"
    reuse: str = "output"

    def __post_init__(self) -> None:
        if self.reuse not in ("residual", "output"):
            raise ValueError(f"`reuse` must be 'residual' or 'output', got {self.reuse!r}.")


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


def _transformer_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    return list(model.transformer_blocks)


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


_ARCHITECTURES: dict[type, ExitArchitecture] = {
    DiTTransformer2DModel: ExitArchitecture(units=_transformer_blocks, reuse="residual"),
    PixArtTransformer2DModel: ExitArchitecture(units=_transformer_blocks, reuse="residual"),
    SD3Transformer2DModel: ExitArchitecture(units=_transformer_blocks, reuse="residual"),
    UNet2DModel: ExitArchitecture(units=_unet_decoder_units, sample_argument="sample"),
    UNet2DConditionModel: ExitArchitecture(units=_unet_decoder_units, sample_argument="sample"),
}


def register_exit_architecture(model_class: type, architecture: ExitArchitecture) -> None:
    """Teach the exit hooks a new denoiser class (or replace the rule for a known one)."""
    if not isinstance(model_class, type) or not issubclass(model_class, torch.nn.Module):
        raise TypeError(f"`model_class` must be a torch.nn.Module subclass, got {model_class!r}.")
    if not isinstance(architecture, ExitArchitecture):
        raise TypeError(f"`architecture` must be an ExitArchitecture, got {type(architecture).__name__}.")
    _ARCHITECTURES[model_class] = architecture


def get_exit_architecture(model: torch.nn.Module) -> ExitArchitecture:
    """The registered rule for `model`'s class (or its nearest registered base class)."""
    for cls in type(model).__mro__:
        if cls in _ARCHITECTURES:
            architecture = _ARCHITECTURES[cls]
            if architecture.skip is None:
                architecture = dataclasses.replace(architecture, skip=default_skip)
            return architecture
    supported = ", ".join(sorted(cls.__name__ for cls in _ARCHITECTURES))
    raise TypeError(
        f"Early exit does not support {type(model).__name__}. Supported classes: {supported}. Register another with "
        "`ee_diffusion.register_exit_architecture(cls, ExitArchitecture(units=...))`."
    )
