"""The optimisation loop every training recipe shares (the digits denoisers, ASE fine-tuning, DeeDiff's exit heads,
the digits-flux VAE and transformer): AdamW with warm-up and cosine decay, gradient clipping, EMA weights, a progress
bar, and seeded, resumable checkpoints."""

from __future__ import annotations

import hashlib
import logging
import pickle
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers.optimization import get_cosine_schedule_with_warmup
from diffusers.training_utils import EMAModel
from tqdm.auto import tqdm

from ..outputs import staged_file
from .config import TrainConfig

logger = logging.getLogger(__name__)

CHECKPOINT_NAME = "checkpoint.pt"


@dataclass
class TrainResult:
    """What a training run did: steps taken in this run and in all, its wall-clock seconds, and the loss curve."""

    steps_run: int
    total_steps: int
    seconds: float
    losses: list[float]


def save_checkpoint(path: Path, config: dict, step: int, saved: dict[str, Any], generator: torch.Generator) -> None:
    """`saved` (objects with a `state_dict`), the step reached, the config and the generator, to `path`: written whole
    and then put in place, so an interruption while writing leaves the last checkpoint as it was."""
    with staged_file(path) as staged:
        torch.save(
            {
                "config": config,
                "step": step,
                "generator": generator.get_state(),
                **{name: item.state_dict() for name, item in saved.items()},
            },
            staged,
        )


def public_config(config: Any) -> dict:
    """A diffusers config as a plain dict, without its private keys (`_class_name`, `_diffusers_version`, ...)."""
    return {key: value for key, value in dict(config).items() if not key.startswith("_")}


def weights_digest(module: torch.nn.Module) -> str:
    """A digest of `module`'s weights (SHA-256 of its state's bytes, in order): which model a run started from."""
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def check_same_run(path: Path, saved: dict, config: dict) -> None:
    """Raise a `ValueError` naming each setting in which the run that wrote the checkpoint `path` (its `saved` config)
    differs from `config`, the run asked to continue it."""
    if saved == config:
        return
    differ = sorted(key for key in {*saved, *config} if saved.get(key) != config.get(key))
    shown = "; ".join(f"{key}: {saved.get(key)!r} there, {config.get(key)!r} now" for key in differ)
    raise ValueError(f"{path} was written by another run ({shown}); resume it with its own settings.")


def read_checkpoint(path: Path, device: str | torch.device) -> dict:
    """The training state saved at `path`; a `FileNotFoundError` or `ValueError` (not a traceback) where there is none
    or it cannot be read."""
    if not path.is_file():
        raise FileNotFoundError(f"Cannot resume: no {path.name} in {path.parent}.")
    try:
        return torch.load(path, map_location=device, weights_only=False)
    except (RuntimeError, EOFError, pickle.UnpicklingError) as error:
        raise ValueError(f"Cannot resume from {path}: it is not a readable checkpoint ({error}).") from None


def load_checkpoint(
    path: Path | None, config: dict, saved: dict[str, Any], generator: torch.Generator, device: str | torch.device
) -> int:
    """Restore what `save_checkpoint` wrote into `saved` and `generator`; returns the step to continue from."""
    if path is None:
        raise FileNotFoundError(f"Cannot resume: no {CHECKPOINT_NAME} to resume from.")
    state = read_checkpoint(path, device)
    check_same_run(path, state["config"], config)
    for name, item in saved.items():
        try:
            item.load_state_dict(state[name])
        except (RuntimeError, KeyError, ValueError) as error:
            first = str(error).splitlines()[0]
            raise ValueError(f"Cannot resume from {path}: its {name} does not fit this run's ({first}).") from None
    generator.set_state(state["generator"].cpu())
    return state["step"]


def optimise(
    modules: dict[str, torch.nn.Module],
    batch_loss: Callable[[torch.Generator], torch.Tensor],
    config: TrainConfig,
    parameters: Iterable[torch.nn.Parameter] | None = None,
    checkpoint: Path | None = None,
    resume: bool = False,
    settings: dict | None = None,
    desc: str = "training",
    progress: bool = True,
    after_step: Callable[[], None] | None = None,
) -> TrainResult:
    """Minimise `batch_loss(generator)` over `parameters` for `config.steps` steps; on return they hold their EMA
    weights and `modules` are in eval mode.

    Args:
        modules: The modules trained, by the name their weights are checkpointed under, already on their device;
            they are put in train mode for the run.
        batch_loss: Draws a batch from the generator (seeded with `config.seed`, saved in checkpoints) and returns the
            loss on it.
        config: Steps, batch, learning rate, warm-up, weight decay, EMA decay, checkpoint interval, seed (the rest of
            its fields are the caller's).
        parameters: What the optimiser moves (default: the parameters of `modules` that require grad).
        checkpoint: The file written every `config.checkpoint_every` steps and at the end (`None`: none).
        resume: Continue from `checkpoint`, which must have been written with the same `config` and `settings`.
        settings: What else the run depends on (saved with the checkpoint and compared on resume).
        desc: The progress bar's label.
        progress: Show a progress bar.
        after_step: Called after each optimiser step (to reset per-step state of hooks, say).
    """
    if parameters is None:
        parameters = [p for module in modules.values() for p in module.parameters() if p.requires_grad]
    trainable = list(parameters)
    device = trainable[0].device
    optimizer = torch.optim.AdamW(trainable, lr=config.learning_rate, weight_decay=config.weight_decay)
    lr_schedule = get_cosine_schedule_with_warmup(optimizer, config.warmup_steps, config.steps)
    ema = EMAModel(trainable, decay=config.ema_decay, use_ema_warmup=True, power=3 / 4)
    generator = torch.Generator().manual_seed(config.seed)
    saved = {**modules, "optimizer": optimizer, "lr_schedule": lr_schedule, "ema": ema}
    run_config = {**asdict(config), **(settings or {})}
    start = load_checkpoint(checkpoint, run_config, saved, generator, device) if resume else 0

    for module in modules.values():
        module.train()
    losses: list[float] = []
    began = time.perf_counter()
    bar = tqdm(range(start, config.steps), initial=start, total=config.steps, disable=not progress, desc=desc)
    try:
        for step in bar:
            loss = batch_loss(generator)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            optimizer.step()
            lr_schedule.step()
            ema.step(trainable)
            if after_step is not None:
                after_step()
            losses.append(loss.item())
            bar.set_postfix(loss=f"{sum(losses[-50:]) / len(losses[-50:]):.4f}")
            done = step + 1
            if checkpoint is not None and (done % config.checkpoint_every == 0 or done == config.steps):
                save_checkpoint(checkpoint, run_config, done, saved, generator)
    finally:
        for module in modules.values():
            module.eval()
    ema.copy_to(trainable)
    seconds = time.perf_counter() - began
    logger.info("%s: %d steps in %.0f s", desc, config.steps - start, seconds)
    return TrainResult(steps_run=config.steps - start, total_steps=config.steps, seconds=seconds, losses=losses)
