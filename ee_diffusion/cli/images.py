"""`ee-diffusion speed` and `ee-diffusion bench`: image models timed and scored, methods side by side."""

from __future__ import annotations

import argparse
import platform
import sys

from . import arguments as arg
from .command import Command

DTYPES = ["float32", "float16", "bfloat16"]
DEFAULT_SPEED_SCHEDULES = ["linear:0.5", "step:1.0,1.0,0.83,0.83,0.67,0.67,0.5,0.5,0.33,0.33"]


def _speed(args: argparse.Namespace) -> int:
    from ..bench.speed import SpeedConfig, format_rows, run_speed, write_json
    from ..schedules import ExitSchedule

    arg.check_output_files(args, "json")
    config = SpeedConfig(
        num_layers=args.num_layers,
        num_attention_heads=args.heads,
        attention_head_dim=args.head_dim,
        sample_size=args.sample_size,
        batch_size=args.batch_size,
        steps=args.steps,
        repeats=args.repeats,
        warmup=args.warmup,
        seed=args.seed,
    )
    schedules = {}
    for spec in args.schedule or DEFAULT_SPEED_SCHEDULES:
        schedule = ExitSchedule.from_spec(spec, config.num_layers)
        schedules[f"ase {schedule.describe()}"] = schedule
    torch = arg.torch_with_threads(args.threads)
    print(
        f"ee-diffusion speed: randomly initialised DiT ({config.num_layers} blocks, hidden {config.hidden_size}, "
        f"{(config.sample_size // config.patch_size) ** 2} tokens), batch {config.batch_size}, "
        f"{config.steps} DPM-Solver++ steps, {args.device} {args.dtype}, {torch.get_num_threads()} threads, "
        f"median of {config.repeats} interleaved repeats after {config.warmup} warm-up"
    )
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}")
    rows = run_speed(schedules, config, device=args.device, dtype=getattr(torch, args.dtype))
    print(format_rows(rows))
    if args.json:
        write_json(args.json, {key: value for key, value in vars(args).items() if key != "func"}, rows)
    return 0


def _latent_side(text: str) -> int:
    """The latent side of `speed`'s DiT: an even integer of at least 2 (its patches are 2 x 2)."""
    side = arg.integer(2)(text)
    if side % 2:
        raise argparse.ArgumentTypeError(f"expected an even number (the DiT's patches are 2 x 2), got {side}")
    return side


def _speed_arguments(speed: argparse.ArgumentParser) -> None:
    speed.add_argument(
        "--schedule",
        action="append",
        help="linear:M, cosine:M, constant:M, step:d1,... or a folder "
        "(repeatable; M is blocks, or a fraction when written with a '.'; default: linear:0.5 and the "
        "ASE table scaled to the model)",
    )
    speed.add_argument("--num-layers", type=arg.integer(1), default=12, help="DiT blocks")
    speed.add_argument("--heads", type=arg.integer(1), default=6, help="attention heads")
    speed.add_argument("--head-dim", type=arg.integer(1), default=64, help="channels per head")
    speed.add_argument(
        "--sample-size", type=_latent_side, default=32, help="latent side, even (tokens = (side / 2) ** 2)"
    )
    speed.add_argument("--batch-size", type=arg.integer(1), default=2, help="latents per denoising loop")
    speed.add_argument("--steps", type=arg.integer(1), default=25, help="DPM-Solver++ steps")
    speed.add_argument("--repeats", type=arg.integer(1), default=5, help="timed rounds")
    speed.add_argument("--warmup", type=arg.integer(0), default=1, help="untimed rounds first")
    speed.add_argument("--seed", type=arg.seed, default=0, help="seed of the weights and latents")
    speed.add_argument("--device", type=arg.device, default="cpu", help="torch device")
    speed.add_argument("--dtype", default="float32", choices=DTYPES, help="weights dtype")
    speed.add_argument("--threads", type=arg.integer(0), default=0, help="torch CPU threads (0: torch's default)")
    speed.add_argument("--json", type=arg.output_file, help="also write the rows to this JSON file")
    arg.add_overwrite(speed, "the --json file")


def _bench(args: argparse.Namespace) -> int:
    from ..bench.harness import BenchConfig, process_state, run_bench
    from ..bench.method_specs import default_methods
    from ..bench.report import (
        SAVED_IMAGES,
        UNSTABLE_SPREAD,
        format_table,
        plot,
        similarity_note,
        unstable,
        write_csv,
        write_json,
    )
    from ..outputs import check_output_folder

    inputs = arg.check_model_inputs(args)  # prompts or class labels, sizes: before anything loads
    arg.check_output_files(args, "json", "csv", "plot")
    if args.save_images:
        check_output_folder(args.save_images, SAVED_IMAGES, overwrite=args.overwrite)
    torch = arg.torch_with_threads(args.threads)
    methods = args.methods if args.methods is not None else default_methods(args.model, args.steps, args.scheduler)
    config = BenchConfig(
        model=args.model,
        methods=methods,
        num_samples=args.num_samples,
        batch_size=args.batch_size,
        repeats=args.repeats,
        steps=args.steps,
        scheduler=args.scheduler,
        grid=args.grid,
        guidance_scale=args.guidance_scale,
        seed=args.seed,
        device=args.device,
        dtype=args.dtype,
        compile=args.compile,
        xformers=args.xformers,
        save_images=args.save_images,
        reference=args.reference,
        fid_backend=args.fid_backend,
        inception_path=args.inception_path,
        prompts=args.prompts,
        height=args.height,
        width=args.width,
    )
    state = process_state(config.device)
    if state.is_main_process:
        cells = ", ".join(f"{scheduler}-{steps}" for scheduler, steps in config.cells())
        print(
            f"ee-diffusion bench: {config.model}, {len(methods)} methods x {config.num_samples} samples in each of "
            f"{cells} (scheduler-steps), {arg.describe_inputs(args, inputs)}, batches of {config.batch_size}; "
            f"speed: {config.repeats} interleaved rounds of one batch per method after a warm-up round; "
            f"{args.device} {args.dtype}, {state.num_processes} process(es), "
            f"{torch.get_num_threads()} threads, torch {torch.__version__}"
        )
    rows = run_bench(config)
    if not state.is_main_process:
        return 0
    print(format_table(rows))
    note = similarity_note(rows)
    if note is not None:
        print(f"note: {note}")
    for row in unstable(rows):
        print(
            f"warning: the {config.repeats} timed rounds of {row.method} ({row.scheduler}, {row.steps} steps) "
            f"disagree by {row.timing_spread:.0%} of their median (interquartile range; above "
            f"{UNSTABLE_SPREAD:.0%} its speed and speedup are not to be trusted): close other work on the machine, "
            "set --threads to the cores free for it, or raise --repeats or --batch-size.",
            file=sys.stderr,
        )
    if args.json:
        write_json(args.json, vars(config), rows)
    if args.csv:
        write_csv(args.csv, rows)
    if args.plot:
        plot(args.plot, rows)
    return 0


def _bench_arguments(bench: argparse.ArgumentParser) -> None:
    from ..bench.noise_schedulers import SCHEDULERS

    schedulers = list(SCHEDULERS)
    bench.add_argument(
        "--model",
        type=arg.model_name,
        default="digits-dit",
        help="shipped model name, folder, hub id, or random:dit-xl-2 "
        "/ random:dit-tiny (randomly initialised DiT, no VAE, speed only)",
    )
    bench.add_argument(
        "--methods",
        type=arg.method_list,
        help="comma-separated method specs, see below (default: "
        "baseline, fewer steps, FirstBlockCache, and the shipped <model>-ase model, its schedule and "
        "plan when there is one)",
    )
    bench.add_argument(
        "--num-samples",
        type=arg.integer(2),
        default=250,
        help="images per method and cell, for quality (FID/KID need at least 2)",
    )
    bench.add_argument(
        "--batch-size",
        type=arg.integer(1),
        default=10,
        help="images per generated batch; a timed round generates one batch per method",
    )
    bench.add_argument(
        "--repeats",
        type=arg.integer(1),
        default=5,
        help="timed rounds per cell after quality generation and one untimed warm-up round, methods interleaved "
        "with rotating order; the table gives the median and the spread",
    )
    bench.add_argument(
        "--steps",
        type=arg.integers(1),
        default=[10],
        metavar="N[,N...]",
        help="scheduler steps, or a comma-separated list (a grid axis)",
    )
    bench.add_argument(
        "--scheduler",
        type=arg.names(schedulers),
        default=["dpm-solver++"],
        metavar="NAME[,NAME...]",
        help=f"{', '.join(schedulers)}, or a comma-separated list of them (a grid axis)",
    )
    bench.add_argument(
        "--grid",
        default="zip",
        choices=["zip", "product"],
        help="zip: pair --scheduler and --steps "
        "position by position (a single value is repeated); product: every combination",
    )
    arg.add_guidance(bench)
    arg.add_inputs(bench, "the images")
    bench.add_argument("--seed", type=arg.seed, default=0, help="batch i is seeded with seed + i")
    bench.add_argument("--device", type=arg.device, default="cpu", help="torch device")
    bench.add_argument("--dtype", default="float32", choices=DTYPES, help="weights dtype")
    bench.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the denoiser block by block (one graph for its repeated transformer blocks or U-Net "
        "decoder units, beneath the methods' hooks, so exits and caches never recompile it)",
    )
    bench.add_argument(
        "--xformers",
        action="store_true",
        help="xformers memory-efficient attention (needs the xformers extra: pip install 'ee-diffusion[xformers]')",
    )
    bench.add_argument("--threads", type=arg.integer(0), default=0, help="torch CPU threads (0: torch's default)")
    bench.add_argument("--json", type=arg.output_file, help="write the config and rows to this JSON file")
    bench.add_argument("--csv", type=arg.output_file, help="write the rows to this CSV file")
    bench.add_argument(
        "--plot", type=arg.plot_file, help="write quality against images/s, Pareto front marked, to this PNG file"
    )
    arg.add_reference(bench)
    bench.add_argument(
        "--save-images",
        metavar="DIR",
        type=arg.output_folder,
        help="write every image to DIR/{method}/{index:05d}_class{label}.png (_prompt{k}.png: the k-th prompt)",
    )
    arg.add_overwrite(bench, "the --json, --csv and --plot files and the --save-images folder")


def _bench_epilog() -> str:
    from ..bench.method_specs import methods_help

    return (
        f"methods (--methods, comma-separated):\n{methods_help()}\n"
        "An accelerator that does not apply to the model gets a row with the reason instead of numbers.\n\n"
        "Quality: FID/KID against --reference (the digits models: the held-out digits, and class accuracy); other "
        "models without one: PSNR/SSIM of each method's images against the full-compute output of the same seeds "
        "and prompts, which penalises fewer-steps rows unfairly (another trajectory).\n\n"
        "examples:\n"
        "  ee-diffusion bench --model random:dit-xl-2 --methods baseline,ase:linear:0.5,fbcache:0.08 \\\n"
        "      --batch-size 8 --num-samples 32 --steps 25 --dtype bfloat16 --device cuda\n"
        "  ee-diffusion bench --model PIXART_FOLDER --prompt 'a cat' --prompt 'a dog' --height 512 --width 512 \\\n"
        "      --methods baseline,ase:linear:0.5,fbcache:0.2 --num-samples 8 --batch-size 4 --steps 20\n"
    )


COMMANDS = [
    Command(
        "speed",
        "time a DiT denoising loop with and without exit schedules, side by side",
        "Time a DiT denoising loop with and without exit schedules, interleaved, medians.",
        _speed_arguments,
        _speed,
    ),
    Command(
        "bench",
        "compare methods on one model: speed, executed blocks, FID/KID/class accuracy",
        "Generate the same class labels (class-conditional models) or prompts (text-to-image pipelines: --prompt) "
        "from the same seeds with each method, batch by batch, then time --repeats rounds of one batch per method "
        "(interleaved, rotating order), and report speed (median and spread), speedup (median of the per-round "
        "ratios to the baseline), executed block fraction and, for the digits models, FID/KID against the held-out "
        "digits and class accuracy by the digits feature network (any model: --reference; without one, PSNR/SSIM "
        "against the full-compute output). Under `accelerate launch --multi_gpu --num_processes N -m "
        "ee_diffusion.cli bench ...` (GPUs or CPU processes) the batches are split over the processes and scored "
        "once.",
        _bench_arguments,
        _bench,
        epilog=_bench_epilog,
    ),
]
