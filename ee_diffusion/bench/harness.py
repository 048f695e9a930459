"""`ee-diffusion bench`: methods side by side on one model, in one run: speed, executed blocks and sample quality.

Every method generates the same class labels from the same seeds, batch by batch, and the methods take turns batch
by batch (the order rotating each round), so a slow spell of the machine is shared out and the speed ratios are
trustworthy. Speed is the median seconds per batch; `speedup` is against the `baseline` row. Quality is scored by the
digits feature network against the held-out digits split (FID, KID) and by its predictions (class accuracy), for
the digits models; other models get speed rows only.

Methods (comma-separated in `--methods`):
- `baseline`: the model at full depth;
- `ase:<spec>`: the model under an exit schedule (`linear:M`, `cosine:M`, `step:d1,...` or a schedule folder);
- `finetuned:<model>`: another model folder, typically ASE fine-tuned, with the exit schedule saved in it.
"""

from __future__ import annotations

import logging
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler
from tqdm.auto import tqdm

from ..data import load_digits_split
from ..exits import num_exit_blocks
from ..metrics import class_accuracy, digits_features, frechet_distance, kernel_distance, load_digits_classifier
from ..pipelines import load_early_exit_pipeline
from ..schedules import ExitSchedule

logger = logging.getLogger(__name__)

SCHEDULERS = {
    "dpm-solver++": lambda config: DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++"),
    "ddim": DDIMScheduler.from_config,
    "ddpm": DDPMScheduler.from_config,
    "euler": EulerDiscreteScheduler.from_config,
}


METHOD_KINDS = ("baseline", "ase", "finetuned")


def parse_methods(text: str) -> list[str]:
    """Split a `--methods` string on the commas that start a new method, so `ase:step:12,8,4` stays whole."""
    methods: list[str] = []
    for piece in text.split(","):
        if piece.partition(":")[0] in METHOD_KINDS or not methods:
            methods.append(piece)
        else:
            methods[-1] += "," + piece
    return methods


@dataclass
class BenchConfig:
    """What `run_bench` measures.

    Args:
        model: Shipped model name (`digits-dit`, `digits-unet`), folder or hub id of the baseline.
        methods: Method specs (see the module docstring).
        num_samples: Images per method (class labels cycle through 0..9).
        batch_size: Images per timed batch.
        steps: Scheduler steps.
        scheduler: One of `SCHEDULERS`.
        guidance_scale: Classifier-free guidance scale (1: off).
        seed: Seed of batch `i` is `seed + i`, for every method.
        device: Torch device.
    """

    model: str = "digits-dit"
    methods: list[str] = field(default_factory=lambda: ["baseline"])
    num_samples: int = 2000
    batch_size: int = 250
    steps: int = 50
    scheduler: str = "dpm-solver++"
    guidance_scale: float = 1.0
    seed: int = 0
    device: str = "cpu"

    def __post_init__(self) -> None:
        if self.scheduler not in SCHEDULERS:
            raise ValueError(f"`scheduler` must be one of {sorted(SCHEDULERS)}, got {self.scheduler!r}.")
        if self.num_samples < 1 or self.batch_size < 1 or self.steps < 1:
            raise ValueError("`num_samples`, `batch_size` and `steps` must be at least 1.")
        if not self.methods:
            raise ValueError("Give at least one method.")


@dataclass
class BenchRow:
    method: str
    model: str
    scheduler: str
    steps: int
    num_samples: int
    fid: float | None
    kid: float | None
    class_accuracy: float | None
    images_per_s: float
    speedup: float | None
    block_fraction: float
    peak_memory_mb: float | None


@dataclass
class _Method:
    name: str
    model: str
    pipe: Any
    schedule: ExitSchedule | None
    seconds: list[float] = field(default_factory=list)
    fractions: list[float] = field(default_factory=list)
    images: list[torch.Tensor] = field(default_factory=list)
    peak_memory_mb: float | None = None


def _build_methods(config: BenchConfig) -> list[_Method]:
    pipes: dict[str, Any] = {}

    def pipe_of(model: str) -> Any:
        if model not in pipes:
            pipe = load_early_exit_pipeline(model, dtype=torch.float32).to(config.device)
            pipe.scheduler = SCHEDULERS[config.scheduler](pipe.scheduler.config)
            pipe.set_progress_bar_config(disable=True)
            pipes[model] = pipe
        return pipes[model]

    methods = []
    for spec in config.methods:
        kind, _, argument = spec.partition(":")
        if kind == "baseline" and not argument:
            methods.append(_Method(spec, config.model, pipe_of(config.model), None))
        elif kind == "ase" and argument:
            pipe = pipe_of(config.model)
            methods.append(_Method(spec, config.model, pipe, ExitSchedule.from_spec(argument, num_exit_blocks(pipe))))
        elif kind == "finetuned" and argument:
            pipe = pipe_of(argument)
            methods.append(_Method(spec, argument, pipe, pipe.exit_schedule))
        else:
            raise ValueError(f"Unknown method {spec!r}; expected baseline, ase:<schedule> or finetuned:<model>.")
    if len({m.name for m in methods}) != len(methods):
        raise ValueError(f"Methods must be distinct, got {config.methods}.")
    return methods


def _generate(method: _Method, labels: list[int], seed: int, config: BenchConfig) -> tuple[torch.Tensor, float]:
    pipe = method.pipe
    pipe.exit_schedule = method.schedule
    generator = torch.Generator(config.device).manual_seed(seed)
    cuda = torch.device(config.device).type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    began = time.perf_counter()
    images = pipe(class_labels=labels, guidance_scale=config.guidance_scale, generator=generator,
                  num_inference_steps=config.steps, output_type="pt").images  # fmt: skip
    if cuda:
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2**20
        method.peak_memory_mb = max(method.peak_memory_mb or 0.0, peak)
    return images.cpu(), time.perf_counter() - began


def run_bench(config: BenchConfig, progress: bool = True) -> list[BenchRow]:
    """Generate `num_samples` images per method, interleaved batch by batch, and score them."""
    methods = _build_methods(config)
    labels = [i % 10 for i in range(config.num_samples)]
    batches = [labels[i : i + config.batch_size] for i in range(0, config.num_samples, config.batch_size)]
    for method in methods:  # warm-up: first-call costs (allocations, kernel selection) stay out of the timings
        _generate(method, labels[:2], config.seed, config)
    bar = tqdm(total=len(batches) * len(methods), desc="generating", disable=not progress)
    for index, batch in enumerate(batches):
        for offset in range(len(methods)):
            method = methods[(index + offset) % len(methods)]
            images, seconds = _generate(method, batch, config.seed + index, config)
            method.images.append(images)
            method.seconds.append(seconds / len(batch))
            stats = method.pipe.exit_stats
            method.fractions.append(1.0 if stats is None else stats.block_fraction)
            bar.update()
    bar.close()
    return _score(methods, labels, config)


def _score(methods: list[_Method], labels: list[int], config: BenchConfig) -> list[BenchRow]:
    digits = all(getattr(m.pipe, "vae", None) is None and _is_digits_shaped(m.pipe) for m in methods)
    if digits:
        classifier = load_digits_classifier()
        reference = digits_features((load_digits_split("heldout").images + 1) / 2, classifier)
    else:
        logger.warning("Quality is scored for the pixel-space digits models only; this bench reports speed.")
    baseline = next((m for m in methods if m.name == "baseline"), None)
    rows = []
    for method in tqdm(methods, desc="scoring", disable=not digits):
        seconds = statistics.median(method.seconds)
        fid = kid = accuracy = None
        if digits:
            images = torch.cat(method.images)
            features = digits_features(images, classifier)
            fid = frechet_distance(features, reference)
            kid = kernel_distance(features, reference)[0]
            accuracy = class_accuracy(images, torch.tensor(labels), classifier)
        rows.append(BenchRow(
            method=method.name, model=method.model, scheduler=config.scheduler, steps=config.steps,
            num_samples=config.num_samples, fid=fid, kid=kid, class_accuracy=accuracy, images_per_s=1.0 / seconds,
            speedup=None if baseline is None else statistics.median(baseline.seconds) / seconds,
            block_fraction=statistics.fmean(method.fractions), peak_memory_mb=method.peak_memory_mb,
        ))  # fmt: skip
    return rows


def _is_digits_shaped(pipe: Any) -> bool:
    denoiser = getattr(pipe, "transformer", None) or pipe.unet
    return denoiser.config.in_channels == 1 and denoiser.config.sample_size == 32


def rows_as_dicts(rows: list[BenchRow]) -> list[dict]:
    return [asdict(row) for row in rows]


def format_table(rows: list[BenchRow]) -> str:
    """A plain-text table of the rows."""
    header = ("method", "model", "FID", "KID x1e3", "class acc", "img/s", "speedup", "blocks")
    lines = [header]
    for row in rows:
        lines.append((
            row.method, row.model,
            "-" if row.fid is None else f"{row.fid:.2f}",
            "-" if row.kid is None else f"{row.kid * 1e3:.2f}",
            "-" if row.class_accuracy is None else f"{row.class_accuracy:.1%}",
            f"{row.images_per_s:.1f}",
            "-" if row.speedup is None else f"{row.speedup:.2f}x",
            f"{row.block_fraction:.1%}",
        ))  # fmt: skip
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(line, widths)) for line in lines)
