"""Calibrate a plan: the cheapest per-step depths and reuse steps within an error budget on the final samples.

From a few of the pipeline's own sampling runs (probes: its own noise and conditioning, no training data):

1. the pipeline as it is, under its own exit schedule if it has one (an ASE fine-tuned model is trained for it) and at
   full depth otherwise, makes the reference final images, and the denoiser's timesteps give the plan its steps; that
   schedule's depths at those steps are the starting plan (the *base*), and plans only ever cut below it;
2. sensitivity: for each step and each cheaper action there (every depth below the base's, and `REUSE`), one run with
   only that step changed gives the error it alone puts on the final images, through the solver's later steps;
3. a chain of plans from the base to the cheapest: each link changes one step, by the move that costs the least
   predicted error (errors of separate steps summed in squares) per block saved, one block at a time or straight to
   `REUSE`;
4. every plan on the chain is run and its real final-image error measured; the budget then picks one: the cheapest
   with a measured error within `tolerance`, or, for `target_compute`, the most accurate at or under the target,
   then filled back up to the target block by block where the sensitivities say blocks help most (and measured).

The error of a plan is the root-mean-square difference of its final images from the reference's, from the same noise
and conditioning, in pixel values in [0, 1] (`output_type="np"`). What a plan fixes ahead of time is everything: the
depth or reuse of each step; nothing is decided while sampling.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from .exits import denoiser_of, exit_schedule_in_force, num_exit_blocks, own_exit_schedule
from .outputs import staged_folder
from .schedules import REUSE, ExitSchedule
from .validation import as_int, as_number

CALIBRATION_FILE = "calibration.json"


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
        error: Its measured final-image error (RMS against the reference, pixel values in [0, 1]) on the probes.
        timesteps: The denoiser's timestep at each step, in sampling order.
        sensitivity: `sensitivity[i][a]`: the final-image error of the base with step `i` at action `a` alone.
        chain: Every plan measured, from the base to the cheapest.
        base: The reference's action at each step: the pipeline's own schedule's depths (all blocks without one).
    """

    plan: ExitSchedule
    compute_fraction: float
    error: float
    timesteps: tuple[float, ...]
    sensitivity: tuple[dict[int, float], ...]
    chain: tuple[PlanPoint, ...]
    base: tuple[int, ...]

    def save_pretrained(self, folder: str | os.PathLike, settings: dict[str, Any] | None = None) -> None:
        """Write the plan (`exit_schedule.json`) and the record of the calibration (`calibration.json`: `settings`,
        such as the command, model and guidance, then every plan measured) to `folder`, written whole and then put
        in place (`ee_diffusion.outputs.staged_folder`)."""
        report = {
            **(settings or {}),
            "compute_fraction": self.compute_fraction,
            "error": self.error,
            "timesteps": list(self.timesteps),
            "base": list(self.base),
            "chain": [
                {"actions": list(p.actions), "compute_fraction": p.compute_fraction, "error": p.error}
                for p in self.chain
            ],
            "sensitivity": [{str(action): error for action, error in step.items()} for step in self.sensitivity],
        }
        with staged_folder(folder) as staged:
            self.plan.save_pretrained(staged)
            (staged / CALIBRATION_FILE).write_text(json.dumps(report, indent=2))


class PlanCalibrator:
    """The measurements behind calibrated plans for one pipeline, scheduler, step count and set of probes: made once
    (on first use), then any number of budgets pick from them (`for_tolerance`, `for_target_compute`).

    Args:
        pipe: A pipeline whose denoiser the exit hooks support (a drop-in one, or a stock diffusers one), with the
            scheduler the plan is for. Its own exit schedule, if it has one, is the reference and the base the plans
            cut from (`base`); a fine-tuned model's schedule is what it was trained to sample with.
        call_kwargs: What each probe call passes besides the steps, generator and output type: the probes'
            conditioning, e.g. `{"class_labels": [0, 1, ..., 9], "guidance_scale": 2.0}` (its batch is the probes).
        num_inference_steps: The step count the plans are for.
        seed: Seed of the probes' noise (the same in every run).
        progress: Show a progress bar over the runs.
    """

    def __init__(
        self, pipe: Any, call_kwargs: dict[str, Any], num_inference_steps: int, seed: int = 0, progress: bool = True
    ) -> None:
        if not isinstance(call_kwargs, dict):
            raise TypeError(f"`call_kwargs` must be a dict of call arguments, got {type(call_kwargs).__name__}.")
        self.pipe, self.call_kwargs, self.seed, self.progress = pipe, call_kwargs, seed, progress
        self.num_inference_steps = as_int("num_inference_steps", num_inference_steps, low=2)
        self.num_blocks = num_exit_blocks(pipe)  # a clear error for a pipeline without a supported denoiser
        self.denoiser = denoiser_of(pipe)
        self.num_train_timesteps = int(pipe.scheduler.config.num_train_timesteps)
        self.scheduler_class = type(pipe.scheduler).__name__
        self.reference_schedule = own_exit_schedule(pipe)
        self.timesteps: tuple[float, ...] = ()  # the denoiser's timestep at each step (known after the reference)
        self.base: tuple[int, ...] = ()  # the reference's action at each step (known after the reference)
        self.sensitivity: tuple[dict[int, float], ...] = ()
        self._measured: dict[tuple[int, ...], float] = {}
        self._chain: tuple[PlanPoint, ...] | None = None

    def for_tolerance(self, tolerance: float) -> Calibration:
        """The cheapest plan of the chain whose measured error is at most `tolerance` (0: the base)."""
        tolerance = as_number("tolerance", tolerance, low=0)
        chain = self.chain
        chosen = min((p for p in chain if p.error <= tolerance), key=lambda p: (p.compute_fraction, p.error))
        return self._result(chosen)

    def for_target_compute(self, target_compute: float) -> Calibration:
        """The most accurate plan of the chain at or under `target_compute`, filled back up to it block by block."""
        if not 0 < as_number("target_compute", target_compute) <= 1:
            raise ValueError(f"`target_compute` must lie in (0, 1], got {target_compute!r}.")
        chain = self.chain
        under = [p for p in chain if p.compute_fraction <= target_compute + 1e-12]
        if not under:
            raise ValueError(
                f"`target_compute={target_compute}` is below the cheapest plan's "
                f"{chain[-1].compute_fraction:.3f} for {self.num_inference_steps} steps."
            )
        best = min(under, key=lambda p: (p.error, -p.compute_fraction))
        filled = _fill(best.actions, self.sensitivity, self.num_blocks, target_compute)
        if filled != best.actions:
            with self._session() as (measure, _):
                best = PlanPoint(filled, self._compute(filled), measure(filled))
        return self._result(best)

    @property
    def chain(self) -> tuple[PlanPoint, ...]:
        """Every plan measured, from the base to the cheapest (made on first use)."""
        if self._chain is None:
            self._calibrate()
        return self._chain

    # ------------------------------------------------------------------ measurement
    def _calibrate(self) -> None:
        with self._session(desc="calibrating: reference") as (measure, bar):
            base, steps = self.base, self.num_inference_steps
            options = [
                [*range(base[i] - 1, 0, -1), *([REUSE] if i and base[i] != REUSE else [])] for i in range(steps)
            ]
            bar.reset(total=sum(map(len, options)))
            bar.set_description("calibrating: sensitivity")
            sensitivity = tuple(
                {action: measure(base[:i] + (action,) + base[i + 1 :]) for action in options[i]} for i in range(steps)
            )
            for i, step in enumerate(sensitivity):
                step[base[i]] = 0.0
            self.sensitivity = sensitivity
            chain = _chain(base, sensitivity)
            bar.reset(total=len(chain))
            bar.set_description("calibrating: chain")
            self._chain = tuple(PlanPoint(actions, self._compute(actions), measure(actions)) for actions in chain)

    @contextlib.contextmanager
    def _session(self, total: int = 1, desc: str = "calibrating") -> Iterator[Any]:
        """Inside: `measure(actions)`, the final-image error of a plan (each plan run once), and the progress bar."""
        pipe = self.pipe

        def sample() -> np.ndarray:
            generator = torch.Generator(self.denoiser.device).manual_seed(self.seed)
            images = pipe(
                **self.call_kwargs, num_inference_steps=self.num_inference_steps, generator=generator, output_type="np"
            ).images
            return np.asarray(images, dtype=np.float64)

        with exit_schedule_in_force(pipe, None) as use, tqdm(total=total, desc=desc, disable=not self.progress) as bar:
            if not self._measured:  # the reference: the full model, whose calls give the plan its steps
                recorded: list[float] = []
                handle = self.denoiser.register_forward_pre_hook(
                    lambda module, args, kwargs: recorded.append(_timestep(args, kwargs)), with_kwargs=True
                )
                use(self.reference_schedule)
                try:
                    self._reference = sample()
                finally:
                    handle.remove()
                self.timesteps = tuple(_one_per_step(recorded, self.num_inference_steps))
                self.base = (
                    tuple(self.reference_schedule.depths_for(self.timesteps, self.num_train_timesteps))
                    if self.reference_schedule is not None
                    else (self.num_blocks,) * self.num_inference_steps
                )
                self._measured[self.base] = 0.0

            def measure(actions: tuple[int, ...]) -> float:
                if actions not in self._measured:
                    use(self.plan_of(actions))
                    self._measured[actions] = float(np.sqrt(np.mean((sample() - self._reference) ** 2)))
                    bar.update()
                return self._measured[actions]

            yield measure, bar

    def plan_of(self, actions: tuple[int, ...]) -> ExitSchedule:
        """The plan that takes `actions[i]` at step `i`."""
        return ExitSchedule.plan(
            self.num_blocks,
            self.timesteps,
            actions,
            num_train_timesteps=self.num_train_timesteps,
            scheduler_class=self.scheduler_class,
        )

    def _compute(self, actions: tuple[int, ...]) -> float:
        return sum(actions) / (len(actions) * self.num_blocks)

    def _result(self, point: PlanPoint) -> Calibration:
        return Calibration(
            plan=self.plan_of(point.actions),
            compute_fraction=point.compute_fraction,
            error=point.error,
            timesteps=self.timesteps,
            sensitivity=self.sensitivity,
            chain=self.chain,
            base=self.base,
        )


def calibrate_plan(
    pipe: Any,
    call_kwargs: dict[str, Any],
    num_inference_steps: int,
    tolerance: float | None = None,
    target_compute: float | None = None,
    seed: int = 0,
    progress: bool = True,
) -> Calibration:
    """The cheapest plan within `tolerance`, or the most accurate at `target_compute` (give exactly one); see
    `PlanCalibrator` for the arguments, and to pick plans for several budgets from one set of measurements.

    Args:
        tolerance: Largest final-image error allowed (RMS, pixel values in [0, 1]; 0 gives the full model).
        target_compute: Share of the full block compute to spend, in (0, 1].
    """
    if (tolerance is None) == (target_compute is None):
        raise ValueError("Give exactly one budget: `tolerance` or `target_compute`.")
    if tolerance is not None:
        as_number("tolerance", tolerance, low=0)
    elif not 0 < as_number("target_compute", target_compute) <= 1:
        raise ValueError(f"`target_compute` must lie in (0, 1], got {target_compute!r}.")
    calibrator = PlanCalibrator(pipe, call_kwargs, num_inference_steps, seed=seed, progress=progress)
    if tolerance is not None:
        return calibrator.for_tolerance(tolerance)
    return calibrator.for_target_compute(target_compute)


def _timestep(args: tuple, kwargs: dict) -> float:
    timestep = kwargs["timestep"] if "timestep" in kwargs else args[1]
    return float(torch.as_tensor(timestep).reshape(-1)[0])


def _one_per_step(recorded: list[float], steps: int) -> list[float]:
    """The denoiser's timesteps, one per sampling step (a pipeline calls it once per step)."""
    if len(recorded) != steps or len(set(recorded)) != steps:
        raise ValueError(
            f"A plan needs one denoiser call per step at distinct timesteps; this pipeline made "
            f"{len(recorded)} calls for {steps} steps at {recorded}."
        )
    return recorded


def _chain(base: tuple[int, ...], sensitivity: tuple[dict[int, float], ...]) -> list[tuple[int, ...]]:
    """Plans from `base` to the cheapest, each one move from the last: the step whose next cheaper action (one block
    less, or `REUSE`) adds the least predicted squared error per block saved."""
    actions, chain = list(base), [tuple(base)]
    predicted = [0.0] * len(base)  # squared error of each step's current action

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


def _fill(
    actions: tuple[int, ...], sensitivity: tuple[dict[int, float], ...], num_blocks: int, target: float
) -> tuple[int, ...]:
    """`actions` with blocks added back while the plan stays at or under `target` of the full compute: each time the
    step change (to any dearer action that fits, up to the base's) that the sensitivities say removes the most error
    per block, and only changes that remove some (a reuse step is not made a shallow one)."""
    actions = list(actions)
    budget = math.floor(target * len(actions) * num_blocks + 1e-9) - sum(actions)
    while True:
        moves = [
            ((sensitivity[i][actions[i]] ** 2 - sensitivity[i][action] ** 2) / (action - actions[i]), i, action)
            for i in range(len(actions))
            for action in sensitivity[i]
            if actions[i] < action <= actions[i] + budget and sensitivity[i][action] < sensitivity[i][actions[i]]
        ]
        if not moves:
            return tuple(actions)
        _, i, action = max(moves)
        budget -= action - actions[i]
        actions[i] = action
