"""The `train-mdlm` and `dllm-bench` subcommands of `ee-diffusion`."""

from __future__ import annotations

import argparse
import json
import logging
import platform

from .. import cli_args as arg

TINY_MDLM = "tiny-mdlm"  # the shipped model, by name


def _train_mdlm(args: argparse.Namespace) -> int:
    from ..training.mdlm import MDLMTrainConfig, train_mdlm

    arg.torch_with_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    config = MDLMTrainConfig(
        output_dir=args.out,
        steps=args.steps,
        batch_size=args.batch_size,
        learning_rate=args.lr,
        seed=args.seed,
        checkpoint_every=args.checkpoint_every,
        resume=args.resume,
    )
    losses = train_mdlm(config, device=args.device, workers=args.workers)
    print(f"trained to step {config.steps}; last loss {losses[-1]:.4f}; model in {config.output_dir}")
    return 0


def _dllm_bench(args: argparse.Namespace) -> int:
    from ..pipelines import MaskedDiffusionLMPipeline
    from .bench import format_rows, rows_as_dicts, run_dllm_bench

    torch = arg.torch_with_threads(args.threads)
    pipe = MaskedDiffusionLMPipeline.from_pretrained(args.model)
    tasks, methods = args.tasks, args.methods
    print(
        f"ee-diffusion dllm-bench: {args.model}, {args.num_problems} fresh problems per task (seed {args.seed}), "
        f"greedy, gen_length {pipe.config.gen_length}, {pipe.config.steps} steps for full, batch {args.batch_size}, "
        f"{torch.get_num_threads()} threads, median of {args.repeats} interleaved passes after {args.warmup} warm-up"
    )
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}")
    rows = run_dllm_bench(pipe, tasks, methods, args.num_problems, args.batch_size, args.repeats, args.warmup, args.seed)
    print(format_rows(rows))
    if args.json:
        with open(args.json, "w") as file:
            json.dump(rows_as_dicts(rows), file, indent=2)
    return 0


def add_dllm_commands(commands: argparse._SubParsersAction) -> None:
    """Add `train-mdlm` and `dllm-bench` to the `ee-diffusion` subcommands."""
    from ..training.config import MDLMTrainConfig as Recipe
    from .methods import METHODS
    from .tasks import TASKS

    train = commands.add_parser(
        "train-mdlm",
        formatter_class=arg.HelpFormatter,
        help="train the tiny masked diffusion LM on addition and sorting (CPU, seeded, checkpointed)",
        description="Train tiny-mdlm with the masked-diffusion objective; --resume continues from its checkpoint.",
    )
    train.add_argument("--out", "--output-dir", dest="out", required=True, type=arg.output_folder,
                       help="folder to write the model (and its checkpoint) to; nothing is written into the package "
                       "unless this names it")  # fmt: skip
    train.add_argument("--steps", type=arg.integer(1), default=Recipe.steps, help="optimiser steps")
    train.add_argument("--batch-size", type=arg.integer(1), default=Recipe.batch_size, help="problems per step")
    train.add_argument("--lr", type=arg.number(0, low_open=True), default=Recipe.learning_rate,
                       help="peak AdamW learning rate")
    train.add_argument("--seed", type=int, default=Recipe.seed, help="seed of initialisation, data and masks")
    train.add_argument("--checkpoint-every", type=arg.integer(1), default=Recipe.checkpoint_every,
                       help="steps between checkpoints")
    train.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint")
    train.add_argument("--threads", type=arg.integer(1), default=1, help="torch CPU threads")
    train.add_argument("--device", type=arg.device, default="cpu", help="torch device to train on, e.g. cuda")
    train.add_argument("--workers", type=arg.integer(0), default=0,
                       help="DataLoader processes generating problems ahead of the model (same run for any number)")
    train.set_defaults(func=_train_mdlm)

    bench = commands.add_parser(
        "dllm-bench",
        formatter_class=arg.HelpFormatter,
        help="accuracy, NFE and speed of dLLM decoding methods (full, halfsteps, threshold, prophet, sched-*)",
        description="Exact-match accuracy, retention, NFE, tokens/s, speedup and QPS (gamma 4) on fresh problems.",
    )
    bench.add_argument("--model", default=TINY_MDLM, help="shipped model name, folder or hub id")
    bench.add_argument("--tasks", type=arg.names(TASKS), default=list(TASKS), metavar="TASK[,TASK...]",
                       help=f"comma-separated, of {', '.join(TASKS)}")
    bench.add_argument("--methods", type=arg.names(METHODS), default=list(METHODS), metavar="METHOD[,METHOD...]",
                       help=f"comma-separated, of {', '.join(METHODS)}")
    bench.add_argument("--num-problems", type=arg.integer(1), default=500, help="fresh problems per task")
    bench.add_argument("--batch-size", type=arg.integer(1), default=100, help="problems decoded at once")
    bench.add_argument("--repeats", type=arg.integer(1), default=3, help="timed passes (interleaved)")
    bench.add_argument("--warmup", type=arg.integer(0), default=1, help="untimed passes first")
    bench.add_argument("--seed", type=int, default=1234, help="seed of the problems")
    bench.add_argument("--threads", type=arg.integer(1), default=1, help="torch CPU threads")
    bench.add_argument("--json", type=arg.output_file, help="also write the rows to this JSON file")
    bench.set_defaults(func=_dllm_bench)
