"""`ee-diffusion train`, `train-flux`, `finetune-ase` and `train-uem`: the shipped digits models and what is trained on
them.

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
FLUX_TRAINED = OutputKind(
    "ee-diffusion train-flux",
    (*_PIPELINE_FILES, "text_encoder/*", "text_encoder_2/*", "tokenizer/*", "tokenizer_2/*"),
    resumable=True,
)


def _train_config(args: argparse.Namespace, **overrides):
    from ..training import TrainConfig

    settings = {
        "steps": args.steps,
        "batch_size": args.batch_size,
        "learning_rate": args.lr,
        "warmup_steps": args.warmup_steps,
        "ema_decay": args.ema_decay,
        "loss_weight": getattr(args, "loss_weight", None) or "constant",
        "checkpoint_every": args.checkpoint_every,
        "seed": args.seed,
    }
    return TrainConfig(**{**settings, **overrides})


def _card(title: str, args: argparse.Namespace, result, extra: str = "", results: str = "docs/results.md") -> str:
    from ..training.cards import digits_model_card

    return digits_model_card(
        title,
        arg.card_command(args),
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
    ignored = _given(args, _DENOISER_ONLY if args.arch == "classifier" else ("--epochs",))
    if ignored:
        raise ValueError(
            f"The classifier trains for --epochs with --seed; {', '.join(ignored)} "
            f"set{'s' if len(ignored) == 1 else ''} how a denoiser trains (--arch dit, unet)"
            if args.arch == "classifier"
            else f"digits-{args.arch} trains for --steps; --epochs sets the classifier's training (--arch classifier)"
        )
    check_output_folder(args.out, TRAINED, overwrite=args.overwrite, resume=args.resume)
    arg.torch_with_threads(args.threads)
    with staged_folder(args.out, resume=args.resume, keep_on_failure=True) as folder:
        if args.arch == "classifier":
            message = _train_classifier(args, folder)
        else:
            message = _train_denoiser(args, folder)
    print(f"saved {args.out} {message}")
    return 0


# The options of `train` that only a denoiser's training reads (the classifier's takes --epochs and --seed).
_DENOISER_ONLY = (
    "--steps",
    "--batch-size",
    "--lr",
    "--warmup-steps",
    "--ema-decay",
    "--loss-weight",
    "--checkpoint-every",
    "--prediction-type",
    "--device",
)


def _given(args: argparse.Namespace, options: tuple[str, ...]) -> list[str]:
    """Which of `options` the command line gives (argparse takes an unambiguous prefix of an option, and
    `--option=value`)."""
    words = [word.split("=", 1)[0] for word in args.argv if word.startswith("--")]
    return [option for option in options if any(len(word) > 2 and option.startswith(word) for word in words)]


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
    (folder / "README.md").write_text(digits_classifier_card(arg.card_command(args), args.epochs, seconds, accuracy))
    return f"(held-out accuracy {accuracy:.2%}, {seconds:.0f} s)"


def _train_flux(args: argparse.Namespace) -> int:
    from ..outputs import check_output_folder, staged_folder

    too_long = [length for length in args.eval_text_lengths if length > 512]
    if too_long:
        raise ValueError(f"--eval-text-lengths must be at most 512 (FluxPipeline's limit), got {too_long}.")
    check_output_folder(args.out, FLUX_TRAINED, overwrite=args.overwrite, resume=args.resume)
    arg.torch_with_threads(args.threads)
    from diffusers import FluxPipeline

    from ..bench.noise_schedulers import schedulers_for
    from ..training import TrainConfig
    from ..training.cards import digits_flux_card
    from ..training.digits_flux import (
        DigitsFluxConfig,
        build_digits_flux_pipeline,
        save_digits_flux_pipeline,
        train_digits_flux,
    )
    from ..training.flow_matching import FlowMatchingConfig

    config = DigitsFluxConfig(
        vae=TrainConfig(
            steps=args.vae_steps,
            batch_size=args.vae_batch_size,
            learning_rate=args.vae_lr,
            warmup_steps=min(args.warmup_steps, args.vae_steps),
            ema_decay=args.ema_decay,
            checkpoint_every=args.checkpoint_every,
            seed=args.seed,
        ),
        transformer=_train_config(args, class_dropout=args.prompt_dropout),
        flow=FlowMatchingConfig(sigma_sampling=args.sigma_sampling, max_text_length=args.max_text_length),
        kl_weight=args.kl_weight,
    )
    pipe = build_digits_flux_pipeline(seed=args.seed, vae_seed=args.seed)
    count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    text = count(pipe.text_encoder) + count(pipe.text_encoder_2)
    print(
        f"ee-diffusion train-flux: digits-flux, transformer {count(pipe.transformer) / 1e6:.2f}M, VAE "
        f"{count(pipe.vae) / 1e6:.2f}M, text encoders {text / 1e3:.0f}K parameters (frozen)"
    )
    with staged_folder(args.out, resume=args.resume, keep_on_failure=True) as folder:
        vae_result, result = train_digits_flux(pipe, config, out_dir=folder, resume=args.resume, device=args.device)
        save_digits_flux_pipeline(pipe, folder)
        saved = FluxPipeline.from_pretrained(folder)  # what is measured is what was saved (fp16 weights)
        schedulers = schedulers_for(saved.scheduler.config)
        accuracies = _flux_accuracies(
            saved, schedulers, args.eval_samples, args.eval_steps, args.eval_text_lengths, args.eval_cfg
        )
        card = digits_flux_card(
            saved,
            arg.card_command(args),
            config,
            vae_result,
            result,
            args.device,
            accuracies,
            args.eval_samples,
            args.eval_steps,
        )
        (folder / "README.md").write_text(card)
    seconds = vae_result.seconds + result.seconds
    print(f"saved {args.out} ({vae_result.steps_run} + {result.steps_run} steps in {seconds / 60:.1f} min)")
    return 0


def _flux_accuracies(
    pipe, schedulers: list[str], num_samples: int, steps: int, text_lengths: list[int], scales: list[float]
) -> list[tuple[str, int, float, float]]:
    """(scheduler, max_sequence_length, true_cfg_scale, class accuracy) of `num_samples` samples at `steps` steps, for
    each scheduler of `schedulers`: unguided at each of `text_lengths`, and guided at each of `scales` at the first
    length."""
    from ..bench.noise_schedulers import build_scheduler
    from ..training.digits_flux import digits_flux_accuracy

    if not num_samples:
        return []
    own = pipe.scheduler
    pipe.set_progress_bar_config(disable=True)
    rows = []
    try:
        for name in schedulers:
            pipe.scheduler = build_scheduler(name, own.config)
            runs = [(length, 1.0) for length in text_lengths] + [(text_lengths[0], scale) for scale in scales]
            for length, scale in runs:
                accuracy = digits_flux_accuracy(
                    pipe, num_samples, steps, true_cfg_scale=scale, max_sequence_length=length
                )
                print(
                    f"  {name}, {steps} steps, max_sequence_length {length}, true_cfg_scale {scale:g}: "
                    f"class accuracy {accuracy:.1%}"
                )
                rows.append((name, length, scale, accuracy))
    finally:
        pipe.scheduler = own
        pipe.set_progress_bar_config(disable=False)
    return rows


def _refuse_scheduled(model: str, index: dict, what: str) -> None:
    """Raise a `ValueError` if the model folder whose `model_index.json` is `index` runs under an exit schedule: `what`
    is done on the model it was made from."""
    if (index.get("exit_schedule") or [None])[0] is not None:
        raise ValueError(f"{model} already runs under an exit schedule; {what} the model it was made from.")


def _finetune_ase(args: argparse.Namespace) -> int:
    from ..outputs import check_output_folder
    from ..pipelines.loading import model_index
    from ..schedules import ExitSchedule

    ExitSchedule.check_spec(args.schedule)
    index = model_index(args.model)
    _refuse_scheduled(args.model, index, "fine-tune")
    flux = index["_class_name"].endswith("FluxPipeline")
    if flux and args.loss_weight == "min-snr":
        raise ValueError(
            f"--loss-weight min-snr weighs DDPM noise levels; {args.model} is a flow-matching model, whose loss is "
            "unweighted (constant)."
        )
    if not flux and (args.eval_samples, args.eval_steps) != (None, None):
        raise ValueError(
            f"{args.model} is not a Flux model: --eval-samples and --eval-steps measure a Flux model's samples."
        )
    check_output_folder(args.out, FINETUNED, overwrite=args.overwrite, resume=args.resume)
    torch = arg.torch_with_threads(args.threads)
    (_finetune_flux if flux else _finetune_denoiser)(args, torch)
    return 0


_DISTILLED = ", each exit learning the base model's full-depth output (`--target teacher`)"


def _finetune_denoiser(args: argparse.Namespace, torch) -> None:
    from diffusers import DDPMScheduler

    from ..data import load_digits_split
    from ..exits import denoiser_of, num_exit_blocks
    from ..outputs import staged_folder
    from ..pipelines import load_early_exit_pipeline
    from ..schedules import ExitSchedule
    from ..training import save_digits_pipeline, train_denoiser

    pipe = load_early_exit_pipeline(args.model, dtype=torch.float32)
    denoiser = denoiser_of(pipe)
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)  # the model's betas and prediction type
    schedule = ExitSchedule.from_spec(args.schedule, num_exit_blocks(denoiser))
    config = _train_config(
        args,
        freeze_timestep_embedding=True,
        class_dropout=args.class_dropout,
        loss_weight=args.loss_weight or "min-snr",
        target=args.target,
    )
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
            f"`exit_schedule/`), timestep embedding frozen{_DISTILLED if args.target == 'teacher' else ''}.\n\n"
        )
        save_digits_pipeline(
            denoiser,
            folder,
            exit_schedule=schedule,
            noise_scheduler=noise_scheduler,
            card=_card(Path(args.out).name, args, result, extra),
        )
    print(f"saved {args.out} ({result.steps_run} steps in {result.seconds / 60:.1f} min)")


def _finetune_flux(args: argparse.Namespace, torch) -> None:
    from ..bench.noise_schedulers import schedulers_for
    from ..exits import num_exit_blocks
    from ..outputs import staged_folder
    from ..pipelines import load_early_exit_pipeline
    from ..schedules import ExitSchedule
    from ..training.cards import digits_flux_finetuned_card
    from ..training.digits_flux import DEFAULT_STEPS, finetune_digits_flux, save_digits_flux_pipeline
    from ..training.digits_text import TEXT_LENGTH

    pipe = load_early_exit_pipeline(args.model, dtype=torch.float32)
    schedule = ExitSchedule.from_spec(args.schedule, num_exit_blocks(pipe.transformer))
    config = _train_config(
        args,
        freeze_timestep_embedding=True,
        class_dropout=args.class_dropout,
        loss_weight="constant",
        target=args.target,
    )
    print(f"ee-diffusion finetune-ase: {args.model} under {schedule.describe()} ({config.steps} steps, flow matching)")
    with staged_folder(args.out, resume=args.resume, keep_on_failure=True) as folder:
        result = finetune_digits_flux(pipe, schedule, config, out_dir=folder, resume=args.resume, device=args.device)
        pipe.exit_schedule = schedule
        save_digits_flux_pipeline(pipe, folder)
        saved = load_early_exit_pipeline(str(folder))  # what is measured is what was saved (fp16 weights)
        steps = DEFAULT_STEPS if args.eval_steps is None else args.eval_steps
        samples = 500 if args.eval_samples is None else args.eval_samples
        schedulers = schedulers_for(saved.scheduler.config)
        accuracies = _flux_accuracies(saved, schedulers, samples, steps, [TEXT_LENGTH], [])
        card = digits_flux_finetuned_card(
            Path(args.out).name,
            args.model,
            arg.card_command(args),
            schedule,
            config,
            result,
            args.device,
            accuracies,
            samples,
            steps,
        )
        (folder / "README.md").write_text(card)
    print(f"saved {args.out} ({result.steps_run} steps in {result.seconds / 60:.1f} min)")


def _train_uem(args: argparse.Namespace) -> int:
    from diffusers import DDPMScheduler

    from ..data import load_digits_split
    from ..exits import ExitHeads, denoiser_of, exit_units
    from ..exits.uncertainty import SUPPORTED
    from ..outputs import check_output_folder, staged_folder
    from ..pipelines import load_early_exit_pipeline
    from ..pipelines.loading import model_index
    from ..training import save_digits_pipeline, train_exit_heads
    from ..training.digits_models import save_safetensors_in_half

    if args.exit_blocks is not None and args.exit_blocks != sorted(set(args.exit_blocks)):
        raise ValueError(f"--exit-blocks must be increasing block counts, got {','.join(map(str, args.exit_blocks))}.")
    index = model_index(args.model)
    denoiser_class = (index.get("transformer") or index.get("unet") or [None, None])[1]
    if denoiser_class not in {cls.__name__ for cls in SUPPORTED}:
        raise ValueError(
            f"{args.model} has a {denoiser_class}; exit heads are for "
            f"{', '.join(cls.__name__ for cls in SUPPORTED)} denoisers."
        )
    _refuse_scheduled(args.model, index, "train exit heads for")
    check_output_folder(args.out, EXIT_HEADS, overwrite=args.overwrite, resume=args.resume)
    torch = arg.torch_with_threads(args.threads)
    pipe = load_early_exit_pipeline(args.model, dtype=torch.float32)
    denoiser = denoiser_of(pipe)
    torch.manual_seed(args.seed)  # the heads' initialisation, as the seed says
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
    command.add_argument(
        "--ema-decay", type=arg.number(0, 1, low_open=True, high_open=True), default=0.999, help="EMA decay, (0, 1)"
    )
    if loss_weight is not None:
        command.add_argument("--loss-weight", default=loss_weight, choices=["constant", "min-snr"], help="lambda(t)")
    command.add_argument("--checkpoint-every", type=arg.integer(1), default=250, help="steps between checkpoints")
    command.add_argument("--seed", type=arg.seed, default=0, help="seed of initialisation, data order and noise")
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


def _flux_arguments(train: argparse.ArgumentParser) -> None:
    train.add_argument("--vae-steps", type=arg.integer(1), default=600, help="optimiser steps of the VAE (first)")
    train.add_argument("--vae-batch-size", type=arg.integer(1), default=64, help="images per VAE step")
    train.add_argument(
        "--vae-lr", type=arg.number(0, low_open=True), default=1e-3, help="peak learning rate of the VAE"
    )
    train.add_argument(
        "--kl-weight", type=arg.number(0), default=1e-4, help="weight of the VAE's KL term per latent element"
    )
    train.add_argument(
        "--prompt-dropout",
        type=arg.number(0, 1, high_open=True),
        default=0.1,
        help="share of prompts replaced by the empty prompt (for true_cfg_scale with negative_prompt=''), [0, 1)",
    )
    train.add_argument(
        "--sigma-sampling",
        choices=["logit-normal", "uniform"],
        default="logit-normal",
        help="how noise levels are drawn before the scheduler's shift",
    )
    train.add_argument(
        "--max-text-length",
        type=arg.integer(1, 512),
        default=512,
        help="the longest T5 sequence (max_sequence_length) the transformer is trained for; 8: only 8",
    )
    train.add_argument(
        "--eval-samples",
        type=arg.integer(0),
        default=500,
        help="samples per scheduler whose class accuracy the card reports (0: none)",
    )
    train.add_argument("--eval-steps", type=arg.integer(1), default=28, help="sampling steps of that measurement")
    train.add_argument(
        "--eval-cfg",
        type=arg.numbers(1, 100, low_open=True),
        default=[2.0],
        metavar="SCALE[,SCALE...]",
        help="true_cfg_scale values (negative prompt '') measured besides the unguided 1",
    )
    train.add_argument(
        "--eval-text-lengths",
        type=arg.integers(4),
        default=[8, 512],
        metavar="N[,N...]",
        help="max_sequence_length values (T5 tokens) measured unguided; guidance is measured at the first",
    )
    _add_training_arguments(train, steps=4000, batch=128, lr=1e-3, warmup=100, loss_weight=None)


def _finetune_arguments(finetune: argparse.ArgumentParser) -> None:
    finetune.add_argument(
        "--model",
        type=arg.model_name,
        required=True,
        help="pipeline folder to start from (a digits DiT, U-Net or Flux)",
    )
    finetune.add_argument("--schedule", required=True, help="linear:M, cosine:M, step:d1,... or a schedule folder")
    finetune.add_argument(
        "--class-dropout",
        type=arg.number(0, 1, high_open=True),
        default=0.1,
        help="share of labels (Flux: prompts) replaced by the null class (the empty prompt) for guidance, [0, 1)",
    )
    finetune.add_argument(
        "--target",
        choices=["data", "teacher"],
        default="data",
        help="what each exit learns: the objective's target from the data (ASE), or the base model's own full-depth "
        "output (self-distillation, whose targets carry none of the data's noise)",
    )
    finetune.add_argument(
        "--eval-samples",
        type=arg.integer(0),
        default=None,
        help="Flux only: samples per scheduler whose class accuracy under the schedule the card reports "
        "(default: 500)",
    )
    finetune.add_argument(
        "--eval-steps", type=arg.integer(1), default=None, help="Flux only: steps of that measurement (default: 28)"
    )
    finetune.add_argument(
        "--loss-weight",
        default=None,
        choices=["constant", "min-snr"],
        help="lambda(t) (default: min-snr for DDPM models; a flow-matching model takes constant only)",
    )
    _add_training_arguments(finetune, steps=1000, batch=128, lr=1e-4, warmup=50, loss_weight=None)


def _uem_arguments(uem: argparse.ArgumentParser) -> None:
    uem.add_argument(
        "--model", type=arg.model_name, default="digits-dit", help="shipped model name or pipeline folder (a DiT)"
    )
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
        type=arg.number(0, 1, low_open=True),
        default=0.1,
        help="the exit rule saved with the heads: exit at uncertainty <= this, in (0, 1] (0 would never exit)",
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
        "train-flux",
        "train the shipped text-to-image digits-flux model (VAE, then Flux transformer) from scratch",
        "Train digits-flux: a small AutoencoderKL on the digits first, then a FluxTransformer2DModel (2 double-stream "
        "and 6 single-stream blocks) on its latents with the rectified-flow objective, prompts 'a handwritten seven' "
        "read by a tiny CLIP and a tiny T5 encoder (frozen at their seeded initialisation); seeded, with EMA and "
        "checkpoints. Saves a stock FluxPipeline folder whose card reports the class accuracy of its samples under "
        "each scheduler that fits it.",
        _flux_arguments,
        _train_flux,
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
