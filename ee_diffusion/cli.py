"""The `ee-diffusion` command."""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

from . import cli_args as arg
from .dllm.cli_commands import add_dllm_commands

DESCRIPTION = """\
Early exit for diffusion models: make them sample faster by running fewer denoiser blocks where that is enough, and
measure it honestly (speed, executed blocks and sample quality, side by side with plain alternatives).

`ee-diffusion COMMAND --help` gives each command's options, with their defaults and accepted values."""


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
        with open(args.json, "w") as file:
            json.dump({"config": {**vars(args), "func": None}, "rows": rows_as_dicts(rows)}, file, indent=2)
    return 0


def _describe(schedule) -> str:
    config = schedule.config
    if config.shape == "step":
        return "step:" + ",".join(map(str, config.table))
    if config.shape in ("table", "plan"):
        return f"{config.shape} of {len(config.depths)} {'points' if config.shape == 'table' else 'steps'}"
    return f"{config.shape}:{config.min_blocks}"


def _bench(args: argparse.Namespace) -> int:
    from .bench.harness import BenchConfig, process_state, run_bench
    from .bench.methods import parse_methods
    from .bench.report import UNSTABLE_SPREAD, format_table, plot, unstable, write_csv, write_json

    torch = arg.torch_with_threads(args.threads)
    methods = parse_methods(args.methods) if args.methods else _default_methods(args.model, args.steps, args.scheduler)
    config = BenchConfig(
        model=args.model, methods=methods, num_samples=args.num_samples, batch_size=args.batch_size,
        repeats=args.repeats,
        steps=args.steps, scheduler=args.scheduler, grid=args.grid,
        guidance_scale=args.guidance_scale, seed=args.seed, device=args.device, dtype=args.dtype,
        compile=args.compile, xformers=args.xformers, save_images=args.save_images,
        reference=args.reference, fid_backend=args.fid_backend, inception_path=args.inception_path,
    )  # fmt: skip
    state = process_state(config.device)
    if state.is_main_process:
        cells = ", ".join(f"{scheduler}-{steps}" for scheduler, steps in config.cells())
        print(
            f"ee-diffusion bench: {config.model}, {len(methods)} methods x {config.num_samples} samples in each of "
            f"{cells} (scheduler-steps), guidance {config.guidance_scale}, batches of {config.batch_size}; speed: "
            f"{config.repeats} interleaved rounds of one batch per method; {args.device} {args.dtype}, "
            f"{state.num_processes} process(es), "
            f"{torch.get_num_threads()} threads, torch {torch.__version__}"
        )
    rows = run_bench(config)
    if not state.is_main_process:
        return 0
    print(format_table(rows))
    for row in unstable(rows):
        print(f"warning: the {config.repeats} timed rounds of {row.method} ({row.scheduler}, {row.steps} steps) "
              f"disagree by {row.timing_spread:.0%} of their median (interquartile range; above "
              f"{UNSTABLE_SPREAD:.0%} its speed and speedup are not to be trusted): close other work on the machine, "
              "set --threads to the cores free for it, or raise --repeats or --batch-size.",
              file=sys.stderr)  # fmt: skip
    if args.json:
        write_json(args.json, vars(config), rows)
    if args.csv:
        write_csv(args.csv, rows)
    if args.plot:
        plot(args.plot, rows)
    return 0


def _default_methods(model: str, steps: list[int], scheduler: list[str]) -> list[str]:
    """The fair front at the bench's step count: the baseline, the baseline at 80% of the steps (with one step count),
    FirstBlockCache at 0.15 (on `digits-dit` the strongest diffusers cache at 8-10 steps, see `ee-diffusion sweep`);
    then, when the model has a shipped ASE fine-tuned sibling, that model under its schedule at both step counts and
    under the plan shipped in its folder for this scheduler and step count (`plans/<scheduler>-<steps>`), and without
    a sibling, the model under `linear:0.5`."""
    from .pipelines import shipped_model_path

    fewer = round(0.8 * steps[0]) if len(steps) == 1 else 0
    at_fewer = [f"@{fewer}"] if 1 <= fewer < steps[0] else []
    plain = ["baseline", *(f"baseline{at}" for at in at_fewer), "fbcache:0.15"]
    sibling = f"{model}-ase"
    if shipped_model_path(sibling) is None:
        return [*plain, "ase:linear:0.5"]
    ours = [f"finetuned:{sibling}", *(f"finetuned:{sibling}{at}" for at in at_fewer)]
    plan = f"plans/{scheduler[0]}-{steps[0]}"  # a plan is made for one scheduler and step count: one cell only
    if len(steps) == len(scheduler) == 1 and (shipped_model_path(sibling) / plan).is_dir():
        ours.append(f"finetuned:{sibling}:{plan}")
    return [*plain, *ours]


def _train_config(args: argparse.Namespace, **overrides):
    from .training import TrainConfig

    return TrainConfig(
        steps=args.steps, batch_size=args.batch_size, learning_rate=args.lr, warmup_steps=args.warmup_steps,
        ema_decay=args.ema_decay, loss_weight=getattr(args, "loss_weight", "constant"),
        checkpoint_every=args.checkpoint_every,
        seed=args.seed, **overrides,
    )  # fmt: skip


def _hardware(device: str) -> str:
    """The machine a run used, in words, for model cards."""
    import torch

    if torch.device(device).type == "cuda":
        return f"one {torch.cuda.get_device_name(device)}"
    return f"{torch.get_num_threads()} CPU threads ({platform.processor() or platform.machine()})"


def _model_card(title: str, args: argparse.Namespace, result, extra: str = "") -> str:
    command = "ee-diffusion " + " ".join(args.argv)
    return (
        f"# {title}\n\n"
        "Data: scikit-learn `load_digits()`, train split of `ee_diffusion.data.load_digits_split` (seed 0, 80% of\n"
        "each class), 8x8 scans upsampled to 32x32 in [-1, 1]. Pixel space, no VAE.\n\n"
        f"{extra}"
        f"Trained with:\n\n```\n{command}\n```\n\n"
        f"Steps: {result.total_steps} (batch {args.batch_size}); time: {result.seconds / 60:.1f} min for the last "
        f"{result.steps_run} steps on {_hardware(args.device)}.\n\n"
        "Metrics: see the digits table of the project README (command there).\n"
    )


def _train(args: argparse.Namespace) -> int:
    from .data import load_digits_split
    from .training import build_digits_denoiser, digits_noise_scheduler, save_digits_pipeline, train_denoiser

    torch = arg.torch_with_threads(args.threads)
    if args.arch == "classifier":
        return _train_classifier(args)
    model = build_digits_denoiser(args.arch, seed=args.seed)
    noise_scheduler = digits_noise_scheduler(args.prediction_type)
    print(f"ee-diffusion train: digits-{args.arch}, {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters"
          f", predicting {args.prediction_type}")  # fmt: skip
    config = _train_config(args)
    result = train_denoiser(model, load_digits_split("train"), config, out_dir=args.out, resume=args.resume,
                            noise_scheduler=noise_scheduler, device=args.device)  # fmt: skip
    save_digits_pipeline(model, args.out, card=_model_card(f"digits-{args.arch}", args, result),
                         noise_scheduler=noise_scheduler)  # fmt: skip
    print(f"saved {args.out} ({result.steps_run} steps in {result.seconds / 60:.1f} min)")
    return 0


def _train_classifier(args: argparse.Namespace) -> int:
    from .data import load_digits_split
    import torch

    from .training.digits_classifier import train_digits_classifier

    model, accuracy, seconds = train_digits_classifier(
        load_digits_split("train"), load_digits_split("heldout"), epochs=args.epochs, seed=args.seed
    )
    model.save_pretrained(args.out)
    card = (
        "# digits-classifier\n\nThe digits feature network of `ee_diffusion.metrics` (FID/KID features and class "
        "accuracy of the digits models).\nData: train split of `ee_diffusion.data.load_digits_split` (seed 0), random "
        f"shifts of up to 2 pixels.\n\nTrained with:\n\n```\nee-diffusion {' '.join(args.argv)}\n```\n\n"
        f"{args.epochs} epochs in {seconds:.0f} s on {torch.get_num_threads()} CPU threads. Held-out accuracy "
        f"(359 images never trained on): {accuracy:.2%}.\n"
    )
    (Path(args.out) / "README.md").write_text(card)
    print(f"saved {args.out}: held-out accuracy {accuracy:.2%} ({seconds:.0f} s)")
    return 0


def _finetune_ase(args: argparse.Namespace) -> int:
    from diffusers import DDPMScheduler

    from .exits import denoiser_of
    from .data import load_digits_split
    from .exits import num_exit_blocks
    from .pipelines import load_early_exit_pipeline
    from .schedules import ExitSchedule
    from .training import save_digits_pipeline, train_denoiser

    torch = arg.torch_with_threads(args.threads)
    pipe = load_early_exit_pipeline(args.model, dtype=torch.float32)
    denoiser = denoiser_of(pipe)
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)  # the model's betas and prediction type
    schedule = ExitSchedule.from_spec(args.schedule, num_exit_blocks(denoiser))
    config = _train_config(args, freeze_timestep_embedding=True, class_dropout=args.class_dropout)
    print(f"ee-diffusion finetune-ase: {args.model} under {_describe(schedule)} ({config.steps} steps)")
    result = train_denoiser(denoiser, load_digits_split("train"), config, out_dir=args.out, exit_schedule=schedule,
                            resume=args.resume, noise_scheduler=noise_scheduler, device=args.device)  # fmt: skip
    extra = (f"ASE fine-tuned from `{args.model}` under the exit schedule `{_describe(schedule)}` (saved in "
             "`exit_schedule/`), timestep embedding frozen.\n\n")  # fmt: skip
    save_digits_pipeline(denoiser, args.out, exit_schedule=schedule, noise_scheduler=noise_scheduler,
                         card=_model_card(f"{Path(args.out).name}", args, result, extra))  # fmt: skip
    print(f"saved {args.out} ({result.steps_run} steps in {result.seconds / 60:.1f} min)")
    return 0


def _train_uem(args: argparse.Namespace) -> int:
    from diffusers import DDPMScheduler

    from .data import load_digits_split
    from .exits import ExitHeads, denoiser_of, exit_units
    from .pipelines import load_early_exit_pipeline
    from .training import save_digits_pipeline, train_exit_heads
    from .training.digits_models import save_safetensors_in_half

    torch = arg.torch_with_threads(args.threads)
    pipe = load_early_exit_pipeline(args.model, dtype=torch.float32)
    denoiser = denoiser_of(pipe)
    if getattr(denoiser, "transformer_blocks", None) is None:
        raise ValueError(f"{args.model} has a {type(denoiser).__name__}; exit heads are for transformer denoisers "
                         "(DiT).")  # fmt: skip
    heads = ExitHeads(num_blocks=len(exit_units(denoiser)), hidden_size=denoiser.transformer_blocks[0].dim,
                      exit_blocks=args.exit_blocks, threshold=args.threshold, policy=args.policy)  # fmt: skip
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)  # the model's betas and prediction type
    config = _train_config(args, class_dropout=args.class_dropout)
    mode = "jointly with the model" if args.joint else "on the frozen model"
    print(f"ee-diffusion train-uem: {len(heads.exit_blocks)} exit heads for {args.model}, {mode} "
          f"({config.steps} steps, lambda {args.uncertainty_weight}, beta {args.layerwise_weight})")  # fmt: skip
    result = train_exit_heads(denoiser, heads, load_digits_split("train"), config, out_dir=args.out, joint=args.joint,
                              uncertainty_weight=args.uncertainty_weight, layerwise_weight=args.layerwise_weight,
                              resume=args.resume, noise_scheduler=noise_scheduler, device=args.device)  # fmt: skip
    extra = (f"DeeDiff exit heads (output head and uncertainty estimator after blocks {heads.exit_blocks}) trained "
             f"{mode} (`L_simple + {args.uncertainty_weight} L_u + {args.layerwise_weight} L_UAL`); exit rule: "
             f"threshold {args.threshold}, {args.policy}.\n\n")  # fmt: skip
    card = _model_card(Path(args.out).name if args.joint else f"{Path(args.model).name} exit heads", args, result,
                       extra)  # fmt: skip
    if args.joint:
        save_digits_pipeline(denoiser, args.out, noise_scheduler=noise_scheduler, exit_heads=heads.cpu(), card=card)
    else:
        heads.cpu().save_pretrained(args.out)
        save_safetensors_in_half(Path(args.out), "*.safetensors")
        (Path(args.out) / "README.md").write_text(card)
    print(f"saved {args.out} ({result.steps_run} steps in {result.seconds / 60:.1f} min)")
    return 0


def _calibrate(args: argparse.Namespace) -> int:
    from .exits import denoiser_of
    from .bench.schedulers import build_scheduler
    from .pipelines import load_early_exit_pipeline
    from .pipelines.class_conditional import null_class_label
    from .schedules import calibrate_plan

    torch = arg.torch_with_threads(args.threads)
    pipe = load_early_exit_pipeline(args.model, dtype=torch.float32).to(args.device)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = build_scheduler(args.scheduler, pipe.scheduler.config)
    classes = null_class_label(denoiser_of(pipe))
    labels = [i % classes for i in range(args.num_probes)]
    budget = f"tolerance {args.tolerance}" if args.tolerance is not None else f"target compute {args.target_compute}"
    print(f"ee-diffusion calibrate: {args.model}, {args.scheduler} {args.steps} steps, guidance "
          f"{args.guidance_scale}, {args.num_probes} probes (seed {args.seed}), {budget}")  # fmt: skip
    result = calibrate_plan(pipe, {"class_labels": labels, "guidance_scale": args.guidance_scale}, args.steps,
                            tolerance=args.tolerance, target_compute=args.target_compute, seed=args.seed)  # fmt: skip
    result.plan.save_pretrained(args.out)
    report = {
        "command": "ee-diffusion " + " ".join(args.argv),
        "model": args.model, "scheduler": args.scheduler, "steps": args.steps, "guidance_scale": args.guidance_scale,
        "num_probes": args.num_probes, "seed": args.seed, "tolerance": args.tolerance,
        "target_compute": args.target_compute, "compute_fraction": result.compute_fraction, "error": result.error,
        "timesteps": list(result.timesteps), "base": list(result.base),
        "chain": [{"actions": list(p.actions), "compute_fraction": p.compute_fraction, "error": p.error}
                  for p in result.chain],
        "sensitivity": [{str(action): error for action, error in step.items()} for step in result.sensitivity],
    }  # fmt: skip
    (Path(args.out) / "calibration.json").write_text(json.dumps(report, indent=2))
    actions = ", ".join("reuse" if a == 0 else str(a) for a in reversed(result.plan.config.depths))
    print(f"plan (per step, first to last): {actions}")
    reference = "the full model" if pipe.exit_schedule is None else f"{args.model} under its own exit schedule"
    method = f"ase:{args.out}" if pipe.exit_schedule is None else f"finetuned:{args.model}:{args.out}"
    print(f"block compute {result.compute_fraction:.1%} of the full model's, final-image error {result.error:.4f} "
          f"(RMS against {reference}, pixels in [0, 1]); saved {args.out} (bench it as --methods {method})"
          )  # fmt: skip
    return 0


def _sweep(args: argparse.Namespace) -> int:
    from .bench.methods import parse_methods
    from .bench.sweep import SweepConfig, format_sweep, run_sweep

    torch = arg.torch_with_threads(args.threads)
    from .pipelines import shipped_model_path

    accelerators = parse_methods(args.accelerators) if args.accelerators else []
    finetuned = {"none": None, "auto": f"{args.model}-ase"}.get(args.finetuned, args.finetuned)
    if args.finetuned == "auto" and shipped_model_path(finetuned) is None:
        finetuned = None
    config = SweepConfig(
        out=args.out, model=args.model, scheduler=args.scheduler, steps=args.steps, budgets=args.budgets,
        accelerators=accelerators, num_samples=args.num_samples, batch_size=args.batch_size, repeats=args.repeats,
        guidance_scale=args.guidance_scale, num_probes=args.num_probes, seed=args.seed, device=args.device,
        finetuned=finetuned,
    )  # fmt: skip
    print(f"ee-diffusion sweep: {config.model}, {config.scheduler} at {config.steps} steps, plans at compute "
          f"{config.budgets}, accelerators {accelerators}, fine-tuned model {finetuned}, {config.num_samples} "
          f"samples per row, guidance {config.guidance_scale}; {torch.get_num_threads()} threads, torch "
          f"{torch.__version__}")  # fmt: skip
    swept = run_sweep(config)
    print(format_sweep(swept, max(config.steps)))
    print(f"wrote {args.out}/sweep.json, sweep.png, plans/ and best/")
    return 0


def _add_probe_arguments(command: argparse.ArgumentParser, schedulers: list[str], guidance: float) -> None:
    """The options `calibrate` and `sweep` share: the model and scheduler, and the probes' guidance, count and seed."""
    command.add_argument("--model", default="digits-dit", help="shipped model name or pipeline folder")
    command.add_argument("--scheduler", choices=schedulers, default="dpm-solver++", help="the plans' scheduler")
    command.add_argument("--guidance-scale", type=arg.number(0), default=guidance,
                         help="classifier-free guidance of the probes and the plans (1: off)")
    command.add_argument("--num-probes", type=arg.integer(1), default=10, help="probe images per calibration "
                         "(labels cycle through the classes)")  # fmt: skip
    command.add_argument("--seed", type=int, default=0,
                         help="seed of the probes' noise (and of bench batch i: seed + i)")
    command.add_argument("--device", type=arg.device, default="cpu", help="torch device")
    command.add_argument("--threads", type=arg.integer(0), default=0, help="torch CPU threads (0: torch's default)")


def _add_training_arguments(command: argparse.ArgumentParser, steps: int, batch: int, lr: float, warmup: int,
                            loss_weight: str | None) -> None:  # fmt: skip
    command.add_argument("--out", required=True, type=arg.output_folder,
                         help="folder to write the pipeline (and checkpoint.pt) to")
    command.add_argument("--steps", type=arg.integer(1), default=steps, help="optimiser steps")
    command.add_argument("--batch-size", type=arg.integer(1), default=batch, help="images per step")
    command.add_argument("--lr", type=arg.number(0, low_open=True), default=lr, help="peak AdamW learning rate")
    command.add_argument("--warmup-steps", type=arg.integer(0), default=warmup, help="linear learning-rate warm-up")
    command.add_argument("--ema-decay", type=arg.number(0, 1, high_open=True), default=0.999, help="EMA decay, [0, 1)")
    if loss_weight is not None:
        command.add_argument("--loss-weight", default=loss_weight, choices=["constant", "min-snr"], help="lambda(t)")
    command.add_argument("--checkpoint-every", type=arg.integer(1), default=250, help="steps between checkpoints")
    command.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    command.add_argument("--seed", type=int, default=0, help="seed of initialisation, data order and noise")
    command.add_argument("--threads", type=arg.integer(0), default=0, help="torch CPU threads (0: torch's default)")
    command.add_argument("--device", type=arg.device, default="cpu",
                         help="torch device to train a denoiser on, e.g. cuda (the classifier trains on the CPU)")


BENCH_METHODS_HELP = """\
methods (--methods, comma-separated):
  baseline                          the model at full depth
  ase:<schedule>                    an exit schedule: linear:M, cosine:M, step:d1,d2,... or a schedule folder
  finetuned:<model>[:<schedule>]    another model (ASE fine-tuned) with its saved exit schedule, or this one
  deediff[:<threshold>[:<policy>]]  DeeDiff uncertainty exits with the model's exit heads (train-uem), at its
                                    threshold (default: the heads'), per_batch (default) or per_sample
  fbcache[:<threshold>]             diffusers FirstBlockCache (default 0.05)
  layerskip[:<i,j,...>]             diffusers LayerSkip of these blocks (default: the middle block)
  taylorseer[:<interval>[:<order>]] diffusers TaylorSeer cache (default 5:1)
  magcache[:<threshold>[:<skips>]]  diffusers MagCache (default 0.06:3), ratios calibrated on the model
  pab[:<range>[:<lo>-<hi>]]         diffusers PyramidAttentionBroadcast (default 2:100-800)
  <method>@N                        that method at N scheduler steps instead of the cell's (baseline@8: fewer
                                    steps, timed beside the rest); its blocks count against the cell's steps
An accelerator that does not apply to the model gets a row with the reason instead of numbers.

example:
  ee-diffusion bench --model random:dit-xl-2 --methods baseline,ase:linear:0.5,fbcache:0.08 \\
      --batch-size 8 --num-samples 32 --steps 25 --dtype bfloat16 --device cuda
"""


def build_parser() -> argparse.ArgumentParser:
    from .bench.schedulers import SCHEDULERS
    from .training.config import PREDICTION_TYPES

    SCHEDULER_NAMES = list(SCHEDULERS)
    parser = argparse.ArgumentParser(prog="ee-diffusion", description=DESCRIPTION, formatter_class=arg.HelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    speed = commands.add_parser(
        "speed",
        formatter_class=arg.HelpFormatter,
        help="time a DiT denoising loop with and without exit schedules, side by side",
        description="Time a DiT denoising loop with and without exit schedules, interleaved, medians.",
    )
    speed.add_argument("--schedule", action="append", help="linear:M, cosine:M, constant:M, step:d1,... or a folder "
                       "(repeatable; M is blocks, or a fraction when written with a '.'; default: linear:0.5 and the "
                       "ASE table scaled to the model)")  # fmt: skip
    speed.add_argument("--num-layers", type=arg.integer(1), default=12, help="DiT blocks")
    speed.add_argument("--heads", type=arg.integer(1), default=6, help="attention heads")
    speed.add_argument("--head-dim", type=arg.integer(1), default=64, help="channels per head")
    speed.add_argument("--sample-size", type=arg.integer(2), default=32, help="latent side (tokens = (side / 2) ** 2)")
    speed.add_argument("--batch-size", type=arg.integer(1), default=2, help="latents per denoising loop")
    speed.add_argument("--steps", type=arg.integer(1), default=25, help="DPM-Solver++ steps")
    speed.add_argument("--repeats", type=arg.integer(1), default=5, help="timed rounds")
    speed.add_argument("--warmup", type=arg.integer(0), default=1, help="untimed rounds first")
    speed.add_argument("--seed", type=int, default=0, help="seed of the weights and latents")
    speed.add_argument("--device", type=arg.device, default="cpu", help="torch device")
    speed.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"], help="weights dtype")
    speed.add_argument("--threads", type=arg.integer(0), default=0, help="torch CPU threads (0: torch's default)")
    speed.add_argument("--json", type=arg.output_file, help="also write the rows to this JSON file")
    speed.set_defaults(func=_speed)

    bench = commands.add_parser(
        "bench",
        formatter_class=arg.HelpFormatter,
        help="compare methods on one model: speed, executed blocks, FID/KID/class accuracy",
        description="Generate the same class labels from the same seeds with each method, batch by batch, then time "
        "--repeats rounds of one batch per method (interleaved, rotating order), and report speed (median and "
        "spread), speedup (median of the per-round ratios to the baseline), executed block fraction and, for the "
        "digits models, FID/KID against the held-out digits and class accuracy by the digits feature network (any "
        "model: --reference). Under "
        "`accelerate launch --multi_gpu --num_processes N -m ee_diffusion.cli bench ...` (GPUs or CPU processes) the "
        "batches are split over the processes and scored once.",
        epilog=BENCH_METHODS_HELP,
    )
    bench.add_argument("--model", default="digits-dit", help="shipped model name, folder, hub id, or random:dit-xl-2 "
                       "/ random:dit-tiny (randomly initialised DiT, no VAE, speed only)")  # fmt: skip
    bench.add_argument("--methods", help="comma-separated method specs, see below (default: baseline, and the shipped "
                       "<model>-ase schedule and model when there is one)")  # fmt: skip
    bench.add_argument("--num-samples", type=arg.integer(2), default=250, help="images per method and cell, for "
                       "quality (FID/KID need at least 2)")  # fmt: skip
    bench.add_argument("--batch-size", type=arg.integer(1), default=10, help="images per generated batch; a timed "
                       "round generates one batch per method")  # fmt: skip
    bench.add_argument("--repeats", type=arg.integer(1), default=5, help="timed rounds per cell after quality "
                       "generation, methods interleaved with rotating order; the table gives the median and the "
                       "spread")  # fmt: skip
    bench.add_argument("--steps", type=arg.integers(1), default=[10], metavar="N[,N...]",
                       help="scheduler steps, or a comma-separated list (a grid axis)")  # fmt: skip
    bench.add_argument("--scheduler", type=arg.names(SCHEDULER_NAMES), default=["dpm-solver++"],
                       metavar="NAME[,NAME...]", help=f"{', '.join(SCHEDULER_NAMES)}, or a comma-separated list of "
                       "them (a grid axis)")  # fmt: skip
    bench.add_argument("--grid", default="zip", choices=["zip", "product"], help="zip: pair --scheduler and --steps "
                       "position by position (a single value is repeated); product: every combination")  # fmt: skip
    bench.add_argument("--guidance-scale", type=arg.number(0), default=2.0, help="classifier-free guidance (1: off; 2: "
                       "what the shipped digits models and plans are measured and calibrated at)")  # fmt: skip
    bench.add_argument("--seed", type=int, default=0, help="batch i is seeded with seed + i")
    bench.add_argument("--device", type=arg.device, default="cpu", help="torch device")
    bench.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"], help="weights dtype")
    bench.add_argument("--compile", action="store_true", help="torch.compile the denoiser's attention, feed-forward "
                       "and resnet modules (regional)")  # fmt: skip
    bench.add_argument("--xformers", action="store_true", help="xformers memory-efficient attention (needs the "
                       "xformers extra: pip install 'ee-diffusion[xformers]')")  # fmt: skip
    bench.add_argument("--threads", type=arg.integer(0), default=0, help="torch CPU threads (0: torch's default)")
    bench.add_argument("--json", type=arg.output_file, help="write the config and rows to this JSON file")
    bench.add_argument("--csv", type=arg.output_file, help="write the rows to this CSV file")
    bench.add_argument("--plot", type=arg.output_file, help="write quality against images/s, Pareto front marked, to "
                       "this PNG file")  # fmt: skip
    bench.add_argument("--reference", type=arg.existing_path, help="real images to score FID/KID against: a folder "
                       "of images or an .npz of "
                       "reference statistics (default: the held-out digits, for the digits models)")
    bench.add_argument("--fid-backend", choices=["clean-fid", "torchmetrics", "digits"],
                       help="FID/KID feature network for --reference (default: the .npz's, else digits for 1x32x32 "
                       "images, else clean-fid's Inception)")
    bench.add_argument("--inception-path", type=arg.existing_path,
                       help="local inception-2015-12-05.pt (or its folder) for --fid-backend clean-fid")
    bench.add_argument("--save-images", metavar="DIR", type=arg.output_folder,
                       help="write every image to DIR/{method}/{index:05d}_class{label}.png")
    bench.set_defaults(func=_bench)

    calibrate = commands.add_parser(
        "calibrate",
        formatter_class=arg.HelpFormatter,
        help="find the cheapest per-step plan of depths and reuse steps within an error budget",
        description="Calibrate a plan for one scheduler and step count from the model's own sampling runs (probes, "
        "no data): per step, the final-image error of each depth and of reusing the last computed step's work; then "
        "a chain of plans from full to cheapest, each measured; the budget picks one. The error is the RMS difference "
        "of the final images from the full model's (same noise and labels, pixel values in [0, 1]). Saves "
        "OUT/exit_schedule.json (the plan: --methods ase:OUT in the bench, exit_schedule= in a pipeline) and "
        "OUT/calibration.json (every plan measured).",
    )
    _add_probe_arguments(calibrate, SCHEDULER_NAMES, guidance=1.0)
    calibrate.add_argument("--steps", type=arg.integer(2), default=10, help="the plan's step count")
    budget = calibrate.add_mutually_exclusive_group(required=True)
    budget.add_argument("--tolerance", type=arg.number(0), help="largest final-image error (RMS, pixels in [0, 1]); "
                        "0 gives the full model")  # fmt: skip
    budget.add_argument("--target-compute", type=arg.number(0, 1, low_open=True),
                        help="share of the full block compute to spend, in (0, 1]")
    calibrate.add_argument("--out", required=True, type=arg.output_folder, help="folder to write the plan to")
    calibrate.set_defaults(func=_calibrate)

    sweep = commands.add_parser(
        "sweep",
        formatter_class=arg.HelpFormatter,
        help="the speed/quality front of one model: plans, shapes, fewer steps and diffusers' caches, side by side",
        description="For each step count: calibrate plans at each compute budget, pick linear shapes at matching "
        "compute, and bench them beside the baseline and diffusers' accelerators (same seeds, interleaved timing); "
        "with a fine-tuned model (--finetuned), that model under its schedule and under plans calibrated on it. "
        "Prints every row by block compute (a share of the full model at the largest step count) with the front "
        "marked and the cheapest row within 5, 10 and 20% of the largest step count's baseline FID; writes "
        "OUT/sweep.json, OUT/sweep.png, the plans (OUT/plans/) and the best plan per quality level (OUT/best/).",
    )
    _add_probe_arguments(sweep, SCHEDULER_NAMES, guidance=2.0)
    sweep.add_argument("--steps", type=arg.integers(2), default=[6, 8, 10, 20], metavar="N[,N...]",
                       help="step counts (the largest is the reference)")
    sweep.add_argument("--budgets", type=arg.numbers(0, 1, low_open=True, high_open=True),
                       default=[0.9, 0.8, 0.7, 0.6], metavar="F[,F...]",
                       help="compute budgets of the plans and shapes, shares in (0, 1)")
    sweep.add_argument("--accelerators", default="magcache:0.06:3,magcache:0.15:4,fbcache:0.05,fbcache:0.15",
                       help="diffusers accelerator methods, as in bench --methods ('' for none)")
    sweep.add_argument("--finetuned", default="auto", metavar="MODEL",
                       help="an ASE fine-tuned model of the same shape, benched under its schedule and under plans "
                       "calibrated on it; auto: the shipped MODEL-ase sibling if there is one; none: leave out")
    sweep.add_argument("--out", required=True, type=arg.output_folder, help="folder to write the results to")
    sweep.add_argument("--num-samples", type=arg.integer(2), default=250, help="images per row, for quality")
    sweep.add_argument("--batch-size", type=arg.integer(1), default=10, help="images per generated batch")
    sweep.add_argument("--repeats", type=arg.integer(1), default=5, help="timed rounds per step count")
    sweep.set_defaults(func=_sweep)

    train = commands.add_parser(
        "train",
        formatter_class=arg.HelpFormatter,
        help="train a shipped digits model (digits-dit, digits-unet or the digits classifier) from scratch",
        description="Train the class-conditional digits DiT or U-Net from scratch, seeded, with EMA and checkpoints, "
        "and save it as a drop-in pipeline folder.",
    )
    train.add_argument("--arch", required=True, choices=["dit", "unet", "classifier"],
                       help="the digits DiT, the digits U-Net, or the digits feature network for FID/KID/accuracy")
    train.add_argument("--epochs", type=arg.integer(1), default=30,
                       help="classifier only: epochs over the train split")
    train.add_argument("--prediction-type", choices=PREDICTION_TYPES, default="epsilon",
                       help="what the denoiser predicts: the noise (digits-dit) or the velocity (digits-unet)")
    _add_training_arguments(train, steps=3000, batch=128, lr=5e-4, warmup=100, loss_weight="constant")
    train.set_defaults(func=_train)

    finetune = commands.add_parser(
        "finetune-ase",
        formatter_class=arg.HelpFormatter,
        help="fine-tune a digits model under an exit schedule (ASE)",
        description="ASE fine-tuning: start from a trained pipeline folder and train under an exit schedule (each "
        "sample's output at its timestep's depth, batches grouped by depth), timestep embedding frozen, EMA, "
        "lambda(t) loss weight. Saves a pipeline folder whose exit_schedule/ holds the schedule.",
    )
    finetune.add_argument("--model", required=True, help="pipeline folder to start from")
    finetune.add_argument("--schedule", required=True, help="linear:M, cosine:M, step:d1,... or a schedule folder")
    finetune.add_argument("--class-dropout", type=arg.number(0, 1, high_open=True), default=0.1,
                          help="share of labels replaced by the null class (guidance training), [0, 1)")
    _add_training_arguments(finetune, steps=1000, batch=128, lr=1e-4, warmup=50, loss_weight="min-snr")
    finetune.set_defaults(func=_finetune_ase)

    uem = commands.add_parser(
        "train-uem",
        formatter_class=arg.HelpFormatter,
        help="train DeeDiff exit heads (output head + uncertainty estimator per block) for a digits DiT",
        description="DeeDiff: train an output head and an uncertainty estimation module after each block with "
        "L_simple + lambda L_u + beta L_UAL (pseudo ground truth tanh(|g_i(h_i) - target|)). Frozen mode (default) "
        "trains the heads only and saves them to OUT (load with ExitHeads.from_pretrained, or put them in the "
        "model's folder as exit_heads/ for bench --methods deediff); --joint also trains the model and saves a "
        "pipeline folder with its exit_heads component.",
    )
    uem.add_argument("--model", default="digits-dit", help="shipped model name or pipeline folder (a DiT)")
    uem.add_argument("--joint", action="store_true", help="train the model with the heads (default: frozen model)")
    uem.add_argument("--uncertainty-weight", type=arg.number(0), default=1.0, help="lambda, the weight of L_u")
    uem.add_argument("--layerwise-weight", type=arg.number(0), default=1.0, help="beta, the weight of L_UAL")
    uem.add_argument("--exit-blocks", type=arg.integers(1), default=None, metavar="N[,N...]",
                     help="block counts after which heads sit (default: after every block but the last)")
    uem.add_argument("--threshold", type=arg.number(0), default=0.1,
                     help="the exit rule saved with the heads: exit at uncertainty <= this")
    uem.add_argument("--policy", choices=["per_batch", "per_sample"], default="per_batch",
                     help="the exit rule saved with the heads: the batch exits together, or each sample")
    uem.add_argument("--class-dropout", type=arg.number(0, 1, high_open=True), default=0.1,
                     help="share of labels replaced by the null class, [0, 1)")
    _add_training_arguments(uem, steps=2000, batch=64, lr=1e-3, warmup=100, loss_weight=None)
    uem.set_defaults(func=_train_uem)
    add_dllm_commands(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)  # bad options end here: `error: ...`, exit status 2
    args.argv = argv
    try:
        return args.func(args)
    except (ValueError, ImportError, FileNotFoundError) as error:  # found once loaded: a bad spec, package or file
        print(f"ee-diffusion {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
