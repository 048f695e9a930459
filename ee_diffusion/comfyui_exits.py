"""Exit schedules on ComfyUI's DiT-family models, through ComfyUI's own extension points only.

A ComfyUI ``MODEL`` is a ``ModelPatcher``. `apply_comfyui_exit_schedule` clones it and adds one keyed wrapper
(``add_wrapper_with_key``) around the model's ``apply_model``. At each model call the wrapper reads the call's sigma,
turns it into the schedule's position through the model's own ``model_sampling`` and, for the blocks the schedule
skips at that position, hands the diffusion model a copy of its ``transformer_options`` whose
``patches_replace["dit"]`` maps those blocks to an identity: the mechanism of ComfyUI's own SkipLayerGuidance nodes.
Nothing is monkey-patched, the model's forward is never replaced, ``set_model_unet_function_wrapper`` is never used,
and the input ``MODEL`` is left as it was.

Blocks and streams. A family's blocks are its streams' blocks in execution order, as one sequence: Flux, Chroma,
HunyuanVideo, Hunyuan3D and AuraFlow run their double-stream blocks, then their single-stream blocks; the other
families have one stream. The schedule is made for the length ``N`` of that sequence and a depth ``d`` runs its
first ``d`` blocks. The last block of each stream always runs (SD3's last joint block is the one that drops the text
stream, Mochi's last block leaves the text untouched), so where ``d`` ends inside the double stream the last double
block still runs, and the last single block always does.

Sigma to position. The schedule's position is ``s = t / num_train_timesteps`` in ``[0, 1]`` (``s = 1`` pure noise),
and ``t = model_sampling.timestep(sigma)`` is what the model itself is given. ``ModelSamplingDiscreteFlow`` (SD3, Wan,
HunyuanVideo with ``multiplier`` 1000; AuraFlow, Mochi, Hunyuan3D with ``multiplier`` 1) gives ``t = sigma *
multiplier``, so ``s = t / multiplier = sigma``, as diffusers' flow schedulers give ``t = 1000 sigma`` with 1000
training timesteps. ``ModelSamplingFlux`` (Flux, Chroma, Qwen-Image, LTXV) gives ``t = sigma``: ``s = t``. Discrete
schedules (``ModelSamplingDiscrete``) give the index ``t`` in ``[0, num_timesteps)``: ``s = t / num_timesteps``,
diffusers' DDPM convention. Other samplings whose ``timestep`` already lies in ``[0, 1]`` (Stable Audio's) are used as
they are. The shift a model (or a ModelSampling node) applies is in sigma itself, so a shifted run reads the shifted
position.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from .schedules.exit_schedule import ExitSchedule

logger = logging.getLogger(__name__)

WRAPPER_KEY = "ee_diffusion.early_exit"
"""The key of the wrapper on the cloned MODEL: applying a schedule again replaces it, it never stacks."""

APPLY_MODEL = "apply_model"  # the value of comfy.patcher_extension.WrappersMP.APPLY_MODEL (the package needs no comfy)
NODE_SHAPES = ("linear", "cosine", "constant")


@dataclass(frozen=True)
class ComfyFamily:
    """A ComfyUI diffusion-model family whose forward honours ``transformer_options["patches_replace"]["dit"]``.

    Args:
        name: The family's name, as error messages and the README use it.
        classes: ``"module.ClassName"`` of its diffusion model class; subclasses match too.
        streams: ``(block name, attribute path of the block list)`` of each stream in execution order; block ``i`` of
            a stream is replaced under the key ``(block name, i)``.
    """

    name: str
    classes: tuple[str, ...]
    streams: tuple[tuple[str, str], ...]


_DOUBLE_SINGLE = (("double_block", "double_blocks"), ("single_block", "single_blocks"))

COMFY_FAMILIES: tuple[ComfyFamily, ...] = (
    ComfyFamily("Flux", ("comfy.ldm.flux.model.Flux",), _DOUBLE_SINGLE),
    ComfyFamily("Chroma", ("comfy.ldm.chroma.model.Chroma",), _DOUBLE_SINGLE),
    ComfyFamily("HunyuanVideo", ("comfy.ldm.hunyuan_video.model.HunyuanVideo",), _DOUBLE_SINGLE),
    ComfyFamily("Hunyuan3D 2.0", ("comfy.ldm.hunyuan3d.model.Hunyuan3Dv2",), _DOUBLE_SINGLE),
    ComfyFamily(
        "SD3 (MMDiT)", ("comfy.ldm.modules.diffusionmodules.mmdit.MMDiT",), (("double_block", "joint_blocks"),)
    ),
    ComfyFamily(
        "AuraFlow",
        ("comfy.ldm.aura.mmdit.MMDiT",),
        (("double_block", "double_layers"), ("single_block", "single_layers")),
    ),
    ComfyFamily("Wan", ("comfy.ldm.wan.model.WanModel",), (("double_block", "blocks"),)),
    ComfyFamily(
        "Qwen-Image",
        ("comfy.ldm.qwen_image.model.QwenImageTransformer2DModel",),
        (("double_block", "transformer_blocks"),),
    ),
    ComfyFamily("LTXV", ("comfy.ldm.lightricks.model.LTXVModel",), (("double_block", "transformer_blocks"),)),
    ComfyFamily(
        "Mochi", ("comfy.ldm.genmo.joint_model.asymm_models_joint.AsymmDiTJoint",), (("double_block", "blocks"),)
    ),
    ComfyFamily(
        "Stable Audio", ("comfy.ldm.audio.dit.AudioDiffusionTransformer",), (("double_block", "transformer.layers"),)
    ),
)
"""The supported families. HunyuanDiT and Hunyuan3D 2.1 also honour ``patches_replace["dit"]`` but are left out: their
later blocks consume long skip connections from earlier ones (U-ViT style), so skipping trailing blocks would drop
those skips, and Hunyuan3D 2.1's replacement returns a tensor, not the dict every other family reads."""


def supported_families() -> str:
    """The names of the supported families, comma-separated (for messages)."""
    return ", ".join(family.name for family in COMFY_FAMILIES)


@dataclass(frozen=True)
class ComfyBlocks:
    """The skippable blocks of one ComfyUI diffusion model, as the exit schedule sees them.

    Args:
        family: The model's family.
        keys: ``patches_replace["dit"]`` key of every block, in execution order (all streams, one sequence).
        stream_sizes: Number of blocks of each stream, in execution order.
        always_run: Keys of the blocks that always run (the last block of each stream).
    """

    family: ComfyFamily
    keys: tuple[tuple[str, int], ...]
    stream_sizes: tuple[int, ...]
    always_run: frozenset[tuple[str, int]]

    @property
    def num_blocks(self) -> int:
        """Length of the block sequence, the ``num_blocks`` a schedule for this model has."""
        return len(self.keys)

    def skipped(self, depth: int) -> list[tuple[str, int]]:
        """Keys of the blocks skipped at ``depth``: those past the first ``depth``, less the stream-final ones."""
        return [key for key in self.keys[depth:] if key not in self.always_run]

    def describe(self) -> str:
        """E.g. ``"Flux, 57 blocks (19 double_block + 38 single_block)"``."""
        parts = " + ".join(
            f"{size} {name}" for (name, _), size in zip(self.family.streams, self.stream_sizes, strict=True)
        )
        return f"{self.family.name}, {self.num_blocks} blocks ({parts})"


def _class_names(obj: Any) -> list[str]:
    return [f"{cls.__module__}.{cls.__qualname__}" for cls in type(obj).__mro__]


def _attribute(obj: Any, path: str) -> Any:
    for name in path.split("."):
        obj = getattr(obj, name)
    return obj


def comfy_blocks(diffusion_model: Any) -> ComfyBlocks:
    """The family and the skippable blocks of a ComfyUI diffusion model (``get_model_object("diffusion_model")``).

    Raises:
        ValueError: The model's class is not one of the supported families, named in the message.
    """
    names = _class_names(diffusion_model)
    family = next((f for f in COMFY_FAMILIES if any(name in f.classes for name in names)), None)
    if family is None:
        raise ValueError(
            f"Early exit does not support the ComfyUI model {names[0]}: its blocks cannot be skipped through "
            f"patches_replace['dit']. Supported families: {supported_families()}."
        )
    keys, sizes, always_run = [], [], set()
    for block_name, path in family.streams:
        try:
            size = len(_attribute(diffusion_model, path))
        except (AttributeError, TypeError):
            raise ValueError(
                f"{family.name} model {names[0]} has no block list `{path}`; this ComfyUI version is not supported."
            ) from None
        keys += [(block_name, i) for i in range(size)]
        sizes.append(size)
        if size:
            always_run.add((block_name, size - 1))
    if not keys:
        raise ValueError(f"{family.name} model {names[0]} has no blocks to skip.")
    return ComfyBlocks(family, tuple(keys), tuple(sizes), frozenset(always_run))


def timestep_scale(model_sampling: Any) -> float:
    """The ``num_train_timesteps`` that maps ``model_sampling.timestep(sigma)`` onto the schedule's ``[0, 1]``.

    Raises:
        ValueError: The sampling's timesteps are not a position of the noise schedule (e.g. EDM's ``log(sigma) / 4``).
    """
    multiplier = getattr(model_sampling, "multiplier", None)
    if multiplier is not None:  # ModelSamplingDiscreteFlow: t = sigma * multiplier
        return float(multiplier)
    import torch

    t_max = float(model_sampling.timestep(torch.as_tensor(model_sampling.sigma_max, dtype=torch.float32)))
    num_timesteps = getattr(model_sampling, "num_timesteps", None)
    if num_timesteps is not None and t_max > 1.5:  # ModelSamplingDiscrete: the index t in [0, num_timesteps)
        return float(num_timesteps)
    if 0.0 < t_max <= 1.0 + 1e-3:  # ModelSamplingFlux (t = sigma), continuous V (Stable Audio): t is already in [0, 1]
        return 1.0
    raise ValueError(
        f"Cannot read an exit-schedule position from {type(model_sampling).__name__}: its timestep at sigma_max is "
        f"{t_max:g}, neither an index of a discrete schedule nor a fraction in [0, 1]."
    )


def sigma_to_position(model_sampling: Any, sigma: float) -> float:
    """The schedule position ``s`` in ``[0, 1]`` of ``sigma``, through the model's own ``model_sampling``."""
    import torch

    t = float(model_sampling.timestep(torch.tensor([float(sigma)])).reshape(-1)[0])
    return min(max(t / timestep_scale(model_sampling), 0.0), 1.0)


def _identity(args: dict, extra: dict) -> dict:
    """A skipped block: its outputs are its inputs (the forward reads ``"img"`` / ``"txt"`` back from this dict)."""
    return args


def _identity_block(args: dict) -> dict:
    return args


def _skip_around(replacement: Callable) -> Callable:
    """Another node's replacement of a skipped block, kept, with the block itself made an identity."""

    def skipped(args: dict, extra: dict) -> Any:
        return replacement(args, {**extra, "original_block": _identity_block})

    return skipped


def _with_skipped(transformer_options: dict, keys: Sequence[tuple[str, int]]) -> dict:
    """A copy of ``transformer_options`` whose ``patches_replace["dit"]`` skips ``keys``; the input is not changed."""
    options = dict(transformer_options)
    patches_replace = dict(options.get("patches_replace", {}))
    dit = dict(patches_replace.get("dit", {}))
    for key in keys:
        dit[key] = _skip_around(dit[key]) if key in dit else _identity
    patches_replace["dit"] = dit
    options["patches_replace"] = patches_replace
    return options


class ComfyExitWrapper:
    """The ``apply_model`` wrapper that skips the blocks the schedule says at each call's sigma.

    Its state is its configuration and a cache of the numbers it derives from the model's ``model_sampling``.

    Args:
        schedule: The exit schedule, made for ``blocks.num_blocks`` blocks.
        blocks: The model's blocks (`comfy_blocks`).
        start_percent: Sampling percent (ComfyUI's ``percent_to_sigma``) from which the schedule applies.
        end_percent: Sampling percent up to which it applies; outside ``[start, end]`` every block runs.
        model_sampling: The model's ``model_sampling`` when the node ran, used if the call does not give one.
    """

    def __init__(
        self,
        schedule: ExitSchedule,
        blocks: ComfyBlocks,
        start_percent: float = 0.0,
        end_percent: float = 1.0,
        model_sampling: Any = None,
    ):
        self.schedule = schedule
        self.blocks = blocks
        self.start_percent = start_percent
        self.end_percent = end_percent
        self.model_sampling = model_sampling
        self._derived: tuple[Any, float, float, float] | None = None

    def _window(self, model_sampling: Any) -> tuple[float, float, float]:
        """``(sigma_start, sigma_end, timestep scale)`` of ``model_sampling``, computed once per sampling object."""
        if self._derived is None or self._derived[0] is not model_sampling:
            sigma_start = float(model_sampling.percent_to_sigma(self.start_percent))
            sigma_end = float(model_sampling.percent_to_sigma(self.end_percent))
            self._derived = (model_sampling, sigma_start, sigma_end, timestep_scale(model_sampling))
        return self._derived[1:]

    def depth_at(self, model_sampling: Any, sigmas: Any) -> int:
        """Blocks to run for a call at ``sigmas`` (one per batch entry): the deepest any entry needs; every block
        outside the ``[start_percent, end_percent]`` window."""
        import torch

        sigma_start, sigma_end, scale = self._window(model_sampling)
        sigmas = torch.as_tensor(sigmas).detach().float().reshape(-1)
        values = sorted(set(sigmas.cpu().tolist()))  # one host read per model call: the depth is a Python decision
        full = self.blocks.num_blocks
        if not values or any(not sigma_end <= v <= sigma_start for v in values):
            return full
        timesteps = model_sampling.timestep(torch.tensor(values)).reshape(-1).float().cpu().tolist()
        return max(self.schedule.depth_at_position(min(max(t / scale, 0.0), 1.0)) for t in timesteps)

    def __call__(
        self,
        executor: Any,
        x: Any,
        t: Any,
        c_concat: Any = None,
        c_crossattn: Any = None,
        control: Any = None,
        transformer_options: dict | None = None,
        **kwargs: Any,
    ) -> Any:
        """Run the model (the next wrapper) with the schedule's blocks skipped at sigma ``t``."""
        options = {} if transformer_options is None else transformer_options
        model_sampling = getattr(getattr(executor, "class_obj", None), "model_sampling", None)
        if model_sampling is None:
            model_sampling = self.model_sampling
        depth = self.depth_at(model_sampling, t)
        skipped = self.blocks.skipped(depth)
        if skipped:
            logger.debug("ee-diffusion: depth %d of %d, skipping %s", depth, self.blocks.num_blocks, skipped)
            options = _with_skipped(options, skipped)
        return executor(x, t, c_concat, c_crossattn, control, options, **kwargs)


def comfyui_exit_schedule(schedule: ExitSchedule | str | os.PathLike, blocks: ComfyBlocks) -> ExitSchedule:
    """The exit schedule for a model of ``blocks``: an `ExitSchedule`, a spec of `ExitSchedule.from_spec`
    (``"linear:0.5"``, ``"cosine:0.6"``, ``"constant:0.75"``, ``"step:1.0,0.75,0.5"``) or a folder holding
    ``exit_schedule.json``.

    Raises:
        ValueError: A bad spec or folder, a schedule made for another number of blocks, or a plan that reuses steps.
    """
    separators = tuple(sep for sep in (os.sep, os.altsep) if sep)
    if isinstance(schedule, os.PathLike) or (isinstance(schedule, str) and any(s in schedule for s in separators)):
        folder = os.fspath(schedule)
        if not os.path.isfile(os.path.join(folder, ExitSchedule.config_name)):
            raise ValueError(f"Exit schedule folder {folder!r} holds no {ExitSchedule.config_name}.")
        schedule = ExitSchedule.from_pretrained(folder)
    elif isinstance(schedule, str):
        schedule = ExitSchedule.from_spec(schedule, blocks.num_blocks)
    elif not isinstance(schedule, ExitSchedule):
        raise TypeError(
            "`schedule` must be an ExitSchedule, a spec such as 'linear:0.5', or a folder, got "
            f"{type(schedule).__name__}."
        )
    if schedule.config.num_blocks != blocks.num_blocks:
        raise ValueError(
            f"The exit schedule is made for {schedule.config.num_blocks} blocks, but this model has "
            f"{blocks.describe()}; make the schedule for {blocks.num_blocks} blocks."
        )
    if schedule.config.shape == "plan":
        raise ValueError(
            "The exit schedule is a plan: one action per step of one diffusers scheduler at one step count, which a "
            "ComfyUI sampler does not share; use a schedule of timesteps (linear:0.5, step:..., or a table), or "
            "ComfyUI's EasyCache for step reuse."
        )
    return schedule


def _percent(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"`{name}` must be a number in [0, 1], got {value!r}.")
    if not (math.isfinite(value) and 0.0 <= value <= 1.0):
        raise ValueError(f"`{name}` must lie in [0, 1], got {value!r}.")
    return float(value)


def apply_comfyui_exit_schedule(
    model: Any,
    schedule: ExitSchedule | str | os.PathLike,
    start_percent: float = 0.0,
    end_percent: float = 1.0,
) -> Any:
    """A clone of a ComfyUI ``MODEL`` that runs ``schedule``; ``model`` itself is not changed.

    Args:
        model: A ComfyUI ``ModelPatcher`` of a supported family (`COMFY_FAMILIES`).
        schedule: An `ExitSchedule` for the model's block count, a spec (``"linear:0.5"``: depth falls linearly to
            half the blocks at pure noise) or a folder holding ``exit_schedule.json``.
        start_percent: Sampling percent (0 = the first, noisiest step) from which blocks may be skipped.
        end_percent: Sampling percent after which every block runs again.

    Returns:
        The clone, with one ``apply_model`` wrapper under `WRAPPER_KEY`.

    Raises:
        ValueError: An unsupported model (the message names the supported families), a bad schedule, percents out
            of ``[0, 1]`` or ``start_percent > end_percent``.
    """
    start_percent, end_percent = _percent("start_percent", start_percent), _percent("end_percent", end_percent)
    if start_percent > end_percent:
        raise ValueError(f"`start_percent` ({start_percent}) must not exceed `end_percent` ({end_percent}).")
    for method in ("clone", "get_model_object", "add_wrapper_with_key", "remove_wrappers_with_key"):
        if not callable(getattr(model, method, None)):
            raise TypeError(f"`model` must be a ComfyUI ModelPatcher (a MODEL), got {type(model).__name__}.")
    blocks = comfy_blocks(model.get_model_object("diffusion_model"))
    schedule = comfyui_exit_schedule(schedule, blocks)
    model_sampling = model.get_model_object("model_sampling")
    timestep_scale(model_sampling)  # refuse a sampling without positions now, not at the first step
    patched = model.clone()
    patched.remove_wrappers_with_key(APPLY_MODEL, WRAPPER_KEY)
    wrapper = ComfyExitWrapper(schedule, blocks, start_percent, end_percent, model_sampling)
    patched.add_wrapper_with_key(APPLY_MODEL, WRAPPER_KEY, wrapper)
    logger.info("ee-diffusion: exit schedule %s on %s", schedule.config.shape, blocks.describe())
    return patched


def early_exit_node(
    model: Any,
    shape: str = "linear",
    min_depth_fraction: float = 0.5,
    start_percent: float = 0.0,
    end_percent: float = 1.0,
    schedule_folder: str = "",
) -> Any:
    """What the "Early Exit Schedule (ee-diffusion)" node does with its inputs.

    Args:
        model: The ComfyUI ``MODEL``.
        shape: ``"linear"``, ``"cosine"`` or ``"constant"``: all blocks at the clean end falling to the minimum depth
            at pure noise (``constant``: the minimum depth everywhere). Ignored when ``schedule_folder`` is given.
        min_depth_fraction: Fraction in ``(0, 1]`` of the model's blocks run at pure noise.
        start_percent: See `apply_comfyui_exit_schedule`.
        end_percent: See `apply_comfyui_exit_schedule`.
        schedule_folder: Optional folder holding an ``exit_schedule.json`` saved by ee-diffusion; empty for none.
    """
    if not isinstance(schedule_folder, (str, os.PathLike)):
        raise TypeError(f"`schedule_folder` must be a path, got {type(schedule_folder).__name__}.")
    folder = os.path.expanduser(os.fspath(schedule_folder).strip())
    if folder:
        if not os.path.isdir(folder):
            raise ValueError(f"`schedule_folder` {folder!r} is not a folder (it should hold exit_schedule.json).")
        return apply_comfyui_exit_schedule(model, os.path.abspath(folder), start_percent, end_percent)
    if shape not in NODE_SHAPES:
        raise ValueError(f"`shape` must be one of {NODE_SHAPES}, got {shape!r}.")
    if isinstance(min_depth_fraction, bool) or not isinstance(min_depth_fraction, (int, float)):
        raise TypeError(f"`min_depth_fraction` must be a number in (0, 1], got {min_depth_fraction!r}.")
    if not (math.isfinite(min_depth_fraction) and 0.0 < min_depth_fraction <= 1.0):
        raise ValueError(f"`min_depth_fraction` must lie in (0, 1], got {min_depth_fraction!r}.")
    spec = f"{shape}:{float(min_depth_fraction):.12f}"  # with a decimal point: a fraction of the model's blocks
    return apply_comfyui_exit_schedule(model, spec, start_percent, end_percent)
