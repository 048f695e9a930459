"""`ee-diffusion train-mdlm` and `dllm-bench`: the tiny masked diffusion LMs, and early commit measured on them."""

from __future__ import annotations

import argparse
import logging
import os
import platform
import time
from pathlib import Path

from ..outputs import OutputKind
from . import arguments as arg
from .command import Command

TINY_MDLM = "tiny-mdlm"  # the shipped model, by name
MDLM = OutputKind(
    "ee-diffusion train-mdlm",
    (
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "README.md",
        "checkpoint/*",
    ),
    resumable=True,
)


def _train_mdlm(args: argparse.Namespace) -> int:
    from ..outputs import check_output_folder, resume_source, staged_folder
    from ..training.cards import masked_lm_card
    from ..training.mdlm import resume_state, train_mdlm

    if args.stop_at is not None and args.stop_at > args.steps:
        raise ValueError(f"Step {args.stop_at} (--stop-at) is past the run's last step (--steps {args.steps}).")
    check_output_folder(args.out, MDLM, overwrite=args.overwrite, resume=args.resume)
    arg.torch_with_threads(args.threads)
    if args.resume:  # the same run, with steps left, before anything is staged
        resume_state(_mdlm_config(args, str(resume_source(args.out))))
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    with staged_folder(args.out, resume=args.resume, keep_on_failure=True) as folder:
        config = _mdlm_config(args, str(folder))
        began = time.perf_counter()
        losses = train_mdlm(config, device=args.device, workers=args.workers)
        seconds = time.perf_counter() - began
        (folder / "README.md").write_text(
            masked_lm_card(Path(args.out).name, folder, arg.card_command(args), config, losses, seconds, args.device)
        )
    print(f"trained to step {config.last_step}; last loss {losses[-1]:.4f}; model in {args.out}")
    return 0


def _mdlm_config(args: argparse.Namespace, folder: str):
    from ..training.mdlm import MDLMTrainConfig

    return MDLMTrainConfig(
        output_dir=folder,
        steps=args.steps,
        batch_size=args.batch_size,
        learning_rate=args.lr,
        seed=args.seed,
        checkpoint_every=args.checkpoint_every,
        resume=args.resume,
        tasks=tuple(args.tasks),
        init_from=args.init_from,
        stop_at=args.stop_at,
    )


def _dllm_bench(args: argparse.Namespace) -> int:
    arg.check_output_files(args, "json", "plot")  # before anything heavy is imported

    from ..dllm.bench import best_rows, format_fronts, format_rows, plot_fronts, run_dllm_bench, write_json
    from ..dllm.methods import sweep_methods
    from ..pipelines import MaskedDiffusionLMPipeline

    tasks = args.tasks or _trained_tasks(args.model)
    torch = arg.torch_with_threads(args.threads)
    pipe = MaskedDiffusionLMPipeline.from_pretrained(args.model)
    methods = list(dict.fromkeys([*args.methods, *(sweep_methods() if args.sweep else [])]))
    timing = f"median of {args.repeats} interleaved passes after {args.warmup} warm-up" if args.repeats else "untimed"
    print(
        f"ee-diffusion dllm-bench: {args.model}, {args.num_problems} fresh problems per task (seed {args.seed}), "
        f"greedy, gen_length {pipe.config.gen_length}, {pipe.config.steps} steps for full, batch {args.batch_size}, "
        f"{torch.get_num_threads()} threads, {len(methods)} methods, {timing}"
    )
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}")
    rows = run_dllm_bench(
        pipe, tasks, methods, args.num_problems, args.batch_size, args.repeats, args.warmup, args.seed
    )
    print(format_rows(rows))
    if any(r.value is not None for r in rows):
        print("\nEach rule's settings, its accuracy-vs-NFE front:")
        print(format_fronts(rows))
        print("\nFewest NFE at >= 99% retention, per method:")
        print(format_rows(sorted(best_rows(rows), key=lambda r: (r.task, r.nfe))))
    if args.json:
        write_json(args.json, rows)
    if args.plot:
        plot_fronts(args.plot, rows)
        print(f"plot: {args.plot}")
    return 0


def _trained_tasks(model: str) -> list[str]:
    """The tasks a model folder says it was trained on (`tasks` in its `generation_config.json`)."""
    from transformers import GenerationConfig

    from ..dllm.tasks import TASKS
    from ..pipelines.loading import resolve_pretrained

    try:
        folder = resolve_pretrained(model, marker="tokenizer.json")
        tasks = GenerationConfig.from_pretrained(folder).to_dict().get("tasks")
    except OSError:
        tasks = None
    if not tasks or not set(tasks) <= set(TASKS):
        raise ValueError(
            f"{model} does not say which of the tasks ({', '.join(TASKS)}) it was trained on; name them with --tasks"
        )
    return list(tasks)


def _method(text: str) -> str:
    """One method spec, checked (`NAME[:VALUE][+CACHE[/K]]`)."""
    from ..dllm.methods import parse_method

    try:
        return parse_method(text).label
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _methods(text: str) -> list[str]:
    return [_method(spec) for spec in text.split(",")]


def _language_model(text: str, hub: bool = False) -> str:
    """A shipped language model's name or a folder holding one (`config.json`, `tokenizer.json`), or with `hub` a
    hub id (`org/name`, read when it loads), checked before anything loads."""
    from ..shipped import shipped_models

    if text in shipped_models("tokenizer.json"):
        return text
    if not os.path.isdir(text):
        looks_like_hub_id = text.count("/") == 1 and not text.startswith((".", "/", "~")) and not os.path.exists(text)
        if hub and looks_like_hub_id:
            return text
        raise argparse.ArgumentTypeError(
            f"{text!r} is neither a shipped language model ({', '.join(shipped_models('tokenizer.json'))}) nor a "
            f"folder{' nor a hub id (org/name)' if hub else ''}"
        )
    missing = [name for name in ("config.json", "tokenizer.json") if not os.path.isfile(os.path.join(text, name))]
    if missing:
        raise argparse.ArgumentTypeError(f"{text!r} holds no language model: no {' or '.join(missing)} in it")
    return text


def _train_mdlm_arguments(train: argparse.ArgumentParser) -> None:
    from ..dllm.tasks import TASKS
    from ..training.config import MDLMTrainConfig as Recipe

    train.add_argument(
        "--out",
        "--output-dir",
        dest="out",
        required=True,
        type=arg.output_folder,
        help="folder to write the model (and its checkpoint) to; never one of the shipped models",
    )
    arg.add_overwrite(train, "OUT")
    train.add_argument(
        "--tasks",
        type=arg.names(TASKS),
        default=list(Recipe.tasks),
        metavar="TASK[,TASK...]",
        help=f"comma-separated, of {', '.join(TASKS)}; drawn in turn within each batch (name a task "
        "twice for twice the share)",
    )
    train.add_argument(
        "--init-from",
        type=_language_model,
        help="start from this model's weights (a folder or shipped name, e.g. tiny-mdlm)",
    )
    train.add_argument("--steps", type=arg.integer(1), default=Recipe.steps, help="optimiser steps")
    train.add_argument("--batch-size", type=arg.integer(1), default=Recipe.batch_size, help="problems per step")
    train.add_argument(
        "--lr", type=arg.number(0, low_open=True), default=Recipe.learning_rate, help="peak AdamW learning rate"
    )
    train.add_argument("--seed", type=arg.seed, default=Recipe.seed, help="seed of initialisation, data and masks")
    train.add_argument(
        "--checkpoint-every", type=arg.integer(1), default=Recipe.checkpoint_every, help="steps between checkpoints"
    )
    train.add_argument(
        "--resume",
        action="store_true",
        help="continue the run that wrote OUT (or was interrupted writing it) from OUT/checkpoint",
    )
    train.add_argument(
        "--stop-at",
        type=arg.integer(1),
        help="stop after this step (checkpointed), keeping the learning-rate schedule of --steps",
    )
    train.add_argument("--threads", type=arg.integer(1), default=1, help="torch CPU threads")
    train.add_argument("--device", type=arg.device, default="cpu", help="torch device to train on, e.g. cuda")
    train.add_argument(
        "--workers",
        type=arg.integer(0),
        default=0,
        help="DataLoader processes generating problems ahead of the model (same run for any number)",
    )


def _dllm_bench_arguments(bench: argparse.ArgumentParser) -> None:
    from ..dllm.methods import CACHE_MODES, METHODS
    from ..dllm.tasks import TASKS

    bench.add_argument(
        "--model",
        type=lambda text: _language_model(arg.model_name(text), hub=True),
        default=TINY_MDLM,
        help="shipped model name, folder or hub id",
    )
    bench.add_argument(
        "--tasks",
        type=arg.names(TASKS),
        metavar="TASK[,TASK...]",
        help=f"comma-separated, of {', '.join(TASKS)} (default: the tasks the model was trained on)",
    )
    bench.add_argument(
        "--methods",
        type=_methods,
        default=list(METHODS),
        metavar="METHOD[,METHOD...]",
        help=f"comma-separated NAME[:VALUE][+CACHE[/K]], NAME of {', '.join(METHODS)}; CACHE of "
        f"{', '.join(CACHE_MODES)}",
    )
    bench.add_argument(
        "--sweep",
        action="store_true",
        help="also run every rule over its grid of thresholds and print each rule's front",
    )
    bench.add_argument("--num-problems", type=arg.integer(1), default=500, help="fresh problems per task")
    bench.add_argument("--batch-size", type=arg.integer(1), default=100, help="problems decoded at once")
    bench.add_argument(
        "--repeats",
        type=arg.integer(0),
        default=3,
        help="timed passes (interleaved); 0: decode once, untimed (accuracy and NFE only)",
    )
    bench.add_argument("--warmup", type=arg.integer(0), default=1, help="untimed passes first")
    bench.add_argument("--seed", type=arg.seed, default=1234, help="seed of the problems")
    bench.add_argument("--threads", type=arg.integer(1), default=1, help="torch CPU threads")
    bench.add_argument("--json", type=arg.output_file, help="also write the rows to this JSON file")
    bench.add_argument(
        "--plot", type=arg.plot_file, help="also plot accuracy against NFE per task to this image (.png, .svg, ...)"
    )
    arg.add_overwrite(bench, "the --json and --plot files")


COMMANDS = [
    Command(
        "train-mdlm",
        "train a tiny masked diffusion LM on toy tasks (CPU, seeded, checkpointed)",
        "Train a tiny masked diffusion LM (the recipe of the shipped tiny-mdlm by default) with the masked-diffusion "
        "objective; --resume continues from its checkpoint, --stop-at pauses a run.",
        _train_mdlm_arguments,
        _train_mdlm,
    ),
    Command(
        "dllm-bench",
        "accuracy, NFE and speed of dLLM decoding methods (full, halfsteps, threshold, prophet, sched-*), and each "
        "rule's accuracy-vs-NFE front (--sweep)",
        "Accuracy, retention, NFE, tokens/s, speedup and QPS (gamma 4) on fresh problems. A method is "
        "NAME[:VALUE][+CACHE[/K]]: VALUE is the rule's threshold (a probability for threshold, the highest top-2 "
        "logit gap for prophet and sched-*, default 7.5), CACHE is prefix or dual (Fast-dLLM's block KV cache), K "
        "refreshes the cache every K steps.",
        _dllm_bench_arguments,
        _dllm_bench,
    ),
]
