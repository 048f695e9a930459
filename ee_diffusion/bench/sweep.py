"""`ee-diffusion sweep`: the speed/quality front of one model, ours beside the plain alternatives, in one process.

For each step count of the sweep, one bench run (`run_bench`, its own interleaved timing) compares, on the same seeds:

- `baseline`: the model at full depth;
- calibrated plans (`ase:<folder>`), one per compute budget, all picked from one calibration at that step count;
- hand-made shapes at matching compute: the `linear` schedule whose block compute over those steps is nearest to each
  budget;
- diffusers' accelerators at the thresholds asked for;
- with `finetuned` (an ASE fine-tuned model of the same shape, the `<model>-ase` sibling): that model under its own
  schedule (`finetuned:<model>`), and plans calibrated on it (`finetuned:<model>:<folder>`) for each budget below its
  own schedule's compute (a plan is never deeper than the schedule the model was fine-tuned for).

Every row gets `compute`: its block compute as a share of the full model at the sweep's largest step count
(`block_fraction * steps / max(steps)`), so a plan at 10 steps and the baseline at 8 stand on one axis; and `flops`:
its counted floating-point operations per image as a share of that baseline's (the bench's `gflop_per_image`). Speed
(`images_per_s`) is comparable within a step count (interleaved rounds); across step counts it comes from separate
runs. The front is the set of rows no other row beats on both compute and quality: FID where the rows have it (the
digits models, or `reference`), else PSNR against the full model's output at the largest step count, from the same
seeds and prompts (higher is better; text-to-image pipelines without a reference), else class error. For each quality
level (FID or class error within 5, 10 and 20% of the largest step count's baseline) the cheapest row is named, and
when it is a plan, its folder is copied to `OUT/best/fid-within-<p>pct`; a PSNR front has no such levels (the
baseline's own PSNR is the cap, `ee_diffusion.metrics.PSNR_CAP_DB`, not a quality to be within a share of).

Probes and bench images are conditioned as the model's pipeline takes them (`ee_diffusion.bench.harness.
PipelineInputs`): class labels, or `prompts` (cycled) at `height` x `width`.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..outputs import staged_folder
from .report import BenchRow, pareto_front, rows_as_dicts, similarity_note

QUALITY_LEVELS = (0.05, 0.10, 0.20)


def _pipeline_kind(model: str) -> str | None:
    """The pipeline class `model_index.json` names, without the drop-ins' `EarlyExit` prefix (`None`: not known before
    loading)."""
    from ..pipelines.loading import model_index

    try:
        name = model_index(model).get("_class_name")
    except (OSError, ValueError):
        return None
    return name.removeprefix("EarlyExit") if name else None


@dataclass
class SweepConfig:
    """What `run_sweep` measures (the bench settings are `BenchConfig`'s; `guidance_scale=None`: the pipeline's
    default)."""

    out: str
    model: str = "digits-dit"
    scheduler: str = "dpm-solver++"
    steps: list[int] = field(default_factory=lambda: [6, 8, 10, 20])
    budgets: list[float] = field(default_factory=lambda: [0.9, 0.8, 0.7, 0.6])
    accelerators: list[str] = field(
        default_factory=lambda: ["magcache:0.06:3", "magcache:0.15:4", "fbcache:0.05", "fbcache:0.15"]
    )
    num_samples: int = 250
    batch_size: int = 10
    repeats: int = 5
    guidance_scale: float | None = 2.0
    num_probes: int = 10
    seed: int = 0
    device: str = "cpu"
    finetuned: str | None = None
    prompts: list[str] | None = None
    height: int | None = None
    width: int | None = None
    reference: str | None = None
    fid_backend: str | None = None
    inception_path: str | None = None

    def __post_init__(self) -> None:
        if not self.steps or min(self.steps) < 2 or len(set(self.steps)) != len(self.steps):
            raise ValueError(f"`steps` must be distinct step counts of at least 2, got {self.steps}.")
        if any(not 0 < budget < 1 for budget in self.budgets):
            raise ValueError(f"`budgets` must lie in (0, 1), got {self.budgets}.")
        if self.num_probes < 1:
            raise ValueError(f"`num_probes` must be at least 1, got {self.num_probes}.")
        if self.finetuned is not None:
            from ..pipelines.loading import resolve_pretrained

            if resolve_pretrained(self.finetuned) == resolve_pretrained(self.model):
                raise ValueError(f"`finetuned` must be another model than `model`, got {self.finetuned!r} for both.")
            kinds = {name: _pipeline_kind(name) for name in (self.model, self.finetuned)}
            if None not in kinds.values() and len(set(kinds.values())) > 1:
                raise ValueError(
                    f"`finetuned` must be a model of the same kind as `model`: {self.finetuned!r} is a "
                    f"{kinds[self.finetuned]}, {self.model!r} a {kinds[self.model]}."
                )
        from .method_specs import METHOD_KINDS, check_method

        ours = ("baseline", "ase", "finetuned", "deediff")
        bad = [spec for spec in self.accelerators if spec.partition(":")[0] not in set(METHOD_KINDS) - set(ours)]
        if bad:
            raise ValueError(
                f"`accelerators` must be other accelerators' methods (diffusers' caches, cache-dit, DeepCache: "
                f"{', '.join(k for k in METHOD_KINDS if k not in ours)}), got {bad}."
            )
        for spec in self.accelerators:
            check_method(spec)


@dataclass(frozen=True)
class SweepRow:
    """A bench row, its compute on the sweep's common axis, whether it is on the front, and its FLOPs as a share of
    the largest step count's baseline's (`None` where either was not counted)."""

    row: BenchRow
    compute: float
    on_front: bool
    flops: float | None = None


def _linear_at(num_blocks: int, timesteps: list[float], num_train_timesteps: int, budget: float) -> str | None:
    """The `linear:M` spec whose compute over `timesteps` is nearest to `budget` (None if it is the full model)."""
    from ..schedules import ExitSchedule

    best = min(
        range(1, num_blocks + 1),
        key=lambda m: abs(
            ExitSchedule.linear(num_blocks, m).compute_fraction(timesteps, num_train_timesteps) - budget
        ),
    )
    return None if best == num_blocks else f"ase:linear:{best}"


def run_sweep(config: SweepConfig, progress: bool = True) -> list[SweepRow]:
    """Calibrate plans, run the bench at every step count, and write `OUT/sweep.json` and the best plans."""
    from ..exits import denoiser_of, num_exit_blocks
    from .harness import BenchConfig, load_pipe, probe_kwargs, run_bench
    from .methods import Target, build_method
    from .noise_schedulers import build_scheduler

    out = Path(config.out)
    bench = BenchConfig(
        model=config.model,
        methods=["baseline"],
        num_samples=config.num_samples,
        batch_size=config.batch_size,
        repeats=config.repeats,
        scheduler=config.scheduler,
        guidance_scale=config.guidance_scale,
        seed=config.seed,
        device=config.device,
        prompts=config.prompts,
        height=config.height,
        width=config.width,
        reference=config.reference,
        fid_backend=config.fid_backend,
        inception_path=config.inception_path,
        similarity_steps=max(config.steps),  # PSNR/SSIM of every step count against one full-compute output
    )
    import torch

    pipes = {}
    for model in filter(None, (config.model, config.finetuned)):
        pipes[model] = load_pipe(model, bench, torch.device(config.device))
        pipes[model].scheduler = build_scheduler(config.scheduler, pipes[model].scheduler.config)
    denoiser = denoiser_of(pipes[config.model])
    num_blocks = num_exit_blocks(denoiser)
    if config.finetuned is not None and num_exit_blocks(pipes[config.finetuned]) != num_blocks:
        raise ValueError(
            f"`finetuned` must have the model's {num_blocks} exit blocks; {config.finetuned} has "
            f"{num_exit_blocks(pipes[config.finetuned])}."
        )
    probes = [  # each model checked against the sweep's inputs; the model's probes serve both
        probe_kwargs(
            pipe, model, config.num_probes, config.prompts, config.guidance_scale, config.height, config.width
        )
        for model, pipe in pipes.items()
    ][0]
    small = {**probes, **{key: value[:2] for key, value in probes.items() if key in ("class_labels", "prompt")}}
    target = Target(config.model, pipes.__getitem__, min(config.steps), small)
    for spec in config.accelerators:  # one that cannot take this model (`layerskip:99`) stops the sweep now
        build_method(spec, target)
    with staged_folder(out) as stage:
        rows: list[tuple[BenchRow, str | None]] = []  # each row and, for a plan, its folder
        for steps in config.steps:
            plans, timesteps = _calibrated_plans(
                config, pipes[config.model], probes, steps, stage / "plans", "ase:", progress
            )
            ours = ["baseline", *plans]
            if config.finetuned is not None:
                folder = stage / "plans" / Path(config.finetuned).name
                tuned = _calibrated_plans(
                    config, pipes[config.finetuned], probes, steps, folder, f"finetuned:{config.finetuned}:", progress
                )[0]
                ours += [f"finetuned:{config.finetuned}", *tuned]
                plans.update(tuned)
            shapes = {
                _linear_at(num_blocks, timesteps, pipes[config.model].scheduler.config.num_train_timesteps, b)
                for b in config.budgets
            } - {None}
            methods = [*ours, *sorted(shapes), *config.accelerators]
            cell = run_bench(
                dataclasses.replace(bench, methods=methods, steps=[steps]), progress=progress, pipes=pipes
            )
            rows.extend((row, plans.get(row.method)) for row in cell)
        for row, _ in rows:  # the plans are named by the folder they end up in
            row.method = row.method.replace(str(stage), str(out))
        swept = _front(rows, max(config.steps))
        _write(stage, config, swept, rows)
        plot_sweep(str(stage / "sweep.png"), swept, max(config.steps))
    return swept


def _calibrated_plans(
    config: SweepConfig, pipe: Any, probes: dict[str, Any], steps: int, folder: Path, prefix: str, progress: bool
) -> tuple[dict[str, str], list[float]]:
    """The plans calibrated on `pipe` at `steps`, one per budget below its own schedule's compute, saved under
    `folder`: {bench method (`prefix` + folder): folder}; and the denoiser's timesteps at those steps."""
    from ..calibration import PlanCalibrator

    calibrator = PlanCalibrator(pipe, probes, steps, seed=config.seed, progress=progress)
    base = calibrator.chain[0].compute_fraction
    plans: dict[str, str] = {}
    for budget in sorted(config.budgets, reverse=True):
        if budget >= base:
            continue
        calibration = calibrator.for_target_compute(budget)
        path = folder / f"{config.scheduler}-{steps}-{budget:g}"
        calibration.plan.save_pretrained(path)
        plans[f"{prefix}{path}"] = str(path)
    return plans, list(calibrator.timesteps)


def _measure(rows: list[BenchRow]) -> str | None:
    """The quality measure of a sweep's rows: `"fid"` where any row has a FID, else `"psnr"`, else `"class"`."""
    for measure, key in (("fid", "fid"), ("psnr", "psnr"), ("class", "class_accuracy")):
        if any(getattr(row, key) is not None for row in rows):
            return measure
    return None


def _quality(row: BenchRow, measure: str | None) -> float | None:
    """The row's quality as a number to minimise: FID, minus PSNR (higher is better), or class error."""
    value = {"fid": row.fid, "psnr": row.psnr, "class": row.class_accuracy}.get(measure)
    if value is None:
        return None
    return {"fid": value, "psnr": -value, "class": 1 - value}[measure]


def _front(rows: list[tuple[BenchRow, str | None]], max_steps: int) -> list[SweepRow]:
    measure = _measure([row for row, _ in rows])
    scored = [row for row, _ in rows if row.block_fraction is not None and _quality(row, measure) is not None]
    computes = {id(row): row.block_fraction * row.steps / max_steps for row in scored}
    front = {id(scored[i]) for i in pareto_front([(-computes[id(r)], _quality(r, measure)) for r in scored])}
    full = next((row for row, _ in rows if row.method == "baseline" and row.steps == max_steps), None)
    full_flops = None if full is None else full.gflop_per_image

    def flops(row: BenchRow) -> float | None:
        return None if not full_flops or row.gflop_per_image is None else row.gflop_per_image / full_flops

    return [SweepRow(row, computes.get(id(row), float("nan")), id(row) in front, flops(row)) for row, _ in rows]


def best_per_quality(swept: list[SweepRow], max_steps: int) -> dict[float, SweepRow]:
    """For each quality level: the cheapest row within that share of the largest step count's baseline quality (FID
    or class error; none for PSNR, whose baseline scores the cap against itself)."""
    measure = _measure([s.row for s in swept])
    reference = next((s for s in swept if s.row.method == "baseline" and s.row.steps == max_steps), None)
    if measure == "psnr" or reference is None or _quality(reference.row, measure) is None:
        return {}
    best = {}
    for level in QUALITY_LEVELS:
        bound = _quality(reference.row, measure) * (1 + level)
        within = [s for s in swept if _quality(s.row, measure) is not None and _quality(s.row, measure) <= bound]
        if within:
            best[level] = min(within, key=lambda s: (s.compute, _quality(s.row, measure)))
    return best


def _write(out: Path, config: SweepConfig, swept: list[SweepRow], rows: list[tuple[BenchRow, str | None]]) -> None:
    folders = {id(row): folder for row, folder in rows}
    best = best_per_quality(swept, max(config.steps))
    for level, choice in best.items():
        folder = folders.get(id(choice.row))
        if folder is not None:
            shutil.copytree(folder, out / "best" / f"fid-within-{level:.0%}".replace("%", "pct"), dirs_exist_ok=True)
    report: dict[str, Any] = {
        "config": dataclasses.asdict(config),
        "rows": [
            {**data, "compute": s.compute, "flops": s.flops, "on_front": s.on_front}
            for s, data in zip(swept, rows_as_dicts([s.row for s in swept]))
        ],
        "best": {
            f"{level:.0%}": {"method": s.row.method, "steps": s.row.steps, "compute": s.compute}
            for level, s in best.items()
        },
    }
    (out / "sweep.json").write_text(json.dumps(report, indent=2))


def format_sweep(swept: list[SweepRow], max_steps: int) -> str:
    """The rows by compute, the front marked, and the cheapest row per quality level."""
    psnr = _measure([s.row for s in swept]) == "psnr"
    quality = f"{'PSNR vs full':>12} {'SSIM':>6}" if psnr else f"{'FID':>7} {'class acc':>9}"
    header = f"{'method':46} {'steps':>5} {'compute':>8} {'FLOPs':>7} {quality} {'img/s':>7} {'speedup':>8}"
    lines = [f"  {header}"]
    for s in sorted(swept, key=lambda s: (s.compute, s.row.steps)):
        row = dataclasses.replace(s.row, method=_short(s.row.method))
        if row.note is not None:
            lines.append(f"  {row.method:46} {row.steps:>5} {'':>8} {row.note}")
            continue
        if psnr:
            psnr_text = "-" if row.psnr is None else f"{row.psnr:.2f}"
            ssim_text = "-" if row.ssim is None else f"{row.ssim:.3f}"
            shown = f"{psnr_text:>12} {ssim_text:>6}"
        else:
            fid = "-" if row.fid is None else f"{row.fid:.2f}"
            accuracy = "-" if row.class_accuracy is None else f"{row.class_accuracy:.1%}"
            shown = f"{fid:>7} {accuracy:>9}"
        speed = "-" if row.images_per_s is None else f"{row.images_per_s:.1f}"
        speedup = "-" if row.speedup is None else f"{row.speedup:.2f}x"
        flops = "-" if s.flops is None else f"{s.flops:.1%}"
        lines.append(
            f"{'*' if s.on_front else ' '} {row.method[:46]:46} {row.steps:>5} {s.compute:>8.1%} {flops:>7} {shown} "
            f"{speed:>7} {speedup:>8}"
        )
    lines.append(
        f"* on the front (no row has both less compute and better quality); compute: block compute as a share of the "
        f"full model at {max_steps} steps; FLOPs: the same share of its floating-point operations, counted; speedup: "
        "against the baseline at the same step count"
    )
    for level, s in best_per_quality(swept, max_steps).items():
        lines.append(
            f"cheapest within {level:.0%} of the {max_steps}-step baseline's quality: {s.row.method} at "
            f"{s.row.steps} steps, {s.compute:.1%} compute"
        )
    note = similarity_note([s.row for s in swept])
    if psnr and note is not None:
        lines.append(f"note: {note} No cheapest row per quality level: those are shares of a FID (--reference).")
    return "\n".join(lines)


def _short(method: str) -> str:
    """A method as the table shows it: models and plan or schedule folders by the last part of their path
    (`ase:.../dpm-solver++-8-0.7` is `ase:dpm-solver++-8-0.7`, `finetuned:.../m:.../dpm-solver++-8-0.5` is
    `finetuned:m:dpm-solver++-8-0.5`)."""
    kind, _, argument = method.partition(":")
    if kind == "finetuned":
        return ":".join([kind, *(Path(part).name for part in argument.split(":"))])
    return f"{kind}:{Path(argument).name}" if kind == "ase" and "/" in argument else method


def plot_sweep(path: str, swept: list[SweepRow], max_steps: int) -> None:
    """Quality against compute and against images/s, the front joined on the compute panel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    measure = _measure([s.row for s in swept])
    shown = {"fid": lambda row: row.fid, "psnr": lambda row: row.psnr}.get(measure, lambda row: 1 - row.class_accuracy)
    scored = [s for s in swept if _quality(s.row, measure) is not None and s.row.images_per_s is not None]
    label = {
        "fid": "FID (lower is better)",
        "psnr": f"PSNR vs the full model at {max_steps} steps, dB (higher is better)",
    }.get(measure, "class error, 1 - accuracy")
    figure, (by_compute, by_speed) = plt.subplots(1, 2, figsize=(13, 5), sharey=True)
    for axes, x_of in ((by_compute, lambda s: s.compute), (by_speed, lambda s: s.row.images_per_s)):
        for kinds, color, name in (
            (("baseline",), "tab:gray", "baseline (steps)"),
            (("ase", "finetuned"), "tab:blue", "ours (plans, shapes, fine-tuned)"),
            ((), "tab:orange", "diffusers"),
        ):
            points = [
                s
                for s in scored
                if s.row.method.startswith(kinds)
                or (not kinds and not s.row.method.startswith(("baseline", "ase", "finetuned")))
            ]
            axes.scatter([x_of(s) for s in points], [shown(s.row) for s in points], color=color, label=name)
            for s in points:
                axes.annotate(
                    f"{_short(s.row.method)}@{s.row.steps}",
                    (x_of(s), shown(s.row)),
                    textcoords="offset points",
                    xytext=(3, 3),
                    fontsize=6,
                )
    front = sorted((s for s in scored if s.on_front), key=lambda s: s.compute)
    by_compute.plot([s.compute for s in front], [shown(s.row) for s in front], "--", color="tab:red", label="front")
    by_compute.set_xlabel(f"block compute (share of the full model at {max_steps} steps)")
    by_speed.set_xlabel("images / s (interleaved within a step count)")
    by_compute.set_ylabel(label)
    if measure != "psnr":
        by_compute.set_yscale("log")
    by_compute.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
