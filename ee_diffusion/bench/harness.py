"""`ee-diffusion bench`: methods side by side on one model, in one run: speed, executed blocks and sample quality.

Quality: every method generates the same class labels from the same seeds, batch by batch, the methods taking turns.
FID and KID are scored against `reference` (`ee_diffusion.metrics.compute_fid_kid`); the digits models default to the
held-out digits split seen through the digits feature network, whose predictions also give their class accuracy.
Other models without a reference get speed rows only.

Speed is timed apart from quality generation, after it (which is its warm-up): `repeats` rounds in which every method
generates one batch, the order rotating from round to round (`ee_diffusion.metrics.time_interleaved`). `images_per_s`
comes from the median round, `timing_spread` is the rounds' interquartile range over their median, and `speedup` is
the median over rounds of the `baseline` row's seconds over the method's (same scheduler and steps), each ratio taken
within one round, so a slow spell of the machine cancels out of it. Each timed call puts the method on the pipeline
and takes it off again around the generation.

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

import importlib.util
import logging
import statistics
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
from ..exits import denoiser_of
from ..metrics import (
    FeatureExtractor,
    ReferenceStatistics,
    Timing,
    class_accuracy,
    compute_fid_kid,
    image_files,
    load_digits_classifier,
    load_reference_statistics,
    round_speedups,
    time_interleaved,
)
from ..pipelines import EarlyExitDiTPipeline, load_early_exit_pipeline
from .methods import Method, Target, build_method
from .noise_schedulers import SCHEDULERS, build_scheduler
from .report import BenchRow, save_images

logger = logging.getLogger(__name__)

# What `--compile` compiles: the modules that hold the arithmetic, below every hook of the methods.
COMPILED_MODULES = (Attention, FeedForward, ResnetBlock2D)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

# `random:<name>` models: DiTTransformer2DModel configs (4 latent channels, learned sigma, 1000 classes).
RANDOM_MODELS = {
    "dit-xl-2": dict(num_layers=28, num_attention_heads=16, attention_head_dim=72, sample_size=32, patch_size=2),
    "dit-tiny": dict(num_layers=4, num_attention_heads=2, attention_head_dim=8, sample_size=8, patch_size=2),
}


@dataclass
class BenchConfig:
    """What `run_bench` measures.

    Args:
        model: Shipped model name (`digits-dit`, `digits-unet`), folder, hub id or `random:<name>` (`RANDOM_MODELS`).
        methods: Method specs (see `ee_diffusion.bench.methods`).
        num_samples: Images per method and cell (class labels cycle through 0..9), for quality.
        batch_size: Images per generated batch; a timed round generates one batch per method.
        repeats: Timed rounds per cell (after quality generation, interleaved with rotating order).
        steps: Scheduler steps, one value or a list (a grid axis).
        scheduler: One of `SCHEDULERS`, or a list of them (a grid axis).
        grid: `"zip"` (cells pair the lists position by position) or `"product"` (every combination).
        guidance_scale: Classifier-free guidance scale (1: off).
        seed: Seed of batch `i` is `seed + i`, for every method.
        device: Torch device.
        dtype: `float32`, `float16` or `bfloat16`.
        compile: `torch.compile` the denoiser's attention, feed-forward and resnet modules (`compile_regions`).
        xformers: Use xformers' memory-efficient attention (needs the `xformers` extra).
        save_images: Folder to write every generated image to (see `ee_diffusion.bench.report.save_images`).
        reference: Real images to score FID/KID against, a folder of image files or an `.npz` of reference
            statistics (`ee_diffusion.metrics.save_reference_statistics`), for any model. Default: the held-out digits
            split, for the digits models only.
        fid_backend: Feature network of FID/KID against `reference`: "clean-fid", "torchmetrics" or "digits"
            (default: the one stored in the `.npz`, else "digits" for 1x32x32 images and "clean-fid" otherwise).
        inception_path: The local `inception-2015-12-05.pt` (or its folder) for the "clean-fid" backend.
    """

    model: str = "digits-dit"
    methods: list[str] = field(default_factory=lambda: ["baseline"])
    num_samples: int = 250
    batch_size: int = 10
    repeats: int = 5
    steps: int | list[int] = 50
    scheduler: str | list[str] = "dpm-solver++"
    grid: str = "zip"
    guidance_scale: float = 1.0
    seed: int = 0
    device: str = "cpu"
    dtype: str = "float32"
    compile: bool = False
    xformers: bool = False
    save_images: str | None = None
    reference: str | None = None
    fid_backend: str | None = None
    inception_path: str | None = None

    def __post_init__(self) -> None:
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


@dataclass
class _Run:
    """What one method produced in one cell: its images and block fractions batch by batch, its timed rounds (one
    `Timing` per process) and its speedups round by round."""

    method: Method
    fractions: list[float] = field(default_factory=list)
    images: dict[int, torch.Tensor] = field(default_factory=dict)
    timings: list[Timing] = field(default_factory=list)
    speedups: list[float] = field(default_factory=list)
    peak_memory_mb: float | None = None
    depth_profiles: list[list[float]] = field(default_factory=list)


def process_state(device: str) -> PartialState:
    """accelerate's process state; on the CPU it joins the processes of the launch with gloo."""
    return PartialState(cpu=torch.device(device).type == "cpu")


def load_pipe(model: str, config: BenchConfig, device: torch.device) -> Any:
    """The pipeline of a bench model, on `device` in the config's dtype, compiled / with xformers as asked."""
    if model.startswith("random:"):
        name = model.removeprefix("random:")
        if name not in RANDOM_MODELS:
            raise ValueError(f"Unknown random model {model!r}; accepted: {['random:' + n for n in RANDOM_MODELS]}.")
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
        compile_regions(pipe)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def compile_regions(pipe: Any) -> None:
    """`torch.compile` the forward of each attention, feed-forward and resnet module of the denoiser (regional
    compilation), beneath the hooks the methods put on blocks and attention modules: their per-step decisions (which
    block to skip, what to reuse) stay in Python and never invalidate a compiled graph, as they would in a compiled
    whole denoiser."""
    schedule = getattr(pipe, "exit_schedule", None)
    pipe.exit_schedule = None  # a loaded schedule's hooks come off while the forwards beneath them are swapped
    for module in denoiser_of(pipe).modules():
        if isinstance(module, COMPILED_MODULES):
            module.forward = torch.compile(module.forward)
    pipe.exit_schedule = schedule


def _generate(
    run: _Run, pipe: Any, labels: list[int], seed: int, config: BenchConfig, steps: int, device: torch.device
) -> tuple[torch.Tensor, float]:
    """One call of the method: its images (on the CPU) and executed block fraction, against the full model at the
    cell's `steps` (a method at its own step count, `@N`, scales its per-call fraction by N / steps). Where the method
    varies the work, the blocks' worth of work of each denoiser call goes to `run.depth_profiles`."""
    cuda = device.type == "cuda"
    own_steps = run.method.steps or steps
    with run.method.session(pipe) as work:
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        images = _call(pipe, labels, seed, config, own_steps, device)
        if cuda:
            peak = torch.cuda.max_memory_allocated(device) / 2**20
            run.peak_memory_mb = max(run.peak_memory_mb or 0.0, peak)
        depths = work.depths()
        if depths is not None:
            run.depth_profiles.append(depths)
        return images.float().cpu(), work() * own_steps / steps


def _call(pipe: Any, labels: list[int], seed: int, config: BenchConfig, steps: int, device: torch.device) -> Any:
    generator = torch.Generator(device).manual_seed(seed)
    return pipe(
        class_labels=labels,
        guidance_scale=config.guidance_scale,
        generator=generator,
        num_inference_steps=steps,
        output_type="pt",
    ).images


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

    if config.num_samples < 2 and (config.reference is not None or _is_digits_shaped(pipe_of(config.model))):
        raise ValueError(
            f"FID/KID of {config.model} need at least 2 samples per method, got num_samples={config.num_samples}."
        )
    labels = [i % 10 for i in range(config.num_samples)]
    batches = [labels[i : i + config.batch_size] for i in range(0, config.num_samples, config.batch_size)]

    def use_scheduler(scheduler: str) -> None:
        cell_scheduler.append(scheduler)
        for model in [config.model, *pipes]:
            pipe = pipe_of(model)
            pipe.scheduler = build_scheduler(scheduler, schedulers[model])

    cells = []  # every cell's methods, built (and so checked) before anything is generated
    for scheduler, steps in config.cells():
        use_scheduler(scheduler)  # before building (MagCache calibrates at the cell's scheduler and steps)
        methods = [build_method(spec, Target(config.model, pipe_of, steps)) for spec in config.methods]
        if len({m.name for m in methods}) != len(methods):
            raise ValueError(f"Methods must be distinct, got {config.methods}.")
        if all(method.unsupported is not None for method in methods):
            reasons = "; ".join(f"{method.name}: {method.unsupported}" for method in methods)
            raise ValueError(f"No method can run on {config.model}: {reasons}.")
        cells.append((scheduler, steps, [_Run(method) for method in methods]))
    bar = tqdm(total=0, desc="generating", disable=not (progress and state.is_main_process))  # this process's calls
    results = []
    for scheduler, steps, runs in cells:
        use_scheduler(scheduler)
        active = [run for run in runs if run.method.unsupported is None]
        with state.split_between_processes(list(range(len(batches)))) as mine:
            bar.total += (len(mine) + config.repeats) * len(active)
            bar.refresh()
            for index in mine:
                for offset in range(len(active)):
                    run = active[(index + offset) % len(active)]
                    images, fraction = _generate(
                        run, pipes[run.method.model], batches[index], config.seed + index, config, steps, device
                    )
                    run.images[index] = images
                    run.fractions.append(fraction)
                    bar.update()
        _time(active, pipes, batches[0], config, steps, device, bar)
        results.append((scheduler, steps, runs))
    bar.close()
    gathered = gather_object(
        [
            [
                (run.images, run.fractions, run.timings, run.speedups, run.peak_memory_mb, run.depth_profiles)
                for run in runs
            ]
            for _, _, runs in results
        ]
    )
    if not state.is_main_process:
        return []
    for position, (_, _, runs) in enumerate(results):  # every process's part of each cell, in process order
        parts = gathered[position :: len(results)]
        for number, run in enumerate(runs):
            run.images = {i: image for part in parts for i, image in part[number][0].items()}
            run.fractions = [f for part in parts for f in part[number][1]]
            run.timings = [timing for part in parts for timing in part[number][2]]
            run.speedups = [ratio for part in parts for ratio in part[number][3]]
            peaks = [part[number][4] for part in parts if part[number][4] is not None]
            run.peak_memory_mb = max(peaks) if peaks else None
            run.depth_profiles = [profile for part in parts for profile in part[number][5]]
    rows = _score(results, labels, config, len(batches[0]), pipes, progress)
    if config.save_images:
        save_images(config.save_images, rows, [run.images for _, _, runs in results for run in runs], labels)
    return rows


def _time(
    active: list[_Run],
    pipes: dict[str, Any],
    labels: list[int],
    config: BenchConfig,
    steps: int,
    device: torch.device,
    bar: tqdm,
) -> None:
    """`config.repeats` timed rounds of one batch per method, interleaved with rotating order; this process's
    `Timing` and round-by-round speedups against the baseline go to each run."""

    def timed_call(run: _Run) -> None:
        with run.method.session(pipes[run.method.model]):
            _call(pipes[run.method.model], labels, config.seed, config, run.method.steps or steps, device)
        bar.update()

    calls = {run.method.name: partial(timed_call, run) for run in active}
    timings = time_interleaved(calls, repeats=config.repeats, warmup=0, device=device)
    baseline = timings.get("baseline")
    for run in active:
        timing = timings[run.method.name]
        run.timings.append(timing)
        if baseline is not None:
            run.speedups.extend(round_speedups(baseline, timing))


def _score(
    results: list[tuple[str, int, list[_Run]]],
    labels: list[int],
    config: BenchConfig,
    timed_images: int,
    pipes: dict[str, Any],
    progress: bool,
) -> list[BenchRow]:
    digits = all(_is_digits_shaped(pipe) for pipe in pipes.values())
    extractor, reference = _quality_reference(config, digits, progress)
    classifier = load_digits_classifier() if digits else None
    rows = []
    bar = tqdm(
        total=sum(len(runs) for _, _, runs in results),
        desc="scoring",
        disable=not (extractor is not None and progress),
    )
    for scheduler, steps, runs in results:
        baseline = next((run for run in runs if run.method.name == "baseline"), None)
        for run in runs:
            bar.update()
            row = BenchRow(
                method=run.method.name,
                model=run.method.model,
                scheduler=scheduler,
                steps=steps,
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
            row.block_fraction = statistics.fmean(run.fractions)
            row.peak_memory_mb = run.peak_memory_mb
            if run.depth_profiles:  # one per batch, each a depth per sampling step: their mean, step by step
                row.depth_per_step = [statistics.fmean(depths) for depths in zip(*run.depth_profiles)]
            if extractor is None:
                continue
            images = torch.cat([run.images[i] for i in sorted(run.images)])
            quality = compute_fid_kid(images, reference, extractor=extractor, progress=progress)
            row.fid, row.kid = quality.fid, quality.kid
            if classifier is not None:
                row.class_accuracy = class_accuracy(images, torch.tensor(labels), classifier)
    bar.close()
    return rows


def _quality_reference(
    config: BenchConfig, digits: bool, progress: bool
) -> tuple[FeatureExtractor | None, ReferenceStatistics | None]:
    """The feature network and reference statistics FID/KID are scored with: `--reference`, else (for the digits
    models) the held-out digits split through the digits network; `(None, None)` when quality cannot be scored."""
    if config.reference is None and not digits:
        logger.warning("No --reference: quality is scored for the pixel-space digits models only; speed rows only.")
        return None, None
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


def _is_digits_shaped(pipe: Any) -> bool:
    """A pixel-space model of 1 x 32 x 32 images: scored against the held-out digits by default."""
    denoiser = denoiser_of(pipe)
    shape = (denoiser.config.in_channels, denoiser.config.sample_size)
    return getattr(pipe, "vae", None) is None and shape == (1, 32)
