"""Calibrate a plan: the cheapest per-step depths and reuse steps within an error budget on the final samples.

From a few of the pipeline's own sampling runs (probes: its own noise and conditioning, no training data):

1. the full model's final images are the reference, and the denoiser's timesteps give the plan its steps;
2. sensitivity: for each step and each cheaper action there (every depth below full, and `REUSE`), one run with only
   that step changed gives the error it alone puts on the final images, through the solver's later steps;
3. a chain of plans from full to cheapest: each link changes one step, by the move that costs the least predicted
   error (errors of separate steps summed in squares) per block saved, one block at a time or straight to `REUSE`;
4. every plan on the chain is run and its real final-image error measured; the budget then picks one: the cheapest
   with a measured error within `tolerance`, or, for `target_compute`, the most accurate at or under the target,
   then filled back up to the target block by block where the sensitivities say blocks help most (and measured).

The error of a plan is the root-mean-square difference of its final images from the full model's, from the same noise
and conditioning, in pixel values in [0, 1] (`output_type="np"`). What a plan fixes ahead of time is everything: the
depth or reuse of each step; nothing is decided while sampling.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ..validation import as_int, as_number
from .exit_schedule import REUSE, ExitSchedule


@dataclass(frozen=True)
class PlanPoint:
    """One plan of the calibration chain: its per-step actions, share of full block compute, and measured error."""

    actions: tuple[int, ...]
    compute_fraction: float
    error: float


@dataclass(frozen=True)
class Calibration:
    """What `calibrate_plan` found.

    Args:
        plan: The plan the budget picked.
        compute_fraction: Its share of the full model's block compute (reuse steps count 0).
        error: Its measured final-image error (RMS, pixel values in [0, 1]) on the probes.
        timesteps: The denoiser's timestep at each step, in sampling order.
        sensitivity: `sensitivity[i][a]`: the final-image error of the full plan with step `i` at action `a` alone.
        chain: Every plan measured, from full to cheapest.
    """

    plan: ExitSchedule
    compute_fraction: float
    error: float
    timesteps: tuple[float, ...]
    sensitivity: tuple[dict[int, float], ...]
    chain: tuple[PlanPoint, ...]


def _denoiser(pipe: Any) -> torch.nn.Module:
    for name in ("transformer", "unet"):
        module = getattr(pipe, name, None)
        if isinstance(module, torch.nn.Module):
            return module
    raise TypeError(f"{type(pipe).__name__} has no `transformer` or `unet` to calibrate a plan for.")


@contextlib.contextmanager
def _planned(pipe: Any) -> Iterator[Any]:
    """Inside: `use(plan)` puts a plan (`None`: the full model) on `pipe`; after, its own schedule is back."""
    from ..exits import apply_exit_schedule, get_exit_schedule, remove_exit_schedule

    drop_in = hasattr(pipe, "set_exit_schedule")
    own = pipe.exit_schedule if drop_in else get_exit_schedule(pipe)

    def use(plan: ExitSchedule | None) -> None:
        if drop_in:
            pipe.exit_schedule = plan
        elif plan is None:
            remove_exit_schedule(pipe)
        else:
            apply_exit_schedule(pipe, plan)

    try:
        yield use
    finally:
        if drop_in:
            pipe.set_exit_schedule(own)
        elif own is None:
            remove_exit_schedule(pipe)
        else:
            apply_exit_schedule(pipe, own)


def calibrate_plan(
    pipe: Any,
    call_kwargs: dict[str, Any],
    num_inference_steps: int,
    tolerance: float | None = None,
    target_compute: float | None = None,
    seed: int = 0,
    progress: bool = True,
) -> Calibration:
    """The cheapest plan within `tolerance`, or the most accurate at `target_compute` (give exactly one).

    Args:
        pipe: A pipeline whose denoiser the exit hooks support (a drop-in one, or a stock diffusers one), with the
            scheduler the plan is for.
        call_kwargs: What each probe call passes besides the steps, generator and output type: the probes'
            conditioning, e.g. `{"class_labels": [0, 1, ..., 9], "guidance_scale": 2.0}` (its batch is the probes).
        num_inference_steps: The step count the plan is for.
        tolerance: Largest final-image error allowed (RMS, pixel values in [0, 1]; 0 gives the full model).
        target_compute: Share of the full block compute to spend, in (0, 1].
        seed: Seed of the probes' noise (the same in every run).
        progress: Show a progress bar over the runs.
    """
    if (tolerance is None) == (target_compute is None):
        raise ValueError("Give exactly one budget: `tolerance` or `target_compute`.")
    if tolerance is not None:
        tolerance = as_number("tolerance", tolerance, low=0)
    if target_compute is not None and not 0 < as_number("target_compute", target_compute) <= 1:
        raise ValueError(f"`target_compute` must lie in (0, 1], got {target_compute!r}.")
    num_inference_steps = as_int("num_inference_steps", num_inference_steps, low=2)
    if not isinstance(call_kwargs, dict):
        raise TypeError(f"`call_kwargs` must be a dict of call arguments, got {type(call_kwargs).__name__}.")
    from ..exits import num_exit_blocks

    denoiser = _denoiser(pipe)
    num_blocks = num_exit_blocks(denoiser)
    num_train_timesteps = int(pipe.scheduler.config.num_train_timesteps)
    device = denoiser.device

    def sample() -> np.ndarray:
        generator = torch.Generator(device).manual_seed(seed)
        images = pipe(**call_kwargs, num_inference_steps=num_inference_steps, generator=generator,
                      output_type="np").images  # fmt: skip
        return np.asarray(images, dtype=np.float64)

    def plan_of(actions: tuple[int, ...]) -> ExitSchedule:
        return ExitSchedule.plan(num_blocks, timesteps, actions, num_train_timesteps=num_train_timesteps)

    def compute(actions: tuple[int, ...]) -> float:
        return sum(actions) / (len(actions) * num_blocks)

    with _planned(pipe) as use:
        recorded: list[float] = []
        handle = denoiser.register_forward_pre_hook(
            lambda module, args, kwargs: recorded.append(_timestep(args, kwargs)), with_kwargs=True
        )
        use(None)
        try:
            reference = sample()
        finally:
            handle.remove()
        timesteps = _one_per_step(recorded, num_inference_steps)
        full = (num_blocks,) * num_inference_steps
        options = [[*range(num_blocks - 1, 0, -1), *([REUSE] if i else [])] for i in range(num_inference_steps)]
        bar = tqdm(total=sum(map(len, options)), desc="calibrating: sensitivity", disable=not progress)
        measured: dict[tuple[int, ...], float] = {full: 0.0}

        def error(actions: tuple[int, ...]) -> float:
            if actions not in measured:
                use(plan_of(actions))
                measured[actions] = float(np.sqrt(np.mean((sample() - reference) ** 2)))
                bar.update()
            return measured[actions]

        sensitivity = tuple(
            {action: error(full[:i] + (action,) + full[i + 1 :]) for action in options[i]}
            for i in range(num_inference_steps)
        )
        for i in range(num_inference_steps):
            sensitivity[i][num_blocks] = 0.0
        chain = _chain(full, sensitivity)
        bar.reset(total=len(chain))
        bar.set_description("calibrating: chain")
        points = [PlanPoint(actions, compute(actions), error(actions)) for actions in chain]
        if tolerance is not None:
            chosen = min((p for p in points if p.error <= tolerance), key=lambda p: (p.compute_fraction, p.error))
        else:
            under = [p for p in points if p.compute_fraction <= target_compute + 1e-12]
            if not under:
                raise ValueError(f"`target_compute={target_compute}` is below the cheapest plan's "
                                 f"{points[-1].compute_fraction:.3f} for {num_inference_steps} steps.")  # fmt: skip
            best = min(under, key=lambda p: (p.error, -p.compute_fraction))
            filled = _fill(best.actions, sensitivity, num_blocks, target_compute)
            chosen = best if filled == best.actions else PlanPoint(filled, compute(filled), error(filled))
        bar.close()
    return Calibration(plan=plan_of(chosen.actions), compute_fraction=chosen.compute_fraction, error=chosen.error,
                       timesteps=tuple(timesteps), sensitivity=sensitivity, chain=tuple(points))  # fmt: skip


def _timestep(args: tuple, kwargs: dict) -> float:
    timestep = kwargs["timestep"] if "timestep" in kwargs else args[1]
    return float(torch.as_tensor(timestep).reshape(-1)[0])


def _one_per_step(recorded: list[float], steps: int) -> list[float]:
    """The denoiser's timesteps, one per sampling step (a pipeline calls it once per step)."""
    if len(recorded) != steps or len(set(recorded)) != steps:
        raise ValueError(f"A plan needs one denoiser call per step at distinct timesteps; this pipeline made "
                         f"{len(recorded)} calls for {steps} steps at {recorded}.")  # fmt: skip
    return recorded


def _chain(full: tuple[int, ...], sensitivity: tuple[dict[int, float], ...]) -> list[tuple[int, ...]]:
    """Plans from `full` to the cheapest, each one move from the last: the step whose next cheaper action (one block
    less, or `REUSE`) adds the least predicted squared error per block saved."""
    actions, chain = list(full), [tuple(full)]
    predicted = [0.0] * len(full)  # squared error of each step's current action

    def moves(i: int) -> list[int]:
        current = actions[i]
        cheaper = [current - 1] if current > 1 else []
        if current != REUSE and REUSE in sensitivity[i]:
            cheaper.append(REUSE)
        return cheaper

    while True:
        best = None
        for i in range(len(actions)):
            for action in moves(i):
                cost = (sensitivity[i][action] ** 2 - predicted[i]) / (actions[i] - action)
                if best is None or cost < best[0]:
                    best = (cost, i, action)
        if best is None:
            return chain
        _, i, action = best
        actions[i], predicted[i] = action, sensitivity[i][action] ** 2
        chain.append(tuple(actions))


def _fill(actions: tuple[int, ...], sensitivity: tuple[dict[int, float], ...], num_blocks: int,
          target: float) -> tuple[int, ...]:  # fmt: skip
    """`actions` with blocks added back, one at a time where the sensitivities say a block removes the most error,
    while the plan stays at or under `target` of the full compute."""
    actions = list(actions)
    budget = math.floor(target * len(actions) * num_blocks + 1e-9) - sum(actions)
    while budget > 0:
        gains = [
            (sensitivity[i][actions[i]] ** 2 - sensitivity[i][actions[i] + 1] ** 2, i)
            for i in range(len(actions))
            if actions[i] < num_blocks
        ]
        if not gains:
            break
        _, i = max(gains)
        actions[i] += 1
        budget -= 1
    return tuple(actions)
