"""`ee-diffusion train`, `finetune-ase` and `train-uem`: the shipped digits models and what is trained on them.

Each writes its folder whole and puts it in place when done (`ee_diffusion.outputs.staged_folder`): an interrupted
run leaves an earlier output as it was, and keeps its checkpoint beside it for `--resume`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..outputs import OutputKind
from . import arguments as arg
from .command import Command

_PIPELINE_FILES = (
    "model_index.json",
    "README.md",
    "checkpoint.pt",
    "scheduler/*",
    "transformer/*",
    "unet/*",
    "vae/*",
    "exit_schedule/*",
    "exit_heads/*",
)
_MODEL_FILES = ("config.json", "diffusion_pytorch_model.safetensors", "README.md", "checkpoint.pt")
TRAINED = OutputKind("ee-diffusion train", (*_PIPELINE_FILES, *_MODEL_FILES), resumable=True)
FINETUNED = OutputKind("ee-diffusion finetune-ase", _PIPELINE_FILES, resumable=True)
EXIT_HEADS = OutputKind("ee-diffusion train-uem", (*_PIPELINE_FILES, *_MODEL_FILES), resumable=True)


def _command(args: argparse.Namespace) -> str:
    return "ee-diffusion " + " ".join(args.argv)


def _train_config(args: argparse.Namespace, **overrides):
    from ..training import TrainConfig

    return TrainConfig(
        steps=args.steps,
        batch_size=args.batch_size,
        learning_rate=args.lr,
        warmup_steps=args.warmup_steps,
        ema_decay=args.ema_decay,
        loss_weight=getattr(args, "loss_weight", "constant"),
        checkpoint_every=args.checkpoint_every,
        seed=args.seed,
        **overrides,
    )


def _card(title: str, args: argparse.Namespace, result, extra: str = "", results: str = "docs/results.md") -> str:
    from ..training.cards import digits_model_card

    return digits_model_card(
        title,
        _command(args),
        result.total_steps,
        result.steps_run,
        result.seconds,
        args.batch_size,
        args.device,
        extra,
        results,
    )


def _train(args: argparse.Namespace) -> int:
    from ..outputs import check_output_folder, staged_folder

    if args.arch == "classifier" and args.resume:
        raise ValueError("--resume continues a denoiser's training; the classifier trains in one go.")
    check_output_folder(args.out, TRAINED, overwrite=args.overwrite, resume=args.resume)
    arg.torch_with_threads(args.threads)
    with staged_folder(args.out, resume=args.resume, keep_on_failure=True) as folder:
        if args.arch == "classifier":
            message = _train_classifier(args, folder)
        else:
            message = _train_denoiser(args, folder)
    print(f"saved {args.out} {message}")
    return 0


def _train_denoiser(args: argparse.Namespace, folder: Path) -> str:
    from ..data import load_digits_split
    from ..training import build_digits_denoiser, digits_noise_scheduler, save_digits_pipeline, train_denoiser

    model = build_digits_denoiser(args.arch, seed=args.seed)
    noise_scheduler = digits_noise_scheduler(args.prediction_type)
    print(
        f"ee-diffusion train: digits-{args.arch}, {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters"
        f", predicting {args.prediction_type}"
    )
    result = train_denoiser(
        model,
        load_digits_split("train"),
        _train_config(args),
        out_dir=folder,
        resume=args.resume,
        noise_scheduler=noise_scheduler,
        device=args.device,
    )
    save_digits_pipeline(
        model, folder, card=_card(f"digits-{args.arch}", args, result), noise_scheduler=noise_scheduler
    )
    return f"({result.steps_run} steps in {result.seconds / 60:.1f} min)"


def _train_classifier(args: argparse.Namespace, folder: Path) -> str:
    from ..data import load_digits_split
    from ..training.cards import digits_classifier_card
    from ..training.classifier import train_digits_classifier

    model, accuracy, seconds = train_digits_classifier(
        load_digits_split("train"), load_digits_split("heldout"), epochs=args.epochs, seed=args.seed
    )
    model.save_pretrained(folder)
    (folder / "README.md").write_text(digits_classifier_card(_command(args), args.epochs, seconds, accuracy))
    return f"(held-out accuracy {accuracy:.2%}, {seconds:.0f} s)"


def _finetune_ase(args: argparse.Namespace) -> int:
    from diffusers import DDPMScheduler

    from ..data import load_digits_split
    from ..exits import denoiser_of, num_exit_blocks
    from ..outputs import check_output_folder, staged_folder
    from ..pipelines import load_early_exit_pipeline
    from ..schedules import ExitSchedule
    from ..training import save_digits_pipeline, train_denoiser

    check_output_folder(args.out, FINETUNED, overwrite=args.overwrite, resume=args.resume)
    torch = arg.torch_with_threads(args.threads)
    pipe = load_early_exit_pipeline(args.model, dtype=torch.float32)
    denoiser = denoiser_of(pipe)
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)  # the model's betas and prediction type
    schedule = ExitSchedule.from_spec(args.schedule, num_exit_blocks(denoiser))
    config = _train_config(args, freeze_timestep_embedding=True, class_dropout=args.class_dropout)
    print(f"ee-diffusion finetune-ase: {args.model} under {schedule.describe()} ({config.steps} steps)")
    with staged_folder(args.out, resume=args.resume, keep_on_failure=True) as folder:
        result = train_denoiser(
            denoiser,
            load_digits_split("train"),
            config,
            out_dir=folder,
            exit_schedule=schedule,
            resume=args.resume,
            noise_scheduler=noise_scheduler,
            device=args.device,
        )
        extra = (
            f"ASE fine-tuned from `{args.model}` under the exit schedule `{schedule.describe()}` (saved in "
            "`exit_schedule/`), timestep embedding frozen.\n\n"
        )
        save_digits_pipeline(
            denoiser,
            folder,
            exit_schedule=schedule,
            noise_scheduler=noise_scheduler,
            card=_card(Path(args.out).name, args, result, extra),
        )
    print(f"saved {args.out} ({result.steps_run} steps in {result.seconds / 60:.1f} min)")
    return 0


def _train_uem(args: argparse.Namespace) -> int:
    from diffusers import DDPMScheduler

    from ..data import load_digits_split
    from ..exits import ExitHeads, denoiser_of, exit_units
    from ..outputs import check_output_folder, staged_folder
    from ..pipelines import load_early_exit_pipeline
    from ..training import save_digits_pipeline, train_exit_heads
    from ..training.digits_models import save_safetensors_in_half

    check_output_folder(args.out, EXIT_HEADS, overwrite=args.overwrite, resume=args.resume)
    torch = arg.torch_with_threads(args.threads)
    pipe = load_early_exit_pipeline(args.model, dtype=torch.float32)
    denoiser = denoiser_of(pipe)
    if getattr(denoiser, "transformer_blocks", None) is None:
        raise ValueError(
            f"{args.model} has a {type(denoiser).__name__}; exit heads are for transformer denoisers (DiT)."
        )
    heads = ExitHeads(
        num_blocks=len(exit_units(denoiser)),
        hidden_size=denoiser.transformer_blocks[0].dim,
        exit_blocks=args.exit_blocks,
        threshold=args.threshold,
        policy=args.policy,
    )
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)  # the model's betas and prediction type
    config = _train_config(args, class_dropout=args.class_dropout)
    mode = "jointly with the model" if args.joint else "on the frozen model"
    print(
        f"ee-diffusion train-uem: {len(heads.exit_blocks)} exit heads for {args.model}, {mode} "
        f"({config.steps} steps, lambda {args.uncertainty_weight}, beta {args.layerwise_weight})"
    )
    with staged_folder(args.out, resume=args.resume, keep_on_failure=True) as folder:
        result = train_exit_heads(
            denoiser,
            heads,
            load_digits_split("train"),
            config,
            out_dir=folder,
            joint=args.joint,
            uncertainty_weight=args.uncertainty_weight,
            layerwise_weight=args.layerwise_weight,
            resume=args.resume,
            noise_scheduler=noise_scheduler,
            device=args.device,
        )
        extra = (
            f"DeeDiff exit heads (output head and uncertainty estimator after blocks {heads.exit_blocks}) "
            f"trained {mode} (`L_simple + {args.uncertainty_weight} L_u + {args.layerwise_weight} L_UAL`); exit "
            f"rule: threshold {args.threshold}, {args.policy}.\n\n"
        )
        title = Path(args.out).name if args.joint else f"{Path(args.model).name} exit heads"
        card = _card(title, args, result, extra, results="docs/deediff.md")
        if args.joint:
            save_digits_pipeline(denoiser, folder, noise_scheduler=noise_scheduler, exit_heads=heads.cpu(), card=card)
        else:
            heads.cpu().save_pretrained(folder)
            save_safetensors_in_half(folder, "*.safetensors")
            (folder / "README.md").write_text(card)
    print(f"saved {args.out} ({result.steps_run} steps in {result.seconds / 60:.1f} min)")
    return 0


def _add_training_arguments(
    command: argparse.ArgumentParser, steps: int, batch: int, lr: float, warmup: int, loss_weight: str | None
) -> None:
    command.add_argument(
        "--out",
        required=True,
        type=arg.output_folder,
        help="folder to write the model (and checkpoint.pt) to; never one of the shipped models",
    )
    arg.add_overwrite(command, "OUT")
    command.add_argument(
        "--resume",
        action="store_true",
        help="continue the run that wrote OUT (or was interrupted "
        "writing it) from its checkpoint.pt, with the same settings",
    )
    command.add_argument("--steps", type=arg.integer(1), default=steps, help="optimiser steps")
    command.add_argument("--batch-size", type=arg.integer(1), default=batch, help="images per step")
    command.add_argument("--lr", type=arg.number(0, low_open=True), default=lr, help="peak AdamW learning rate")
    command.add_argument("--warmup-steps", type=arg.integer(0), default=warmup, help="linear learning-rate warm-up")
    command.add_argument("--ema-decay", type=arg.number(0, 1, high_open=True), default=0.999, help="EMA decay, [0, 1)")
    if loss_weight is not None:
        command.add_argument("--loss-weight", default=loss_weight, choices=["constant", "min-snr"], help="lambda(t)")
    command.add_argument("--checkpoint-every", type=arg.integer(1), default=250, help="steps between checkpoints")
    command.add_argument("--seed", type=int, default=0, help="seed of initialisation, data order and noise")
    command.add_argument("--threads", type=arg.integer(0), default=0, help="torch CPU threads (0: torch's default)")
    command.add_argument(
        "--device",
        type=arg.device,
        default="cpu",
        help="torch device to train a denoiser on, e.g. cuda (the classifier trains on the CPU)",
    )


def _train_arguments(train: argparse.ArgumentParser) -> None:
    from ..training.config import PREDICTION_TYPES

    train.add_argument(
        "--arch",
        required=True,
        choices=["dit", "unet", "classifier"],
        help="the digits DiT, the digits U-Net, or the digits feature network for FID/KID/accuracy",
    )
    train.add_argument(
        "--epochs", type=arg.integer(1), default=30, help="classifier only: epochs over the train split"
    )
    train.add_argument(
        "--prediction-type",
        choices=PREDICTION_TYPES,
        default="epsilon",
        help="what the denoiser predicts: the noise (digits-dit) or the velocity (digits-unet)",
    )
    _add_training_arguments(train, steps=3000, batch=128, lr=5e-4, warmup=100, loss_weight="constant")


def _finetune_arguments(finetune: argparse.ArgumentParser) -> None:
    finetune.add_argument("--model", required=True, help="pipeline folder to start from")
    finetune.add_argument("--schedule", required=True, help="linear:M, cosine:M, step:d1,... or a schedule folder")
    finetune.add_argument(
        "--class-dropout",
        type=arg.number(0, 1, high_open=True),
        default=0.1,
        help="share of labels replaced by the null class (guidance training), [0, 1)",
    )
    _add_training_arguments(finetune, steps=1000, batch=128, lr=1e-4, warmup=50, loss_weight="min-snr")


def _uem_arguments(uem: argparse.ArgumentParser) -> None:
    uem.add_argument("--model", default="digits-dit", help="shipped model name or pipeline folder (a DiT)")
    uem.add_argument("--joint", action="store_true", help="train the model with the heads (default: frozen model)")
    uem.add_argument("--uncertainty-weight", type=arg.number(0), default=1.0, help="lambda, the weight of L_u")
    uem.add_argument("--layerwise-weight", type=arg.number(0), default=1.0, help="beta, the weight of L_UAL")
    uem.add_argument(
        "--exit-blocks",
        type=arg.integers(1),
        default=None,
        metavar="N[,N...]",
        help="block counts after which heads sit (default: after every block but the last)",
    )
    uem.add_argument(
        "--threshold",
        type=arg.number(0),
        default=0.1,
        help="the exit rule saved with the heads: exit at uncertainty <= this",
    )
    uem.add_argument(
        "--policy",
        choices=["per_batch", "per_sample"],
        default="per_batch",
        help="the exit rule saved with the heads: the batch exits together, or each sample",
    )
    uem.add_argument(
        "--class-dropout",
        type=arg.number(0, 1, high_open=True),
        default=0.1,
        help="share of labels replaced by the null class, [0, 1)",
    )
    _add_training_arguments(uem, steps=2000, batch=64, lr=1e-3, warmup=100, loss_weight=None)


COMMANDS = [
    Command(
        "train",
        "train a shipped digits model (digits-dit, digits-unet or the digits classifier) from scratch",
        "Train the class-conditional digits DiT or U-Net from scratch, seeded, with EMA and checkpoints, and save it "
        "as a drop-in pipeline folder.",
        _train_arguments,
        _train,
    ),
    Command(
        "finetune-ase",
        "fine-tune a digits model under an exit schedule (ASE)",
        "ASE fine-tuning: start from a trained pipeline folder and train under an exit schedule (each sample's output "
        "at its timestep's depth, batches grouped by depth), timestep embedding frozen, EMA, lambda(t) loss weight. "
        "Saves a pipeline folder whose exit_schedule/ holds the schedule.",
        _finetune_arguments,
        _finetune_ase,
    ),
    Command(
        "train-uem",
        "train DeeDiff exit heads (output head + uncertainty estimator per block) for a digits DiT",
        "DeeDiff: train an output head and an uncertainty estimation module after each block with L_simple + lambda "
        "L_u + beta L_UAL (pseudo ground truth tanh(|g_i(h_i) - target|)). Frozen mode (default) trains the heads "
        "only and saves them to OUT (load them with ExitHeads.from_pretrained; bench --methods deediff finds them in "
        "a model's folder as exit_heads/, so train them into MODEL_FOLDER/exit_heads of a copy of the model); --joint "
        "also trains the model and saves a pipeline folder with its exit_heads component.",
        _uem_arguments,
        _train_uem,
    ),
]
