"""The `ee-diffusion` command."""

from __future__ import annotations

import argparse
import json
import platform
import sys

import torch

from .dllm.cli_commands import add_dllm_commands


def _speed(args: argparse.Namespace) -> int:
    from .bench.speed import SpeedConfig, format_rows, rows_as_dicts, run_speed
    from .schedules import ExitSchedule

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
    specs = args.schedule or ["linear:0.5", "step:1.0,1.0,0.83,0.83,0.67,0.67,0.5,0.5,0.33,0.33"]
    schedules = {}
    for spec in specs:
        schedule = ExitSchedule.from_spec(spec, config.num_layers)
        schedules[f"ase {_describe(schedule)}"] = schedule
    if args.threads:
        torch.set_num_threads(args.threads)
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
        with open(args.json, "w") as file:
            json.dump({"config": {**vars(args), "func": None}, "rows": rows_as_dicts(rows)}, file, indent=2)
    return 0


def _describe(schedule) -> str:
    config = schedule.config
    if config.shape == "step":
        return "step:" + ",".join(map(str, config.table))
    if config.shape == "table":
        return f"table of {len(config.depths)} points"
    return f"{config.shape}:{config.min_blocks}"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ee-diffusion", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    speed = commands.add_parser(
        "speed",
        help="time a DiT denoising loop with and without exit schedules, side by side",
        description="Time a DiT denoising loop with and without exit schedules, interleaved, medians.",
    )
    speed.add_argument("--schedule", action="append", help="linear:M, cosine:M, constant:M, step:d1,... or a folder "
                       "(repeatable; M is blocks, or a fraction when written with a '.')")  # fmt: skip
    speed.add_argument("--num-layers", type=int, default=12)
    speed.add_argument("--heads", type=int, default=6)
    speed.add_argument("--head-dim", type=int, default=64)
    speed.add_argument("--sample-size", type=int, default=32, help="latent side (tokens = (side / 2) ** 2)")
    speed.add_argument("--batch-size", type=int, default=2)
    speed.add_argument("--steps", type=int, default=25)
    speed.add_argument("--repeats", type=int, default=5)
    speed.add_argument("--warmup", type=int, default=1)
    speed.add_argument("--seed", type=int, default=0)
    speed.add_argument("--device", default="cpu")
    speed.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    speed.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    speed.add_argument("--json", help="also write the rows to this JSON file")
    speed.set_defaults(func=_speed)
    add_dllm_commands(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
