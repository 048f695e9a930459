"""`ee-diffusion bench`: methods side by side on one model, in one run: speed, executed blocks and sample quality.

Inputs: what a pipeline call takes is read from its `__call__` signature, in one place (`pipeline_inputs`): class
labels (class-conditional models: DiT, the digits models; image `i` gets label `i % 10`), prompts (text-to-image
pipelines: PixArt, SD3, Stable Diffusion, Flux, ...; image `i` gets prompt `i % len(prompts)`, and `height`/`width`
where given) or nothing but a batch size (unconditional DDPM/DDIM), and the name of its guidance argument.

Quality: every method generates the same class labels or prompts from the same seeds, batch by batch, the methods
taking turns. FID and KID are scored against `reference` (`ee_diffusion.metrics.compute_fid_kid`); the digits models
default to the held-out digits split seen through the digits feature network, whose predictions also give their class
accuracy. Other models without a reference get PSNR and SSIM (`ee_diffusion.metrics.image_similarity`) of each
method's images against the full-compute output of the same seeds and conditioning: the cell's `baseline` row, or a
full-compute run the bench makes apart when there is none (`similarity_steps` sets its step count). That measures
closeness to the full model, not image quality: a method that samples along another trajectory (fewer steps) can be
as good and still score low, so fewer-steps rows are to be judged against a `reference`. `random:` models (latents,
no images) get speed rows only.

Speed is timed apart from quality generation, after it and after one untimed warm-up round in which every method
generates the timed batch once (so that compiling at that batch size, the kernel libraries' first-call set-up and the
allocator's growth never land in a timed round): `repeats` rounds in which every method generates that batch, the
order rotating from round to round (`ee_diffusion.metrics.time_interleaved`; on CUDA the device is synchronised before
each clock read). `images_per_s` comes from the median round, `timing_spread` is the rounds' interquartile range over
their median, and `speedup` is the median over rounds of the `baseline` row's seconds over the method's (same
scheduler and steps), each ratio taken within one round, so a slow spell of the machine cancels out of it. Each timed
call puts the method on the pipeline and takes it off again around the generation.

Methods: see `ee_diffusion.bench.methods` (`baseline`, `ase:<spec>`, `finetuned:<model>`, and diffusers' `fbcache`,
`layerskip`, `taylorseer`, `magcache`, `pab`). A method written `<spec>@N` samples at N steps inside its cell (the
fewer-steps baseline `baseline@8`, say, timed in the same interleaved rounds as the cell's baseline); its row keeps the
cell's steps and its name, and its block fraction counts against the full model at the cell's steps.

Grid: `scheduler` and `steps` are lists. `grid="zip"` pairs them position by position (a list of one is repeated:
`ddpm,ddim,dpm-solver++` x `250,50,20` is three cells); `grid="product"` runs every combination. Every cell runs every
method.

Models: a shipped name, a pipeline folder or hub id, or `random:<name>` (see `RANDOM_MODELS`): a randomly initialised
DiT built from its config offline, without a VAE (the latents are the output), for speed only.

Processes: under `accelerate launch --multi_gpu --num_processes N` (or `torchrun`), with GPUs or CPU processes, the
batches are split over the processes (`PartialState.split_between_processes`) and gathered on the main process
(`gather_object`), which scores them and returns the rows (the other processes return no rows). Batch `i` is seeded
with `seed + i` wherever it runs, so the images do not depend on the number of processes. Every process runs the timed
rounds at once, and `images_per_s` is the number of processes times the images per second of one process.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib.util
import inspect
import logging
import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from itertools import product
from pathlib import Path
from typing import Any

import torch
from accelerate import PartialState
from accelerate.utils import gather_object
from diffusers import DDPMScheduler, DiTTransformer2DModel
from diffusers.models.attention import FeedForward
from diffusers.models.attention_processor import Attention
from diffusers.models.resnet import ResnetBlock2D
from tqdm.auto import tqdm

from ..data import load_digits_split
from ..data.digits import DIGITS_IMAGE_SIZE, digit_of_prompt
from ..exits import denoiser_of, exit_units
from ..metrics import (
    FeatureExtractor,
    ReferenceStatistics,
    Timing,
    class_accuracy,
    compute_fid_kid,
    image_files,
    image_similarity,
    load_digits_classifier,
    load_reference_statistics,
    round_speedups,
    time_interleaved,
)
from ..metrics.features import find_inception_weights
from ..metrics.flops import count_flops
from ..pipelines import EarlyExitDiTPipeline, load_early_exit_pipeline
from .methods import BlockWork, Method, Target, batch_rows, build_method
from .noise_schedulers import SCHEDULERS, build_scheduler
from .report import BenchRow, save_images

logger = logging.getLogger(__name__)

# What `--compile` compiles one by one (`compile_blocks`): outside the blocks, and inside them for the calls that run a
# block eagerly beneath a method's hooks.
COMPILED_MODULES = (Attention, FeedForward, ResnetBlock2D)

# Untimed rounds before the timed ones, every method generating the timed batch once in each (at least one: the first
# counts the FLOPs).
TIMING_WARMUP = 1

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

# `random:<name>` models: DiTTransformer2DModel configs (4 latent channels, learned sigma, 1000 classes).
RANDOM_MODELS = {
    "dit-xl-2": dict(num_layers=28, num_attention_heads=16, attention_head_dim=72, sample_size=32, patch_size=2),
    "dit-tiny": dict(num_layers=4, num_attention_heads=2, attention_head_dim=8, sample_size=8, patch_size=2),
}


# ---------------------------------------------------------------------------------------------- what a call takes
# How a pipeline is conditioned, by the argument of its `__call__` that says it, in the order they are looked for.
CONDITIONINGS = {
    "class_labels": "class-conditional (one class id per image: DiT, the digits models)",
    "prompt": "text-to-image (one prompt per image: PixArt, SD3, Stable Diffusion, Flux, ...)",
    "batch_size": "unconditional (DDPM, DDIM)",
}
# What every bench and calibration call passes besides the conditioning.
_ALWAYS_PASSED = ("num_inference_steps", "generator", "output_type")


@dataclass(frozen=True)
class PipelineInputs:
    """What a pipeline's `__call__` takes, read from its signature (`pipeline_inputs`): the one place where the bench,
    `calibrate` and `sweep` learn how to call a pipeline.

    Args:
        pipeline: The pipeline class's name.
        conditioning: One of `CONDITIONINGS`: `"class_labels"`, `"prompt"` or `"batch_size"` (unconditional).
        sizes: Whether it takes `height` and `width`.
        guidance: The name of its guidance argument (`guidance_scale`), or `None`. For Flux-dev that is the guidance
            distilled into the model; its true classifier-free guidance, `true_cfg_scale`, is left at its default.
        default_guidance: That argument's default in the signature.
        resolution_binning: Whether it takes `use_resolution_binning` (PixArt): turned off when sizes are given, so
            the images are made at exactly those sizes.
        fixed: Arguments every call passes: `clean_caption=False` where PixArt's caption cleaning lacks its packages
            (beautifulsoup4, ftfy), which the pipeline would otherwise fall back to with a warning at every call.
    """

    pipeline: str
    conditioning: str
    sizes: bool
    guidance: str | None
    default_guidance: float | None
    resolution_binning: bool = False
    fixed: tuple[tuple[str, Any], ...] = ()

    def check(
        self,
        model: str,
        prompts: list[str] | None,
        height: int | None = None,
        width: int | None = None,
        guidance_scale: float | None = None,
    ) -> None:
        """Raise a `ValueError` saying what to change when the pipeline cannot take these inputs: prompts for a model
        without them, none for one that needs them, sizes it does not take, guidance it does not have."""
        kind = f"{model} ({self.pipeline}) is {CONDITIONINGS[self.conditioning]}"
        if self.conditioning == "prompt" and not prompts:
            raise ValueError(
                f"{kind}: give the prompts to generate (--prompt TEXT, repeatable, or --prompts FILE, one per line; "
                "`prompts` in Python)."
            )
        if self.conditioning != "prompt" and prompts:
            raise ValueError(
                f"{kind}: it takes no prompt; leave out --prompt and --prompts (`prompts`), which are for "
                "text-to-image pipelines."
            )
        if not self.sizes and (height is not None or width is not None):
            raise ValueError(
                f"{kind}: it takes no height or width (its images have its model's size); leave out --height and "
                "--width."
            )
        if self.guidance is None and guidance_scale not in (None, 1.0):
            raise ValueError(
                f"{kind}: it has no guidance, got guidance_scale={guidance_scale}; leave out --guidance-scale."
            )

    def conditions(self, count: int, prompts: list[str] | None = None, num_classes: int = 10) -> list[Any]:
        """What each of `count` images is conditioned on: class `i % num_classes`, prompt `i % len(prompts)`, or
        `None` (unconditional)."""
        if self.conditioning == "class_labels":
            return [i % num_classes for i in range(count)]
        if self.conditioning == "prompt":
            return [prompts[i % len(prompts)] for i in range(count)]
        return [None] * count

    def call_kwargs(
        self,
        conditions: list[Any],
        guidance_scale: float | None = None,
        height: int | None = None,
        width: int | None = None,
    ) -> dict[str, Any]:
        """The call's arguments besides the steps, generator and output type, for one batch of `conditions`;
        `guidance_scale=None` and sizes left out keep the pipeline's defaults."""
        kwargs: dict[str, Any] = {
            self.conditioning: len(conditions) if self.conditioning == "batch_size" else list(conditions),
            **dict(self.fixed),
        }
        if self.guidance is not None and guidance_scale is not None:
            kwargs[self.guidance] = guidance_scale
        if self.sizes:
            kwargs.update({name: size for name, size in (("height", height), ("width", width)) if size is not None})
            if self.resolution_binning and (height is not None or width is not None):
                kwargs["use_resolution_binning"] = False
        return kwargs

    def guidance_in_effect(self, guidance_scale: float | None) -> str:
        """The guidance a run gets, in words (for the commands' headers)."""
        if self.guidance is None:
            return "no guidance"
        if guidance_scale is None:
            return f"{self.guidance} {self.default_guidance:g} (the pipeline's default)"
        return f"{self.guidance} {guidance_scale:g}"


def pipeline_inputs(pipe: Any) -> PipelineInputs:
    """What `pipe` (a pipeline or a pipeline class) takes; a `TypeError` naming its class and what is supported when
    the bench and calibration cannot drive it. For a pipeline whose second tokenizer takes shorter texts than its
    call's default `max_sequence_length` (a pipeline pads every prompt to that default), every call passes the
    tokenizer's length (`digits-flux`'s takes 8 tokens, where `FluxPipeline` would pad to 512)."""
    inputs = _inputs_of_class(pipe if isinstance(pipe, type) else type(pipe))
    if isinstance(pipe, type):
        return inputs
    default = inspect.signature(type(pipe).__call__).parameters.get("max_sequence_length")
    length = getattr(getattr(pipe, "tokenizer_2", None), "model_max_length", None)
    if default is None or not isinstance(default.default, int) or not isinstance(length, int):
        return inputs
    if length >= default.default:
        return inputs
    return dataclasses.replace(inputs, fixed=(*inputs.fixed, ("max_sequence_length", length)))


@functools.cache
def _inputs_of_class(cls: type) -> PipelineInputs:
    parameters = dict(inspect.signature(cls.__call__).parameters)
    parameters.pop("self", None)
    conditioning = next((name for name in CONDITIONINGS if name in parameters), None)
    required = [
        name
        for name, parameter in parameters.items()
        if parameter.default is inspect.Parameter.empty
        and parameter.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
        and name != conditioning
    ]
    missing = [name for name in _ALWAYS_PASSED if name not in parameters]
    if conditioning is None or missing or required:
        supported = "; ".join(f"`{name}`: {kind}" for name, kind in CONDITIONINGS.items())
        problem = (
            f"it also needs {', '.join(map(repr, required))}"
            if conditioning is not None and not missing
            else f"its __call__ takes {', '.join(parameters) or 'nothing'}"
        )
        raise TypeError(
            f"The bench, calibrate and sweep cannot drive {cls.__name__}: {problem}. They drive pipelines whose "
            f"__call__ takes {', '.join(_ALWAYS_PASSED)} and one of {supported}."
        )
    guidance = "guidance_scale" if "guidance_scale" in parameters else None
    default = parameters[guidance].default if guidance else None
    fixed = []
    if parameters.get("clean_caption") is not None and parameters["clean_caption"].default is True:
        from diffusers.utils import is_bs4_available, is_ftfy_available

        if not (is_bs4_available() and is_ftfy_available()):
            logger.warning(
                "%s cleans captions with beautifulsoup4 and ftfy, which are not installed: prompts are used as they "
                "are (clean_caption=False).",
                cls.__name__,
            )
            fixed.append(("clean_caption", False))
    return PipelineInputs(
        pipeline=cls.__name__,
        conditioning=conditioning,
        sizes="height" in parameters and "width" in parameters,
        guidance=guidance,
        default_guidance=float(default) if isinstance(default, (int, float)) else None,
        resolution_binning="use_resolution_binning" in parameters,
        fixed=tuple(fixed),
    )


def probe_kwargs(
    pipe: Any,
    model: str,
    count: int,
    prompts: list[str] | None = None,
    guidance_scale: float | None = None,
    height: int | None = None,
    width: int | None = None,
) -> dict[str, Any]:
    """The call arguments of `count` calibration probes on `pipe` (of `model`, for messages): class labels cycling
    through all the model's classes, or `prompts` cycling, with the sizes and guidance given (`PlanCalibrator`'s
    `call_kwargs`); a `ValueError` saying what to change when the pipeline takes other inputs."""
    from ..pipelines.class_conditional import null_class_label

    inputs = pipeline_inputs(pipe)
    inputs.check(model, prompts, height, width, guidance_scale)
    classes = null_class_label(denoiser_of(pipe)) if inputs.conditioning == "class_labels" else 1
    return inputs.call_kwargs(inputs.conditions(count, prompts, classes), guidance_scale, height, width)


def pipeline_inputs_of_model(model: str) -> PipelineInputs | None:
    """What the pipeline of a bench model takes, known before loading it: from the class its `model_index.json`
    names (a shipped model's, a folder's, a hub id's from the cache or the hub), or for `random:` models; `None` when
    that needs the pipeline loaded (no `model_index.json` to read, a class only the loader knows)."""
    from diffusers import DiffusionPipeline

    from .. import pipelines
    from ..pipelines.loading import resolve_pretrained

    if model.startswith("random:"):
        check_random_model(model)
        return pipeline_inputs(EarlyExitDiTPipeline)
    resolved = resolve_pretrained(model)
    if Path(resolved).is_dir():
        if not (Path(resolved) / "model_index.json").is_file():
            return None  # the loader says what is missing
        name = DiffusionPipeline.load_config(resolved).get("_class_name") or ""
    else:
        try:
            name = DiffusionPipeline.load_config(resolved).get("_class_name") or ""
        except (OSError, ValueError):
            return None  # the loader says why
    cls = getattr(pipelines, name, None) or getattr(pipelines, f"EarlyExit{name}", None)
    if not (isinstance(cls, type) and issubclass(cls, pipelines.EarlyExitPipelineMixin)):
        return None  # the loader names what it supports
    return pipeline_inputs(cls)


@dataclass
class BenchConfig:
    """What `run_bench` measures.

    Args:
        model: Shipped model name (`digits-dit`, `digits-unet`), folder, hub id or `random:<name>` (`RANDOM_MODELS`).
        methods: Method specs (see `ee_diffusion.bench.methods`).
        num_samples: Images per method and cell (class labels cycle through 0..9, prompts through `prompts`), for
            quality.
        batch_size: Images per generated batch; a timed round generates one batch per method.
        repeats: Timed rounds per cell (after quality generation and one untimed warm-up round, interleaved with
            rotating order).
        steps: Scheduler steps, one value or a list (a grid axis).
        scheduler: One of `SCHEDULERS`, or a list of them (a grid axis).
        grid: `"zip"` (cells pair the lists position by position) or `"product"` (every combination).
        guidance_scale: The value of the pipeline's guidance argument (`PipelineInputs.guidance`: classifier-free
            guidance, 1: off; for Flux-dev its distilled guidance); `None`: the pipeline's own default.
        seed: Seed of batch `i` is `seed + i`, for every method.
        device: Torch device.
        dtype: `float32`, `float16` or `bfloat16`.
        compile: `torch.compile` the denoiser block by block (`compile_blocks`).
        xformers: Use xformers' memory-efficient attention (needs the `xformers` extra).
        save_images: Folder to write every generated image to (see `ee_diffusion.bench.report.save_images`).
        reference: Real images to score FID/KID against, a folder of image files or an `.npz` of reference
            statistics (`ee_diffusion.metrics.save_reference_statistics`), for any model. Default: the held-out digits
            split, for the digits models only.
        fid_backend: Feature network of FID/KID against `reference`: "clean-fid", "torchmetrics" or "digits"
            (default: the one stored in the `.npz`, else "digits" for 1x32x32 images and "clean-fid" otherwise).
        inception_path: The local `inception-2015-12-05.pt` (or its folder) for the "clean-fid" backend.
        prompts: What a text-to-image pipeline generates, image `i` prompt `i % len(prompts)` (required for them,
            refused by the others).
        height: Image height for pipelines that take one (`None`: the pipeline's default).
        width: Image width for pipelines that take one (`None`: the pipeline's default).
        similarity_steps: Step count of the full-compute output that PSNR and SSIM compare with (`None`: each
            cell's own); `ee-diffusion sweep` sets its largest, so that every step count has one reference.
    """

    model: str = "digits-dit"
    methods: list[str] = field(default_factory=lambda: ["baseline"])
    num_samples: int = 250
    batch_size: int = 10
    repeats: int = 5
    steps: int | list[int] = 50
    scheduler: str | list[str] = "dpm-solver++"
    grid: str = "zip"
    guidance_scale: float | None = 1.0
    seed: int = 0
    device: str = "cpu"
    dtype: str = "float32"
    compile: bool = False
    xformers: bool = False
    save_images: str | None = None
    reference: str | None = None
    fid_backend: str | None = None
    inception_path: str | None = None
    prompts: list[str] | None = None
    height: int | None = None
    width: int | None = None
    similarity_steps: int | None = None

    def __post_init__(self) -> None:
        self.prompts = checked_prompts(self.prompts)
        for name in ("height", "width", "similarity_steps"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"`{name}` must be an integer of at least 1 or None, got {value!r}.")
        if self.guidance_scale is not None and not (
            isinstance(self.guidance_scale, (int, float))
            and math.isfinite(self.guidance_scale)
            and self.guidance_scale >= 0
        ):
            raise ValueError(f"`guidance_scale` must be a finite number >= 0 or None, got {self.guidance_scale!r}.")
        self.steps = [self.steps] if isinstance(self.steps, int) else list(self.steps)
        self.scheduler = [self.scheduler] if isinstance(self.scheduler, str) else list(self.scheduler)
        bad = [name for name in self.scheduler if name not in SCHEDULERS]
        if bad or not self.scheduler:
            raise ValueError(f"`scheduler` must be one of {sorted(SCHEDULERS)}, got {self.scheduler!r}.")
        if self.num_samples < 1 or self.batch_size < 1 or self.repeats < 1 or not self.steps or min(self.steps) < 1:
            raise ValueError("`num_samples`, `batch_size`, `repeats` and `steps` must be at least 1.")
        if not self.methods:
            raise ValueError("Give at least one method.")
        if self.dtype not in DTYPES:
            raise ValueError(f"`dtype` must be one of {sorted(DTYPES)}, got {self.dtype!r}.")
        if self.xformers and torch.device(self.device).type != "cuda":
            raise ValueError(
                f"xformers' memory-efficient attention runs on CUDA devices only, got "
                f"device={self.device!r}; leave out --xformers or use --device cuda."
            )
        if self.xformers and importlib.util.find_spec("xformers") is None:
            raise ImportError(
                "--xformers needs the xformers package, which is not installed; install it with "
                "`pip install 'ee-diffusion[xformers]'` (or `pip install xformers`)."
            )
        if self.reference is not None and not (
            Path(self.reference).is_dir() or (Path(self.reference).is_file() and self.reference.endswith(".npz"))
        ):
            raise FileNotFoundError(
                f"No reference at {self.reference}: give a folder of images or an .npz of "
                "statistics from ee_diffusion.metrics.save_reference_statistics."
            )
        if self.reference is not None and Path(self.reference).is_dir():
            image_files(self.reference)  # every image readable, before anything is generated
        if self.reference is None and (self.fid_backend is not None or self.inception_path is not None):
            raise ValueError(
                "A FID backend (--fid-backend) or Inception path (--inception-path) chooses how a reference "
                "(--reference) is scored, and none was given; the digits models are scored against the held-out "
                "digits in the digits network's features."
            )
        if self.fid_backend == "clean-fid" or self.inception_path is not None:
            find_inception_weights(self.inception_path)  # the network is there, before anything is generated
        if self.grid not in ("zip", "product"):
            raise ValueError(f"`grid` must be 'zip' or 'product', got {self.grid!r}.")
        if self.grid == "zip" and len({len(self.scheduler), len(self.steps)} - {1}) > 1:
            raise ValueError(
                f"grid='zip' pairs {self.scheduler} with {self.steps}: give lists of the same length "
                "(or one of length 1), or use grid='product'."
            )

    def cells(self) -> list[tuple[str, int]]:
        """The (scheduler, steps) cells of the grid, in order."""
        if self.grid == "product":
            return list(product(self.scheduler, self.steps))
        length = max(len(self.scheduler), len(self.steps))
        return [(self.scheduler[i % len(self.scheduler)], self.steps[i % len(self.steps)]) for i in range(length)]


def checked_prompts(prompts: Any) -> list[str] | None:
    """`prompts` as a list of non-empty texts, or `None`; a `ValueError`/`TypeError` naming the bad one otherwise."""
    if prompts is None:
        return None
    if isinstance(prompts, str) or not isinstance(prompts, (list, tuple)):
        raise TypeError(f"`prompts` must be a list of texts, got {prompts!r}.")
    prompts = list(prompts)
    if not all(isinstance(prompt, str) for prompt in prompts):
        raise TypeError(f"`prompts` must be a list of texts, got {prompts!r}.")
    if not prompts or not all(prompt.strip() for prompt in prompts):
        raise ValueError(f"`prompts` must be non-empty texts, at least one (or None for no prompts), got {prompts!r}.")
    return prompts


@dataclass
class _Run:
    """What one method produced in one cell: its images and block fractions batch by batch, its timed rounds (one
    `Timing` per process) and its speedups round by round."""

    method: Method
    fractions: list[tuple[float, int]] = field(default_factory=list)  # per batch: its block fraction and size
    images: dict[int, torch.Tensor] = field(default_factory=dict)
    timings: list[Timing] = field(default_factory=list)
    speedups: list[float] = field(default_factory=list)
    peak_memory_mb: float | None = None
    depth_profiles: list[list[float]] = field(default_factory=list)
    flops_per_image: float | None = None  # of one call of the timing batch (the first warm-up round, `_time`)


@dataclass
class _Cell:
    """One (scheduler, steps) cell: a run per method, and the full-compute run PSNR and SSIM compare with (one of
    `runs`, or one generated apart, without a row), when they are scored."""

    scheduler: str
    steps: int
    runs: list[_Run]
    reference: _Run | None = None

    @property
    def all_runs(self) -> list[_Run]:
        """The runs, then the reference when it has no row."""
        apart = self.reference is not None and all(self.reference is not run for run in self.runs)
        return [*self.runs, *([self.reference] * apart)]


def process_state(device: str) -> PartialState:
    """accelerate's process state; on the CPU it joins the processes of the launch with gloo."""
    return PartialState(cpu=torch.device(device).type == "cpu")


def check_random_model(model: str) -> None:
    """Refuse a `random:` model name that is not one of `RANDOM_MODELS`."""
    if model.startswith("random:") and model.removeprefix("random:") not in RANDOM_MODELS:
        raise ValueError(f"Unknown random model {model!r}; accepted: {['random:' + n for n in RANDOM_MODELS]}.")


def load_pipe(model: str, config: BenchConfig, device: torch.device) -> Any:
    """The pipeline of a bench model, on `device` in the config's dtype, compiled / with xformers as asked."""
    if model.startswith("random:"):
        name = model.removeprefix("random:")
        check_random_model(model)
        torch.manual_seed(0)
        transformer = DiTTransformer2DModel(**RANDOM_MODELS[name], in_channels=4, out_channels=8).eval()
        # torch's own cast: diffusers' `to(dtype)` warns of float32 modules even when a model has none
        torch.nn.Module.to(transformer, DTYPES[config.dtype])
        pipe = EarlyExitDiTPipeline(transformer=transformer, vae=None, scheduler=DDPMScheduler())
    else:
        pipe = load_early_exit_pipeline(model, dtype=DTYPES[config.dtype])
    pipe = pipe.to(device)
    if config.xformers:
        pipe.enable_xformers_memory_efficient_attention()
    if config.compile:
        compile_blocks(pipe)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def compile_blocks(pipe: Any, backend: str | Callable[..., Any] = "inductor") -> None:
    """`torch.compile` the denoiser block by block, before any hook is put on it: each block (its exit units,
    `exit_units`: the transformer blocks, or a U-Net's decoder resnets and attentions; for a denoiser early exit does
    not know, the children of its `nn.ModuleList`s) as one unit, and each attention, feed-forward and resnet module
    outside the blocks (a U-Net's encoder and mid block) on its own. Blocks of one shape share a graph (a transformer's
    blocks, all of them).

    The compiled function replaces each block's `forward`, so the hooks the methods later put on a block (exit
    schedules, DeeDiff, FirstBlockCache, ...) wrap it from outside: a block they skip or answer from a cache is simply
    not called, and their decisions (an exit at another depth, a reuse step) never reach a graph. Hooks *inside* a
    block would be traced into its graph, and putting them on and taking them off would recompile it; so each call of
    a block runs its graph with the submodules' forwards taken off for the call (the graph was traced without them),
    after looking at them:

    - the bench's work counters (`BlockWork`'s, on the attention and feed-forward modules inside the blocks) are
      counted by the block call, outside the graph, as their hooks would have counted them: a block that runs, runs
      every module in it, on the block's batch;
    - any other hook inside the block (diffusers' TaylorSeer, PyramidAttentionBroadcast and FasterCache hook the
      attention modules; a torch forward hook), or a forward patched otherwise, makes that call run the block's eager
      forward, beneath which its attention, feed-forward and resnet modules run compiled on their own (their graphs
      are made at the first such call, one per kind of call: self- and cross-attention, say).

    So once each graph has been made (a method's first calls, untimed in the bench), exits, reuse and hooks put on and
    taken off recompile nothing; a block called at another batch size compiles once more (to a graph with a dynamic
    batch size): the smaller last batch of a run, DeeDiff's `per_sample` exits.

    Args:
        pipe: A pipeline of the bench (`load_pipe`), or a denoiser; a schedule or exit heads a pipeline carries are
            taken off while the forwards are replaced, and put back after.
        backend: `torch.compile`'s backend (a name or a function). The bench compiles with torch's default,
            `"inductor"`; `"aot_eager"` traces, guards and recompiles alike without generating kernels (quicker, for
            tests).
    """
    components = {name: getattr(pipe, name, None) for name in ("exit_schedule", "exit_heads")}
    for name, component in components.items():
        if component is not None:
            setattr(pipe, name, None)  # their hooks come off while the forwards beneath them are replaced
    denoiser = denoiser_of(pipe)
    blocks = _blocks(denoiser)
    for module in denoiser.modules():
        if isinstance(module, COMPILED_MODULES) and all(module is not block for block in blocks):
            module.forward = torch.compile(module.forward, backend=backend)
    for block in blocks:
        block.forward = _compiled_block(block, backend)
    for name, component in components.items():
        if component is not None:
            setattr(pipe, name, component)


def _blocks(denoiser: torch.nn.Module) -> list[torch.nn.Module]:
    """The blocks `compile_blocks` compiles as units."""
    try:
        return exit_units(denoiser)
    except TypeError:  # a denoiser early exit does not know
        return [block for child in denoiser.children() if isinstance(child, torch.nn.ModuleList) for block in child]


def _compiled_block(block: torch.nn.Module, backend: str | Callable[..., Any]) -> Callable[..., Any]:
    """The `forward` of a compiled block (see `compile_blocks`)."""
    eager = block.forward
    graph = torch.compile(eager, backend=backend)
    inner = [(module, module.forward) for module in block.modules() if module is not block]

    @functools.wraps(eager)
    def forward(*args: Any, **kwargs: Any) -> Any:
        counters = []
        for module, own in inner:
            if module._forward_hooks or module._forward_pre_hooks:
                return eager(*args, **kwargs)
            if module.forward == own:
                continue
            registry = getattr(module, "_diffusers_hook", None)
            if registry is None or set(registry.hooks) != {BlockWork.NAME}:
                return eager(*args, **kwargs)
            counters.append(registry.get_hook(BlockWork.NAME))
        if counters:
            rows = batch_rows(args, kwargs)
            for counter in counters:  # its module runs in the graph
                counter.count(rows)
        taken = [(module, vars(module).pop("forward")) for module, _ in inner if "forward" in vars(module)]
        try:
            return graph(*args, **kwargs)
        finally:
            for module, patched in taken:
                module.forward = patched

    return forward


def _generate(
    run: _Run, pipe: Any, conditions: list[Any], seed: int, config: BenchConfig, steps: int, device: torch.device
) -> tuple[torch.Tensor, float]:
    """One call of the method: its images (on the CPU) and executed block fraction, against the full model at the
    cell's `steps` (a method at its own step count, `@N`, scales its per-call fraction by N / steps). Where the method
    varies the work, the blocks' worth of work of each denoiser call goes to `run.depth_profiles`."""
    cuda = device.type == "cuda"
    own_steps = run.method.steps or steps
    with run.method.session(pipe) as work:
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        images = _call(pipe, conditions, seed, config, own_steps, device)
        if cuda:
            peak = torch.cuda.max_memory_allocated(device) / 2**20
            run.peak_memory_mb = max(run.peak_memory_mb or 0.0, peak)
        depths = work.depths()
        if depths is not None:
            run.depth_profiles.append(depths)
        return images.float().cpu(), work() * own_steps / steps


def _call(
    pipe: Any, conditions: list[Any], seed: int, config: BenchConfig, steps: int, device: torch.device
) -> torch.Tensor:
    """One pipeline call for one batch of `conditions` (class labels, prompts or `None`s): its images, NCHW."""
    generator = torch.Generator(device).manual_seed(seed)
    kwargs = pipeline_inputs(pipe).call_kwargs(conditions, config.guidance_scale, config.height, config.width)
    images = pipe(**kwargs, generator=generator, num_inference_steps=steps, output_type="pt").images
    if not isinstance(images, torch.Tensor):  # DDPM and DDIM give NHWC arrays whatever the output type
        images = torch.from_numpy(images).permute(0, 3, 1, 2)
    return images


def run_bench(config: BenchConfig, progress: bool = True, pipes: dict[str, Any] | None = None) -> list[BenchRow]:
    """Generate `num_samples` images per method and cell, interleaved batch by batch, and score them.

    `pipes`: pipelines already loaded (by `load_pipe`, by model name) to use instead of loading them again; the bench
    swaps their schedulers. Returns the rows on the main process (one per method and cell, cell by cell), and `[]` on
    the others.
    """
    state = process_state(config.device)
    device = torch.device(config.device)
    if state.num_processes > 1 and state.device.type == device.type:
        device = state.device  # one accelerator per process
    pipes = dict(pipes or {})
    schedulers = {model: pipe.scheduler.config for model, pipe in pipes.items()}

    cell_scheduler: list[str] = []  # the scheduler of the cell being built or run

    def pipe_of(model: str) -> Any:
        if model not in pipes:
            pipes[model] = load_pipe(model, config, device)
            schedulers[model] = pipes[model].scheduler.config
            if cell_scheduler:  # a model loaded while a cell's methods are built samples with the cell's scheduler
                pipes[model].scheduler = build_scheduler(cell_scheduler[-1], schedulers[model])
        return pipes[model]

    inputs = pipeline_inputs(pipe_of(config.model))
    inputs.check(config.model, config.prompts, config.height, config.width, config.guidance_scale)
    if config.num_samples < 2 and (config.reference is not None or _is_digits_shaped(pipe_of(config.model), config)):
        raise ValueError(
            f"FID/KID of {config.model} need at least 2 samples per method, got num_samples={config.num_samples}."
        )
    conditions = inputs.conditions(config.num_samples, config.prompts)
    batches = [conditions[i : i + config.batch_size] for i in range(0, config.num_samples, config.batch_size)]

    def use_scheduler(scheduler: str) -> None:
        cell_scheduler.append(scheduler)
        for model in [config.model, *pipes]:
            pipe = pipe_of(model)
            pipe.scheduler = build_scheduler(scheduler, schedulers[model])

    cells = []  # every cell's methods, built (and so checked) before anything is generated
    for scheduler, steps in config.cells():
        use_scheduler(scheduler)  # before building (MagCache calibrates at the cell's scheduler and steps)
        target = Target(config.model, pipe_of, steps, _small_call(pipe_of(config.model), batches[0], config))
        methods = [build_method(spec, target) for spec in config.methods]
        if len({m.name for m in methods}) != len(methods):
            raise ValueError(f"Methods must be distinct, got {config.methods}.")
        if all(method.unsupported is not None for method in methods):
            reasons = "; ".join(f"{method.name}: {method.unsupported}" for method in methods)
            raise ValueError(f"No method can run on {config.model}: {reasons}.")
        cells.append(_Cell(scheduler, steps, [_Run(method) for method in methods]))
    for model, pipe in pipes.items():  # every model of the methods (fine-tuned ones) takes the same inputs
        if model != config.model:
            pipeline_inputs(pipe).check(model, config.prompts, config.height, config.width, config.guidance_scale)
    if _scoring(config, pipes) == "similarity":
        for cell in cells:
            cell.reference = _full_compute_run(cell, config, pipe_of)
    bar = tqdm(total=0, desc="generating", disable=not (progress and state.is_main_process))  # this process's calls
    for cell in cells:
        use_scheduler(cell.scheduler)
        active = [run for run in cell.runs if run.method.unsupported is None]
        generating = [run for run in cell.all_runs if run.method.unsupported is None]
        with state.split_between_processes(list(range(len(batches)))) as mine:
            bar.total += len(mine) * len(generating) + (TIMING_WARMUP + config.repeats) * len(active)
            bar.refresh()
            for index in mine:
                for offset in range(len(generating)):
                    run = generating[(index + offset) % len(generating)]
                    images, fraction = _generate(
                        run, pipes[run.method.model], batches[index], config.seed + index, config, cell.steps, device
                    )
                    run.images[index] = images
                    run.fractions.append((fraction, len(images)))
                    bar.update()
        _time(active, pipes, batches[0], config, cell.steps, device, bar)
    bar.close()
    gathered = gather_object(
        [
            [
                (
                    run.images,
                    run.fractions,
                    run.timings,
                    run.speedups,
                    run.peak_memory_mb,
                    run.depth_profiles,
                    run.flops_per_image,
                )
                for run in cell.all_runs
            ]
            for cell in cells
        ]
    )
    if not state.is_main_process:
        return []
    for position, cell in enumerate(cells):  # every process's part of each cell, in process order
        parts = gathered[position :: len(cells)]
        for number, run in enumerate(cell.all_runs):
            run.images = {i: image for part in parts for i, image in part[number][0].items()}
            run.fractions = [f for part in parts for f in part[number][1]]
            run.timings = [timing for part in parts for timing in part[number][2]]
            run.speedups = [ratio for part in parts for ratio in part[number][3]]
            peaks = [part[number][4] for part in parts if part[number][4] is not None]
            run.peak_memory_mb = max(peaks) if peaks else None
            run.depth_profiles = [profile for part in parts for profile in part[number][5]]
            run.flops_per_image = parts[0][number][6]  # every process counts the same batch
    rows = _score(cells, conditions, config, len(batches[0]), pipes, progress)
    if config.save_images:
        if inputs.conditioning == "prompt":
            names = [f"prompt{i % len(config.prompts)}" for i in range(config.num_samples)]
        else:
            names = conditions if inputs.conditioning == "class_labels" else [""] * config.num_samples
        save_images(config.save_images, rows, [run.images for cell in cells for run in cell.runs], names)
    return rows


def _full_compute_run(cell: _Cell, config: BenchConfig, pipe_of: Any) -> _Run:
    """The run of the model at full depth at `similarity_steps` (default: the cell's), from the cell's own methods
    (`baseline`, `baseline@N`) when it has it, else a run of its own."""
    steps = config.similarity_steps or cell.steps
    spec = "baseline" if steps == cell.steps else f"baseline@{steps}"
    same = [run for run in cell.runs if run.method.name == spec and run.method.unsupported is None]
    return same[0] if same else _Run(build_method(spec, Target(config.model, pipe_of, cell.steps)))


def _small_call(pipe: Any, conditions: list[Any], config: BenchConfig) -> dict[str, Any]:
    """The arguments of a call of two images of the bench's own conditions (without guidance where it has any): what
    MagCache calibrates on."""
    inputs = pipeline_inputs(pipe)
    two = (list(conditions) * 2)[:2]
    return inputs.call_kwargs(two, 1.0 if inputs.guidance is not None else None, config.height, config.width)


def _time(
    active: list[_Run],
    pipes: dict[str, Any],
    conditions: list[Any],
    config: BenchConfig,
    steps: int,
    device: torch.device,
    bar: tqdm,
) -> None:
    """`TIMING_WARMUP` untimed rounds, then `config.repeats` timed rounds, of one batch per method, interleaved with
    rotating order (the device synchronised before each clock read on CUDA); this process's `Timing` and
    round-by-round speedups against the baseline go to each run. Each method's first call, in the first untimed round,
    runs under torch's FLOP counter (`count_flops`), which gives the run its floating-point operations per image (the
    whole pipeline call's); not under `compile`, whose first call compiles (and the counter sees no compiled
    kernel)."""

    def timed_call(run: _Run) -> None:
        counting = run.flops_per_image is None and not config.compile  # its first call, in the untimed round
        with (
            run.method.session(pipes[run.method.model]),
            count_flops() if counting else contextlib.nullcontext() as counted,
        ):
            _call(pipes[run.method.model], conditions, config.seed, config, run.method.steps or steps, device)
        if counting:
            run.flops_per_image = counted.total / len(conditions)
        bar.update()

    calls = {run.method.name: partial(timed_call, run) for run in active}
    timings = time_interleaved(calls, repeats=config.repeats, warmup=TIMING_WARMUP, device=device)
    baseline = timings.get("baseline")
    for run in active:
        timing = timings[run.method.name]
        run.timings.append(timing)
        if baseline is not None:
            run.speedups.extend(round_speedups(baseline, timing))


def _scoring(config: BenchConfig, pipes: dict[str, Any]) -> str | None:
    """How quality is scored: `"fid"` (against `reference`, or the held-out digits for the digits models),
    `"similarity"` (PSNR and SSIM against the full-compute output) or `None` (the latents of `random:` models)."""
    if config.reference is not None or all(_is_digits_shaped(pipe, config) for pipe in pipes.values()):
        return "fid"
    return None if config.model.startswith("random:") else "similarity"


def _score(
    cells: list[_Cell],
    conditions: list[Any],
    config: BenchConfig,
    timed_images: int,
    pipes: dict[str, Any],
    progress: bool,
) -> list[BenchRow]:
    scoring = _scoring(config, pipes)
    digits = all(_is_digits_shaped(pipe, config) for pipe in pipes.values())
    extractor, reference = _quality_reference(config, digits, progress) if scoring == "fid" else (None, None)
    if scoring is None:
        logger.warning("%s makes latents, not images: speed rows only.", config.model)
    classifier = load_digits_classifier() if digits and scoring == "fid" else None
    against = config.reference or ("the held-out digits" if digits else None)
    rows = []
    bar = tqdm(
        total=sum(len(cell.runs) for cell in cells),
        desc="scoring",
        disable=not (scoring is not None and progress),
    )
    for cell in cells:
        baseline = next((run for run in cell.runs if run.method.name == "baseline"), None)
        full = (
            None
            if cell.reference is None
            else torch.cat([cell.reference.images[i] for i in sorted(cell.reference.images)])
        )
        for run in cell.runs:
            bar.update()
            row = BenchRow(
                method=run.method.name,
                model=run.method.model,
                scheduler=cell.scheduler,
                steps=cell.steps,
                num_samples=config.num_samples,
                fid=None,
                kid=None,
                class_accuracy=None,
                images_per_s=None,
                timing_spread=None,
                speedup=None,
                block_fraction=None,
                peak_memory_mb=None,
                note=run.method.unsupported,
            )
            rows.append(row)
            if row.note is not None:
                continue
            # Every process timed its rounds at the same time: their throughputs add up.
            row.images_per_s = sum(timed_images / timing.median for timing in run.timings)
            row.timing_spread = max(timing.spread for timing in run.timings)
            row.speedup = statistics.median(run.speedups) if baseline is not None else None
            row.block_fraction = statistics.fmean(*zip(*run.fractions))  # per image: a short last batch weighs less
            row.peak_memory_mb = run.peak_memory_mb
            if run.flops_per_image is not None:
                row.gflop_per_image = run.flops_per_image / 1e9
                if baseline is not None and baseline.flops_per_image:
                    row.flop_fraction = run.flops_per_image / baseline.flops_per_image
            if run.depth_profiles:  # one per batch, each a depth per sampling step: their mean, step by step
                row.depth_per_step = [statistics.fmean(depths) for depths in zip(*run.depth_profiles)]
            images = torch.cat([run.images[i] for i in sorted(run.images)])
            if full is not None:
                similarity = image_similarity(images, full)
                row.psnr, row.ssim = similarity.psnr, similarity.ssim
                row.quality_reference = f"full compute: baseline@{config.similarity_steps or cell.steps}"
            if extractor is None:
                continue
            quality = compute_fid_kid(images, reference, extractor=extractor, progress=progress)
            row.fid, row.kid, row.quality_reference = quality.fid, quality.kid, against
            if classifier is not None:
                row.class_accuracy = class_accuracy(images, _class_labels(conditions), classifier)
    bar.close()
    return rows


def _quality_reference(
    config: BenchConfig, digits: bool, progress: bool
) -> tuple[FeatureExtractor | None, ReferenceStatistics | None]:
    """The feature network and reference statistics FID/KID are scored with: `--reference`, else (for the digits
    models) the held-out digits split through the digits network."""
    if config.reference is None:
        extractor = FeatureExtractor("digits", device=config.device)
        heldout = (load_digits_split("heldout").images + 1) / 2
        return extractor, ReferenceStatistics.from_features(extractor.features(heldout), backend="digits")
    stored = load_reference_statistics(config.reference) if config.reference.endswith(".npz") else None
    backend = config.fid_backend or (stored.backend if stored else None) or ("digits" if digits else "clean-fid")
    extractor = FeatureExtractor(backend, inception_path=config.inception_path, device=config.device)
    if stored is None:  # a folder: its features once, for every method
        stored = ReferenceStatistics.from_features(extractor.features(config.reference, progress), backend=backend)
    return extractor, stored


def _is_digits_shaped(pipe: Any, config: BenchConfig | None = None) -> bool:
    """A model of the digits, scored against the held-out digits by default (with the class accuracy of each image):
    a pixel-space model of 1 x 32 x 32 images, or a text-to-image one asked for 1-channel 32 x 32 images of digit
    prompts only (`digits-flux`: "a handwritten seven")."""
    vae = getattr(pipe, "vae", None)
    if vae is None:
        denoiser = denoiser_of(pipe).config
        return (denoiser.get("in_channels"), denoiser.get("sample_size")) == (1, 32)
    prompts = config.prompts if config is not None else None
    return (
        vae.config.get("out_channels") == 1
        and (config.height, config.width) == (DIGITS_IMAGE_SIZE, DIGITS_IMAGE_SIZE)
        and bool(prompts)
        and all(digit_of_prompt(prompt) is not None for prompt in prompts)
    )


def _class_labels(conditions: list[Any]) -> torch.Tensor:
    """The class each image was asked for: its class label, or the digit of its digit prompt."""
    return torch.tensor([c if isinstance(c, int) else digit_of_prompt(c) for c in conditions])
