"""`ee-diffusion speed`: time a DiT denoising loop with and without exit schedules, side by side in one run.

The model is a randomly initialised `DiTTransformer2DModel` (speed does not depend on the weights). Every method runs
the same DPM-Solver++ loop on the same latents and class labels; the methods are interleaved round by round, the
median of the timed rounds and their spread (interquartile range over median) are reported, and `speedup` is the
median over rounds of the baseline's seconds over the method's. `full-depth hook` applies a schedule that runs every
block, so its ratio to `baseline` is the cost of the hooks themselves. For each schedule the block fraction is read
from the hooks' record of what actually ran, and `efficiency` is the measured speedup over the speedup that fraction
predicts (`1 / f`).
"""

from __future__ import annotations

import json
import statistics
from dataclasses import asdict, dataclass

import torch
from diffusers import DiTTransformer2DModel, DPMSolverMultistepScheduler

from ..exits import apply_exit_schedule, get_exit_stats, remove_exit_schedule
from ..metrics import round_speedups, time_interleaved
from ..outputs import staged_file
from ..schedules import ExitSchedule


@dataclass(frozen=True)
class SpeedRow:
    method: str
    seconds: float
    spread: float
    speedup: float
    block_fraction: float
    predicted_speedup: float
    efficiency: float


@dataclass(frozen=True)
class SpeedConfig:
    num_layers: int = 12
    num_attention_heads: int = 6
    attention_head_dim: int = 64
    sample_size: int = 32
    patch_size: int = 2
    batch_size: int = 2
    steps: int = 25
    repeats: int = 5
    warmup: int = 1
    seed: int = 0

    @property
    def hidden_size(self) -> int:
        return self.num_attention_heads * self.attention_head_dim


def build_dit(config: SpeedConfig, device: torch.device, dtype: torch.dtype) -> DiTTransformer2DModel:
    torch.manual_seed(config.seed)
    model = DiTTransformer2DModel(
        num_attention_heads=config.num_attention_heads,
        attention_head_dim=config.attention_head_dim,
        in_channels=4,
        out_channels=8,
        num_layers=config.num_layers,
        sample_size=config.sample_size,
        patch_size=config.patch_size,
    )
    model = model.to(device)
    return (model if dtype == torch.float32 else model.to(dtype)).eval()


@torch.no_grad()
def denoise(
    model: DiTTransformer2DModel, config: SpeedConfig, device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    """One DPM-Solver++ sampling loop over the denoiser (the part of a DiT pipeline that exit schedules speed up)."""
    generator = torch.Generator(device="cpu").manual_seed(config.seed)
    shape = (config.batch_size, 4, config.sample_size, config.sample_size)
    latents = torch.randn(shape, generator=generator).to(device=device, dtype=dtype)
    labels = torch.arange(config.batch_size, device=device) % 1000
    scheduler = DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2)
    scheduler.set_timesteps(config.steps, device=device)
    for t in scheduler.timesteps:
        timesteps = t.expand(config.batch_size)
        eps, _ = model(latents, timestep=timesteps, class_labels=labels).sample.chunk(2, dim=1)
        latents = scheduler.step(eps, t, latents).prev_sample
    return latents


def run_speed(
    schedules: dict[str, ExitSchedule],
    config: SpeedConfig = SpeedConfig(),
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> list[SpeedRow]:
    """Time `baseline`, the full-depth hook and each schedule, interleaved; return one row per method."""
    device = torch.device(device)
    model = build_dit(config, device, dtype)
    methods = {"baseline": None, "full-depth hook": ExitSchedule.constant(config.num_layers, config.num_layers)}
    methods.update(schedules)
    fractions: dict[str, float] = {}

    def runner(name: str, schedule: ExitSchedule | None):
        def run() -> None:
            if schedule is not None:
                apply_exit_schedule(model, schedule)
            denoise(model, config, device, dtype)
            fractions[name] = get_exit_stats(model).block_fraction if schedule is not None else 1.0
            remove_exit_schedule(model)

        return run

    timings = time_interleaved(
        {name: runner(name, schedule) for name, schedule in methods.items()},
        repeats=config.repeats,
        warmup=config.warmup,
        device=device,
    )
    rows = []
    for name, timing in timings.items():
        speedup = statistics.median(round_speedups(timings["baseline"], timing))
        predicted = 1.0 / fractions[name]
        rows.append(
            SpeedRow(name, timing.median, timing.spread, speedup, fractions[name], predicted, speedup / predicted)
        )
    return rows


def format_rows(rows: list[SpeedRow]) -> str:
    header = f"{'method':<34}{'s/run':>8}{'spread':>8}{'speedup':>9}{'blocks':>8}{'predicted':>11}{'efficiency':>12}"
    lines = [header, "-" * len(header)]
    for row in rows:
        lines.append(
            f"{row.method:<34}{row.seconds:>8.3f}{row.spread:>8.1%}{row.speedup:>8.2f}x{row.block_fraction:>8.1%}"
            f"{row.predicted_speedup:>10.2f}x{row.efficiency:>12.1%}"
        )
    return "\n".join(lines)


def rows_as_dicts(rows: list[SpeedRow]) -> list[dict]:
    return [asdict(row) for row in rows]


def write_json(path: str, settings: dict, rows: list[SpeedRow]) -> None:
    """`{"config": settings, "rows": [...]}`, written whole and then put in place."""
    with staged_file(path) as staged:
        staged.write_text(json.dumps({"config": settings, "rows": rows_as_dicts(rows)}, indent=2))
