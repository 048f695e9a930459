"""`ee-diffusion calibrate` and `ee-diffusion sweep`: per-step plans, and the speed/quality front they stand on."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..outputs import OutputKind
from . import arguments as arg
from .command import Command

DEFAULT_REFERENCE_STEPS = 10  # the bench's default step count
SWEEP = OutputKind("ee-diffusion sweep", ("sweep.json", "sweep.png", "plans/*", "best/*"))


# `calibrate --error`: how a plan's final images are held to the reference's, in words.
ERRORS = {
    "pixels": "RMS of the pixel differences in [0, 1]",
    "digits": "square root of the Fréchet distance of the digits network's features",
    "inception": "square root of the Fréchet distance of clean-fid's Inception features",
}


def _error_features(args: argparse.Namespace):
    """The feature network `--error` measures with (`None`: pixels), checked before any model loads."""
    from ..calibration import MIN_FRECHET_PROBES

    if args.inception_path is not None and args.error != "inception":
        raise ValueError(
            f"The option --inception-path is read by --error inception only, and this run measures --error "
            f"{args.error}: leave it out, or add --error inception."
        )
    if args.error == "pixels":
        return None
    if args.num_probes < MIN_FRECHET_PROBES:
        raise ValueError(
            f"The error --error {args.error} compares the two sets of probe images by the covariance of their "
            f"features: give --num-probes {MIN_FRECHET_PROBES} or more (100 or more ranks plans better), got "
            f"{args.num_probes}."
        )
    from ..metrics import FeatureExtractor

    if args.error == "digits":
        return FeatureExtractor("digits", device=args.device)
    return FeatureExtractor("clean-fid", inception_path=args.inception_path, device=args.device)


def _calibrate(args: argparse.Namespace) -> int:
    from ..bench.harness import probe_kwargs
    from ..bench.noise_schedulers import build_scheduler
    from ..calibration import CALIBRATION_OUTPUT, calibrate_plan, counted_flop_fraction
    from ..outputs import check_output_folder
    from ..pipelines import load_early_exit_pipeline
    from ..schedules import describe_action

    inputs = arg.check_model_inputs(args)  # prompts or class labels, sizes: before anything loads
    check_output_folder(args.out, CALIBRATION_OUTPUT, overwrite=args.overwrite)
    features = _error_features(args)
    torch = arg.torch_with_threads(args.threads)
    pipe = load_early_exit_pipeline(args.model, dtype=torch.float32).to(args.device)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = build_scheduler(args.scheduler, pipe.scheduler.config)
    probes = probe_kwargs(
        pipe, args.model, args.num_probes, args.prompts, args.guidance_scale, args.height, args.width
    )
    budget = f"tolerance {args.tolerance}" if args.tolerance is not None else f"target compute {args.target_compute}"
    reference_steps = args.reference_steps or args.steps or DEFAULT_REFERENCE_STEPS
    steps = f"{args.steps} steps" if args.steps else "the step count picked"
    print(
        f"ee-diffusion calibrate: {args.model}, {args.scheduler} at {steps}, against the {reference_steps}-step "
        f"reference, {arg.describe_inputs(args, inputs)}, {args.num_probes} probes (seed {args.seed}), {budget}"
    )
    result = calibrate_plan(
        pipe,
        probes,
        args.steps,
        tolerance=args.tolerance,
        target_compute=args.target_compute,
        seed=args.seed,
        reference_steps=reference_steps,
        candidates=args.candidates,
        actions=tuple(args.actions),
        features=features,
        trades=args.trades,
    )
    settings = {
        key: getattr(args, key)
        for key in (
            "model",
            "scheduler",
            "guidance_scale",
            "prompts",
            "height",
            "width",
            "num_probes",
            "seed",
            "tolerance",
            "target_compute",
            "candidates",
            "actions",
            "trades",
        )
    }
    settings["error_measure"] = args.error  # `error` is the plan's measured error
    result.save_pretrained(args.out, {"command": "ee-diffusion " + " ".join(args.argv), **settings})
    actions = ", ".join(map(describe_action, reversed(result.plan.config.depths)))
    print(f"plan (per step, first to last): {actions}")
    reference = "the full model" if pipe.exit_schedule is None else f"{args.model} under its own exit schedule"
    method = f"ase:{args.out}" if pipe.exit_schedule is None else f"finetuned:{args.model}:{args.out}"
    flops = counted_flop_fraction(pipe, probes, result.plan, reference_steps)
    print(
        f"{result.steps} steps, block compute {result.compute_fraction:.1%} of the {reference_steps}-step "
        f"reference's ({flops:.1%} of its FLOPs, counted over one call of the probes), final-image error "
        f"{result.error:.4f} ({ERRORS[args.error]} against {reference} at {reference_steps} steps); "
        f"saved {args.out} (bench it as --methods {method} with --scheduler {args.scheduler} "
        f"--steps {result.steps}: a plan runs only at its scheduler and step count)"
    )
    for action, why in result.left_out:
        print(f"note: --actions {action} left out: {why}", file=sys.stderr)
    fewer, lost = result.fewer_steps, result.lost
    if lost is not None:
        gap = (lost.error - result.error) / max(result.error, 1e-12)
        print(
            f"warning: no plan at {len(lost.actions)} steps beats the model at {result.steps} steps, at the same "
            f"compute ({fewer.compute_fraction:.1%}): the best one's error {lost.error:.5f} is {gap:.1%} higher than "
            f"{result.error:.5f}. The plan saved is the model at {result.steps} steps, as it is.",
            file=sys.stderr,
        )
    elif fewer is not None:
        gap = (fewer.error - result.error) / max(fewer.error, 1e-12)
        print(
            f"the model at {fewer.steps} steps, at {fewer.compute_fraction:.1%} compute, has error {fewer.error:.4f}: "
            f"the plan's is {gap:.0%} lower"
        )
    return 0


def _add_probe_arguments(command: argparse.ArgumentParser) -> None:
    """The options `calibrate` and `sweep` share: the model and scheduler, and the probes' guidance, count and seed."""
    from ..bench.noise_schedulers import SCHEDULERS

    command.add_argument(
        "--model", type=arg.model_name, default="digits-dit", help="shipped model name, pipeline folder or hub id"
    )
    command.add_argument("--scheduler", choices=list(SCHEDULERS), default="dpm-solver++", help="the plans' scheduler")
    arg.add_guidance(command)
    arg.add_inputs(command, "the probes (and, in sweep, the bench's images)")
    command.add_argument(
        "--num-probes",
        type=arg.integer(1),
        default=10,
        help="probe images per calibration (labels cycle through the classes, prompts through --prompt)",
    )
    command.add_argument(
        "--seed", type=arg.seed, default=0, help="seed of the probes' noise (and of bench batch i: seed + i)"
    )
    command.add_argument("--device", type=arg.device, default="cpu", help="torch device")
    command.add_argument("--threads", type=arg.integer(0), default=0, help="torch CPU threads (0: torch's default)")


def _calibrate_arguments(calibrate: argparse.ArgumentParser) -> None:
    _add_probe_arguments(calibrate)
    calibrate.add_argument(
        "--steps",
        type=arg.integer(2),
        help="the plan's step count (default: picked: plans at several step counts up to --reference-steps, fewer "
        "steps at full depth among them, all held to one reference; the best at the budget wins)",
    )
    calibrate.add_argument(
        "--reference-steps",
        type=arg.integer(2),
        help=f"step count of the reference images errors and compute are measured against (default: --steps, or "
        f"{DEFAULT_REFERENCE_STEPS} without it)",
    )
    budget = calibrate.add_mutually_exclusive_group(required=True)
    budget.add_argument(
        "--tolerance",
        type=arg.number(0),
        help="largest final-image error (RMS, pixels in [0, 1]); 0 gives the full model",
    )
    budget.add_argument(
        "--target-compute",
        type=arg.number(0, 1, low_open=True),
        help="share of the full block compute to spend, in (0, 1]",
    )
    calibrate.add_argument(
        "--candidates",
        type=arg.integer(1),
        default=3,
        help="moves each link of the chain runs as whole plans, the best measured taken (1: the sensitivities alone "
        "choose, as the plans shipped with the digits models were made)",
    )
    calibrate.add_argument(
        "--actions",
        type=arg.names(("reuse", "tail", "drop")),
        default=["reuse", "drop"],
        help="the cheaper actions a step may take besides shallower depths, comma-separated: reuse (no block, the "
        "last computed step's work), tail (the first 1 or 2 blocks, the rest's work reused), drop (the step left "
        "out: the solver steps over it); tails are left out unless asked for: they lower the probes' pixel error "
        "more than the samples' quality",
    )
    calibrate.add_argument(
        "--trades",
        action="store_true",
        help="for --target-compute, let the plan found trade actions between two steps (a reuse moved to another "
        "step) while a trade, run whole, lowers the error: a few dozen more runs",
    )
    calibrate.add_argument(
        "--error",
        choices=tuple(ERRORS),
        default="pixels",
        help="how a plan's final images are held to the reference's: pixels, each probe's RMS difference from its "
        "own reference image; digits (1 x 32 x 32 images) or inception, the square root of the Fréchet distance "
        "(FID's) between the features of the two sets of probe images, which ranks plans as FID does where the "
        "pixel error does not (needs --num-probes 50 or more; inception reads clean-fid's weights from "
        "--inception-path or clean-fid's folder, never downloading)",
    )
    calibrate.add_argument(
        "--inception-path",
        type=arg.existing_path,
        help="local inception-2015-12-05.pt (or its folder) for --error inception",
    )
    calibrate.add_argument("--out", required=True, type=arg.output_folder, help="folder to write the plan to")
    arg.add_overwrite(calibrate, "OUT")


def _sweep(args: argparse.Namespace) -> int:
    from ..bench.sweep import SweepConfig, format_sweep, run_sweep
    from ..outputs import check_output_folder
    from ..shipped import shipped_model_path

    inputs = arg.check_model_inputs(args)  # prompts or class labels, sizes: before anything loads
    check_output_folder(args.out, SWEEP, overwrite=args.overwrite)
    torch = arg.torch_with_threads(args.threads)
    finetuned = {"none": None, "auto": f"{args.model}-ase"}.get(args.finetuned, args.finetuned)
    if args.finetuned == "auto" and shipped_model_path(finetuned) is None:
        finetuned = None
    config = SweepConfig(
        out=args.out,
        model=args.model,
        scheduler=args.scheduler,
        steps=args.steps,
        budgets=args.budgets,
        accelerators=args.accelerators,
        num_samples=args.num_samples,
        batch_size=args.batch_size,
        repeats=args.repeats,
        guidance_scale=args.guidance_scale,
        num_probes=args.num_probes,
        seed=args.seed,
        device=args.device,
        finetuned=finetuned,
        prompts=args.prompts,
        height=args.height,
        width=args.width,
        reference=args.reference,
        fid_backend=args.fid_backend,
        inception_path=args.inception_path,
    )
    print(
        f"ee-diffusion sweep: {config.model}, {config.scheduler} at {config.steps} steps, plans at compute "
        f"{config.budgets}, accelerators {config.accelerators}, fine-tuned model {finetuned}, {config.num_samples} "
        f"samples per row, {arg.describe_inputs(args, inputs)}; {torch.get_num_threads()} threads, torch "
        f"{torch.__version__}"
    )
    swept = run_sweep(config)
    print(format_sweep(swept, max(config.steps)))
    out = Path(args.out)
    names = [f"{name}/" if (out / name).is_dir() else name for name in ("sweep.json", "sweep.png", "plans", "best")]
    print(f"wrote {out}/: " + ", ".join(name for name in names if (out / name.rstrip("/")).exists()))
    if not (out / "best").exists():
        print("no best/: at no quality level is the cheapest row one of the plans")
    return 0


def _sweep_arguments(sweep: argparse.ArgumentParser) -> None:
    _add_probe_arguments(sweep)
    sweep.add_argument(
        "--steps",
        type=arg.integers(2),
        default=[6, 8, 10, 20],
        metavar="N[,N...]",
        help="step counts (the largest is the reference)",
    )
    sweep.add_argument(
        "--budgets",
        type=arg.numbers(0, 1, low_open=True, high_open=True),
        default=[0.9, 0.8, 0.7, 0.6],
        metavar="F[,F...]",
        help="compute budgets of the plans and shapes, shares in (0, 1)",
    )
    sweep.add_argument(
        "--accelerators",
        type=arg.optional_method_list,
        default=["magcache:0.06:3", "magcache:0.15:4", "fbcache:0.05", "fbcache:0.15"],
        help="diffusers accelerator methods, as in bench --methods ('' for none)",
    )
    sweep.add_argument(
        "--finetuned",
        type=arg.model_name,
        default="auto",
        metavar="MODEL",
        help="an ASE fine-tuned model of the same shape, benched under its schedule and under plans "
        "calibrated on it; auto: the shipped MODEL-ase sibling if there is one; none: leave out",
    )
    sweep.add_argument("--out", required=True, type=arg.output_folder, help="folder to write the results to")
    arg.add_overwrite(sweep, "OUT")
    sweep.add_argument("--num-samples", type=arg.integer(2), default=250, help="images per row, for quality")
    sweep.add_argument("--batch-size", type=arg.integer(1), default=10, help="images per generated batch")
    sweep.add_argument("--repeats", type=arg.integer(1), default=5, help="timed rounds per step count")
    arg.add_reference(sweep)


COMMANDS = [
    Command(
        "calibrate",
        "find the cheapest per-step plan of depths and reuse steps within an error budget",
        "Calibrate a plan for one scheduler and step count from the model's own sampling runs (probes, no data): per "
        "step, the final-image error of each depth and of reusing the last computed step's work; then a chain of "
        "plans from full to cheapest, each measured; the budget picks one. The error is the RMS difference of the "
        "final images from the full model's (same noise and labels, pixel values in [0, 1]), or with --error "
        "digits|inception FID's distance between the two sets of probe images. Saves "
        "OUT/exit_schedule.json (the plan: --methods ase:OUT in the bench, exit_schedule= in a pipeline; it runs "
        "only at this scheduler and step count) and OUT/calibration.json (every plan measured).",
        _calibrate_arguments,
        _calibrate,
    ),
    Command(
        "sweep",
        "the speed/quality front of one model: plans, shapes, fewer steps and diffusers' caches, side by side",
        "For each step count: calibrate plans at each compute budget, pick linear shapes at matching compute, and "
        "bench them beside the baseline and diffusers' accelerators (same seeds, interleaved timing); with a "
        "fine-tuned model (--finetuned), that model under its schedule and under plans calibrated on it. Prints every "
        "row by block compute (a share of the full model at the largest step count) with the front marked and the "
        "cheapest row within 5, 10 and 20% of the largest step count's baseline FID; writes OUT/sweep.json, "
        "OUT/sweep.png, the plans (OUT/plans/) and the best plan per quality level (OUT/best/). Quality is FID where "
        "there is one (the digits models, --reference), else PSNR against the full model's output at the largest "
        "step count (the front then has no quality levels), else class error.",
        _sweep_arguments,
        _sweep,
    ),
]
