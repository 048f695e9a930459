"""Calibrate a plan: the cheapest per-step actions (depths, reuse, cached tails, dropped steps) within an error budget
on the final samples.

From a few of the pipeline's own sampling runs (probes: its own noise and conditioning, no training data):

1. the pipeline as it is, under its own exit schedule if it has one (an ASE fine-tuned model is trained for it) and at
   full depth otherwise, at the *reference* step count, makes the reference final images; at the plan's step count
   (the same, unless asked otherwise), the denoiser's timesteps give the plan its steps, and that schedule's depths at
   those steps are the starting plan (the *base*): plans only ever cut below it;
2. sensitivity: for each step and each cheaper action there (one block below the base's depth, then a ladder of its
   quarters down to one block; after the first step also
   `REUSE`, the cached tails after the first block or two, and `DROP` where the scheduler can step over a timestep),
   one run with only that step changed gives the error it alone puts on the final images, through the solver's later
   steps;
3. a chain of plans from the base down, each link one move from the last (one step to its next shallower depth, or to a
   cheaper cached tail, or straight to `REUSE` or `DROP`), every plan measured whole: at each link the few moves the
   sensitivities rank best are run as whole plans, and the one whose *measured* error grows least per block saved is
   taken, so the compounding of consecutive choices (two reuse steps in a row, say) is measured, not predicted by
   adding per-step errors. The chain is made as far down as the budgets asked need;
4. the budget picks a plan: the cheapest with a measured error within `tolerance`, or, for `target_compute`, the most
   accurate at or under the target, then filled back up to the target block by block where the sensitivities say
   blocks help most (and measured). Beside the chain, fewer steps inside the run are tried as plans too (the other
   steps dropped, the kept ones where a run of that many steps would put them): for a target, the most that fit and
   the next two counts, cut down to it by a chain of their own, so the plan can spend on more steps what cheaper
   actions save;
5. with `trades`, for a target, the plan then trades: two steps swap their actions (a reuse moved to where it costs
   less), each trade measured whole, while one lowers the error (`_traded`).

`calibrate_plan` then holds the plan against the plain alternative it could be: the same model at fewer steps with the
same compute, run from the same noise and measured against the same reference (`Calibration.fewer_steps`). Where the
fewer steps are better, they are what it returns (the model as it is, at that step count, as a plan), with the plan
they beat in `Calibration.lost`, so it never returns a plan worse than the fewer-steps run it measured. Without a step
count (`num_inference_steps=None`) it calibrates at several step counts against one reference step count, fewer steps
at full depth among them, and returns the best at the budget.

The error of a plan is the root-mean-square difference of its final images from the reference's, from the same noise
and conditioning, in pixel values in [0, 1] (`output_type="np"`); or, given a feature network (`features`), the square
root of the Fréchet distance between the features of its probes' final images and the reference's, which ranks plans
as FID does where the pixel error does not (it holds each image to its own reference; FID scores the set). Compute is
the share of the reference's block compute (the full model, or its own schedule, at the reference step count) a plan
spends. What a plan fixes ahead of time is everything: the depth or reuse of each step; nothing is decided while
sampling.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from .exits import (
    denoiser_of,
    denoisers_of,
    exit_schedule_in_force,
    get_exit_architecture,
    num_exit_blocks,
    own_exit_schedule,
    scheduler_timesteps,
)
from .exits.scheduler_steps import check_scheduler_steps_over
from .metrics.fid import frechet_distance
from .outputs import OutputKind, check_output_folder, staged_folder
from .schedules import DROP, REUSE, ExitSchedule, action_blocks, cached_tail
from .validation import as_flag, as_int, as_number

CALIBRATION_FILE = "calibration.json"
# What a calibration's folder holds (`Calibration.save_pretrained`, `ee-diffusion calibrate --out`).
CALIBRATION_OUTPUT = OutputKind("ee-diffusion calibrate", ("exit_schedule.json", CALIBRATION_FILE))
# The cached tails the calibrator tries: after the first block or two (DBCache's usual `Fn`).
TAIL_BLOCKS = (1, 2)
# The cheaper actions a step may take by default, besides shallower depths. Cached tails are left out: they lower the
# probes' pixel error more than the samples' quality (on `digits-dit` at 10 steps, a plan of tails at 64% of the
# compute scored FID 9.59 on 2,000 samples, one of reuse steps at 60% 8.81, with the lower pixel error the tails').
DEFAULT_ACTIONS = ("reuse", "drop")
ACTIONS = ("reuse", "tail", "drop")
# The fewest probes a Fréchet error takes (`PlanCalibrator`'s `features`): their features' covariance is in it.
MIN_FRECHET_PROBES = 50


@dataclass(frozen=True)
class PlanPoint:
    """One plan of the calibration chain: its per-step actions, share of full block compute, and measured error."""

    actions: tuple[int | str, ...]
    compute_fraction: float
    error: float


@dataclass(frozen=True)
class FewerSteps:
    """The plain alternative of a plan: the model as it is (at full depth, or under its own schedule) at `steps`
    steps, its share of the reference's block compute, and its measured error against the same reference."""

    steps: int
    compute_fraction: float
    error: float


@dataclass(frozen=True)
class Calibration:
    """What `calibrate_plan` found.

    Args:
        plan: The plan the budget picked.
        compute_fraction: Its share of the reference's block compute (reuse steps count 0).
        error: Its measured final-image error against the reference on the probes (RMS, pixel values in [0, 1]; with
            a feature network, the square root of the Fréchet distance of their features: `PlanCalibrator`).
        timesteps: The denoiser's timestep at each step, in sampling order.
        sensitivity: `sensitivity[i][a]`: the final-image error of the base with step `i` at action `a` alone.
        chain: Every plan measured, from the base to the cheapest.
        base: The reference's action at each step: the pipeline's own schedule's depths (all blocks without one).
        reference_steps: The step count of the reference images (the plan's own, unless asked otherwise).
        fewer_steps: The fewer-steps baseline at the plan's compute (`None` where none was measured), so a user sees
            whether the plan beats it; `beats_fewer_steps` says whether it does.
        lost: Where the fewer-steps baseline beat every plan at the asked step count and is returned instead (as a
            plan of its own step count, at full depth or the model's own schedule), the best of those plans.
        left_out: The actions asked for that the pipeline cannot take, each with why (`("drop", "DDIMScheduler
            cannot step over a dropped step")`): the search went on without them.
    """

    plan: ExitSchedule
    compute_fraction: float
    error: float
    timesteps: tuple[float, ...]
    sensitivity: tuple[dict[int, float], ...]
    chain: tuple[PlanPoint, ...]
    base: tuple[int, ...]
    reference_steps: int | None = None
    fewer_steps: FewerSteps | None = None
    lost: PlanPoint | None = None
    left_out: tuple[tuple[str, str], ...] = ()

    @property
    def steps(self) -> int:
        """The plan's step count."""
        return len(self.timesteps)

    @property
    def beats_fewer_steps(self) -> bool | None:
        """Whether the plan's error is at most the fewer-steps baseline's (`None` where none was measured)."""
        return None if self.fewer_steps is None else self.error <= self.fewer_steps.error

    def save_pretrained(self, folder: str | os.PathLike, settings: dict[str, Any] | None = None) -> None:
        """Write the plan (`exit_schedule.json`) and the record of the calibration (`calibration.json`: `settings`,
        such as the command, model and guidance, then every plan measured) to `folder`, written whole and then put
        in place (`ee_diffusion.outputs.staged_folder`). A folder that holds other files than an earlier calibration's
        is refused (a `ValueError`), as it would be replaced."""
        check_output_folder(folder, CALIBRATION_OUTPUT, overwrite=True)
        report = {
            **(settings or {}),
            "steps": self.steps,
            "reference_steps": self.reference_steps,
            "compute_fraction": self.compute_fraction,
            "error": self.error,
            "fewer_steps": None if self.fewer_steps is None else dataclasses.asdict(self.fewer_steps),
            "lost": None if self.lost is None else dataclasses.asdict(self.lost),
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
            conditioning, e.g. `{"class_labels": [0, 1, ..., 9], "guidance_scale": 2.0}` or, for a text-to-image
            pipeline, `{"prompt": ["a cat", "a dog"], "height": 512, "width": 512}` (its batch is the probes;
            `ee_diffusion.bench.harness.probe_kwargs` makes them for any pipeline the bench drives).
        num_inference_steps: The step count the plans are for.
        seed: Seed of the probes' noise (the same in every run).
        progress: Show a progress bar over the runs.
        reference_steps: The step count of the reference images (default: `num_inference_steps`); compute is a share
            of the reference's.
        candidates: How many of the best-ranked moves each link of the chain measures as whole plans (1: the
            sensitivities alone choose, more: the measured compounding does).
        actions: Which cheaper actions a step may take besides shallower depths: any of `"reuse"`, `"tail"` (the
            cached tails of `TAIL_BLOCKS`), `"drop"` (where the scheduler can step over a timestep); default
            `DEFAULT_ACTIONS`, reuse and drop.
        features: How errors are measured. `None` (default): the RMS difference of each probe's final image from the
            reference's, in pixel values in [0, 1]. A feature network (`ee_diffusion.metrics.FeatureExtractor`): the
            square root of the Fréchet distance (FID's) between the features of all the probes' final images and
            the reference's: a distance between the two sets, as FID measures quality, where the pixel error holds
            each image to its own reference. It needs at least `MIN_FRECHET_PROBES` probes, better a hundred or more.
        trades: For a target, let the best plan trade actions between two steps while a trade lowers the measured
            error (`_traded`; off by default, so that earlier calibrations come out as they were).
    """

    def __init__(
        self,
        pipe: Any,
        call_kwargs: dict[str, Any],
        num_inference_steps: int,
        seed: int = 0,
        progress: bool = True,
        reference_steps: int | None = None,
        candidates: int = 3,
        actions: tuple[str, ...] = DEFAULT_ACTIONS,
        features: Any | None = None,
        trades: bool = False,
    ) -> None:
        if not isinstance(call_kwargs, dict):
            raise TypeError(f"`call_kwargs` must be a dict of call arguments, got {type(call_kwargs).__name__}.")
        self.pipe, self.call_kwargs = pipe, call_kwargs
        self.seed, self.progress = as_int("seed", seed), as_flag("progress", progress)
        self.num_inference_steps = as_int("num_inference_steps", num_inference_steps, low=2)
        self.reference_steps = (
            self.num_inference_steps if reference_steps is None else as_int("reference_steps", reference_steps, low=2)
        )
        self.candidates = as_int("candidates", candidates, low=1)
        if isinstance(actions, str) or not set(actions) <= set(ACTIONS):
            raise ValueError(f"`actions` must be a tuple of {', '.join(map(repr, ACTIONS))}, got {actions!r}.")
        self.actions = tuple(actions)
        if features is not None and not callable(getattr(features, "features", None)):
            raise TypeError(
                "`features` must be a feature network with a `features(images)` method "
                f"(ee_diffusion.metrics.FeatureExtractor), got {type(features).__name__}."
            )
        self.features = features
        self.trades = as_flag("trades", trades)
        self._reference_features: torch.Tensor | None = None
        try:
            self.num_blocks = num_exit_blocks(pipe)
        except TypeError as error:  # no denoiser the exit hooks know
            raise TypeError(
                f"Cannot calibrate a plan for {type(pipe).__name__}: {error} Calibration drives the early-exit "
                "pipelines (ee_diffusion.load_early_exit_pipeline opens a supported folder as one) and stock "
                "diffusers pipelines with one of those denoisers."
            ) from None
        for name in ("num_inference_steps", "generator", "output_type"):
            if name in call_kwargs:
                raise ValueError(
                    f"`call_kwargs` must leave out {name!r}, which every probe call sets; got {sorted(call_kwargs)}."
                )
        self.denoiser = denoiser_of(pipe)
        self.num_train_timesteps = int(pipe.scheduler.config.num_train_timesteps)
        self.scheduler_class = type(pipe.scheduler).__name__
        self.left_out: dict[str, str] = {}  # the actions asked for that this pipeline cannot take, and why
        if "tail" in self.actions and any(
            get_exit_architecture(denoiser).reuse != "residual" for denoiser in denoisers_of(pipe)
        ):
            self.left_out["tail"] = f"{type(self.denoiser).__name__} reuses whole steps only, no cached tails"
        if "drop" in self.actions:
            try:
                check_scheduler_steps_over(pipe.scheduler)
            except ValueError:  # DDIM and the like: no dropped steps
                self.left_out["drop"] = f"{self.scheduler_class} cannot step over a dropped step"
        self.actions = tuple(action for action in self.actions if action not in self.left_out)
        self.reference_schedule = own_exit_schedule(pipe)
        self.timesteps: tuple[float, ...] = ()  # the denoiser's timestep at each step (known after the reference)
        self.base: tuple[int, ...] = ()  # the reference's action at each step (known after the reference)
        self.sensitivity: tuple[dict[int, float], ...] = ()
        self._measured: dict[tuple[int, ...], float] = {}
        self._chain: tuple[PlanPoint, ...] | None = None
        self._chain_ended = False
        self._reference: np.ndarray | None = None
        self._fewer: dict[int, FewerSteps] = {}

    def for_tolerance(self, tolerance: float) -> Calibration:
        """The cheapest plan of the chain whose measured error is at most `tolerance` (0: the base)."""
        tolerance = as_number("tolerance", tolerance, low=0)
        chain = self.chain
        within = [p for p in chain if p.error <= tolerance]
        if not within:
            raise ValueError(
                f"No plan at {self.num_inference_steps} steps is within `tolerance={tolerance}`: the model as it is "
                f"at those steps already has error {chain[0].error:.4f} against the {self.reference_steps}-step "
                "reference."
            )
        with self._session() as (measure, _):  # fewer steps inside this run's timesteps, at each count
            within += [
                point
                for kept in (range(1, self.num_inference_steps) if "drop" in self.actions else ())
                if (point := self._point(self._kept_evenly(kept), measure)).error <= tolerance
            ]
        return self._result(min(within, key=lambda p: (p.compute_fraction, p.error)))

    def for_target_compute(self, target_compute: float) -> Calibration:
        """The most accurate plan of the chain at or under `target_compute`, filled back up to it block by block."""
        if not 0 < as_number("target_compute", target_compute) <= 1:
            raise ValueError(f"`target_compute` must lie in (0, 1], got {target_compute!r}.")
        budget = math.floor(target_compute * self.reference_steps * self.num_blocks + 1e-9)
        chain = self._chain_down_to(budget)
        under = [p for p in chain if p.compute_fraction <= target_compute + 1e-12]
        if not under:
            raise ValueError(
                f"`target_compute={target_compute}` is below the cheapest plan's "
                f"{chain[-1].compute_fraction:.3f} for {self.num_inference_steps} steps."
            )
        target = target_compute * self.reference_steps / self.num_inference_steps  # a share of this run's blocks
        with self._session() as (measure, _):
            best = min(under, key=lambda p: (p.error, -p.compute_fraction))
            found = [self._point(_fill(best.actions, self.sensitivity, self.num_blocks, target), measure)]
            for start in self._seeds(budget):  # fewer steps inside this run, cut down to the budget, filled up to it
                if _blocks(start) > budget:
                    start = _measured_chain(start, self.sensitivity, measure, self.candidates, budget)[-1]
                found.append(self._point(_fill(start, self.sensitivity, self.num_blocks, target), measure))
            best = min(found, key=lambda p: (p.error, -p.compute_fraction))
            if self.trades:
                best = self._point(_traded(best.actions, measure), measure)
        return self._result(best)

    def _kept_evenly(self, kept: int) -> tuple[int | str, ...]:
        """The base with all but `kept` of its steps dropped, the kept ones where a `kept`-step run of the scheduler
        would put its steps on this run's (the first always): fewer steps, inside this run's timesteps."""
        steps = self.num_inference_steps
        keep = {math.floor(i * steps / kept + 1e-9) for i in range(kept)}
        return tuple(action if i in keep else DROP for i, action in enumerate(self.base))

    def _seeds(self, budget: int) -> list[tuple[int | str, ...]]:
        """Plans that keep fewer steps, evenly (`_kept_evenly`): the most that fit `budget` blocks and the next two
        counts, which a chain then cuts down to it -- spending on more steps what cheaper actions save. None where
        the scheduler cannot step over a timestep."""
        if "drop" not in self.actions:
            return []
        counts = range(1, self.num_inference_steps + 1)
        fit = max((kept for kept in counts if _blocks(self._kept_evenly(kept)) <= budget), default=0)
        return [self._kept_evenly(kept) for kept in (fit, fit + 1, fit + 2) if 1 <= kept < self.num_inference_steps]

    def _point(self, actions: tuple[int | str, ...], measure: Callable[[tuple[int | str, ...]], float]) -> PlanPoint:
        return PlanPoint(actions, self._compute(actions), measure(actions))

    @property
    def chain(self) -> tuple[PlanPoint, ...]:
        """Every plan measured, from the base to the cheapest (made on first use)."""
        return self._chain_down_to(-1)

    # ------------------------------------------------------------------ measurement
    def _chain_down_to(self, blocks: int) -> tuple[PlanPoint, ...]:
        """The chain, made (on first use: after the reference and the sensitivities) at least as far down as a plan
        of `blocks` blocks, or to its end."""
        if self._chain is None:
            self._sensitivities()
        last = self._chain[-1].actions
        if not self._chain_ended and _blocks(last) > blocks:
            with self._session(desc="calibrating: chain") as (measure, bar):
                bar.reset(total=(_blocks(last) - max(blocks, 0)) * self.candidates)  # runs, at most
                links = _measured_chain(last, self.sensitivity, measure, self.candidates, blocks)
                self._chain += tuple(self._point(actions, measure) for actions in links[1:])
            self._chain_ended = _blocks(self._chain[-1].actions) > blocks  # no cheaper move was left
        return self._chain

    def _sensitivities(self) -> None:
        with self._session(desc="calibrating: reference") as (measure, bar):
            base, steps = self.base, self.num_inference_steps
            options = [self._cheaper(i, base[i]) for i in range(steps)]
            bar.reset(total=sum(map(len, options)))
            bar.set_description("calibrating: sensitivity")
            base_error = measure(base)
            sensitivity = tuple(
                {action: measure(base[:i] + (action,) + base[i + 1 :]) for action in options[i]} for i in range(steps)
            )
            for i, step in enumerate(sensitivity):
                step[base[i]] = base_error
            self.sensitivity = sensitivity
            self._chain, self._chain_ended = (self._point(base, measure),), False

    def _cheaper(self, step: int, action: int | str) -> list[int | str]:
        """The actions cheaper than `action` that step `step` may take: shallower depths (one block less, then a
        ladder of quarters of the depth down to one block: the runs grow with the model's depth no faster than
        that), and after the first step the cached tails, `REUSE` and `DROP` (as `actions` allows)."""
        blocks = action_blocks(action)
        cheaper: list[int | str] = []
        if action != DROP and action > 1:
            ladder = {blocks - 1, 1, *(math.ceil(blocks * quarter / 4) for quarter in (1, 2, 3))}
            cheaper = sorted((depth for depth in ladder if depth < blocks), reverse=True)
        if step and blocks:
            if "tail" in self.actions:
                cheaper += [cached_tail(k) for k in TAIL_BLOCKS if k < min(blocks, self.num_blocks)]
            if "reuse" in self.actions:
                cheaper.append(REUSE)
        if step and action != DROP and "drop" in self.actions:
            cheaper.append(DROP)
        return cheaper

    def as_it_is(self) -> Calibration:
        """The model as it is at the plan's step count (the base: full depth, or its own schedule), measured."""
        with self._session():
            pass
        base = PlanPoint(self.base, self._compute(self.base), self._measured[self.base])
        return self._result(base)

    def fewer_steps(self, steps: int) -> FewerSteps:
        """The model as it is (at full depth, or under its own schedule) at `steps` steps, measured against the
        reference from the same noise."""
        steps = as_int("steps", steps, low=1)
        if steps not in self._fewer:
            with self._session(desc=f"calibrating: {steps} steps") as (_, bar):
                generator = torch.Generator(self.denoiser.device).manual_seed(self.seed)
                with exit_schedule_in_force(self.pipe, self.reference_schedule):
                    images = self.pipe(
                        **self.call_kwargs, num_inference_steps=steps, generator=generator, output_type="np"
                    ).images
                error = self._error(np.asarray(images, dtype=np.float64))
                bar.update()
            base_compute = sum(self.base) / (len(self.base) * self.num_blocks)  # the own schedule's share, per step
            self._fewer[steps] = FewerSteps(steps, base_compute * steps / self.reference_steps, error)
        return self._fewer[steps]

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
            if self._reference is None:  # the reference, and the pipeline as it is at the plan's steps (the base)
                recorded: list[float] = []
                handles = [
                    denoiser.register_forward_pre_hook(
                        lambda module, args, kwargs: recorded.append(max(scheduler_timesteps(module, args, kwargs))),
                        with_kwargs=True,
                    )
                    for denoiser in denoisers_of(pipe)
                ]
                use(self.reference_schedule)
                try:
                    own = sample()
                finally:
                    for handle in handles:
                        handle.remove()
                self.timesteps = tuple(_one_per_step(recorded, self.num_inference_steps))
                self.base = (
                    tuple(self.reference_schedule.depths_for(self.timesteps, self.num_train_timesteps))
                    if self.reference_schedule is not None
                    else (self.num_blocks,) * self.num_inference_steps
                )
                if self.reference_steps == self.num_inference_steps:
                    self._reference = own
                else:
                    generator = torch.Generator(self.denoiser.device).manual_seed(self.seed)
                    self._reference = np.asarray(
                        pipe(
                            **self.call_kwargs,
                            num_inference_steps=self.reference_steps,
                            generator=generator,
                            output_type="np",
                        ).images,
                        dtype=np.float64,
                    )
                if self.features is not None:
                    if len(own) < MIN_FRECHET_PROBES:
                        raise ValueError(
                            f"A Fréchet error needs at least {MIN_FRECHET_PROBES} probes (the covariance of their "
                            f"features), got {len(own)}."
                        )
                    self._reference_features = self.features.features(_as_nchw(self._reference))
                self._measured[self.base] = self._error(own)

            def measure(actions: tuple[int, ...]) -> float:
                if actions not in self._measured:
                    use(self.plan_of(actions))
                    self._measured[actions] = self._error(sample())
                    bar.update()
                return self._measured[actions]

            yield measure, bar

    def _error(self, images: np.ndarray) -> float:
        """The error of a run's final images (NHWC, in [0, 1]) against the reference's: see `features`."""
        if self.features is None:
            return float(np.sqrt(np.mean((images - self._reference) ** 2)))
        if np.array_equal(images, self._reference):  # the same set: 0, not the rounding of its eigenvalues
            return 0.0
        distance = frechet_distance(self.features.features(_as_nchw(images)), self._reference_features)
        return math.sqrt(max(distance, 0.0))

    def plan_of(self, actions: tuple[int, ...]) -> ExitSchedule:
        """The plan that takes `actions[i]` at step `i`."""
        return ExitSchedule.plan(
            self.num_blocks,
            self.timesteps,
            actions,
            num_train_timesteps=self.num_train_timesteps,
            scheduler_class=self.scheduler_class,
            denoiser_class=type(self.denoiser).__name__,
        )

    def _compute(self, actions: tuple[int, ...]) -> float:
        """The share of the reference's block compute: reference steps at full depth."""
        return _blocks(actions) / (self.reference_steps * self.num_blocks)

    def _result(self, point: PlanPoint) -> Calibration:
        return Calibration(
            plan=self.plan_of(point.actions),
            compute_fraction=point.compute_fraction,
            error=point.error,
            timesteps=self.timesteps,
            sensitivity=self.sensitivity,
            chain=self._chain or (point,),
            base=self.base,
            reference_steps=self.reference_steps,
            left_out=tuple(self.left_out.items()),
        )


def _as_nchw(images: np.ndarray) -> torch.Tensor:
    """A pipeline's `output_type="np"` images (N, H, W, C) as the float (N, C, H, W) tensor feature networks take."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float()


def counted_flop_fraction(pipe: Any, call_kwargs: dict[str, Any], plan: ExitSchedule, reference_steps: int) -> float:
    """The floating-point operations of one pipeline call under `plan` (at its own step count) over those of the model
    at full depth at `reference_steps`, counted by torch (`ee_diffusion.metrics.count_flops`): the plan's share of the
    whole call, where its block compute counts the blocks only (a U-Net's encoder, a pipeline's text encoders and VAE
    are not blocks). The pipeline's own exit schedule is back on it afterwards."""
    from .metrics import count_flops

    def flops(schedule: ExitSchedule | None, steps: int) -> int:
        with exit_schedule_in_force(pipe, schedule), count_flops() as counted:
            pipe(**call_kwargs, num_inference_steps=steps, output_type="np")
        return counted.total

    return flops(plan, len(plan.config.depths)) / flops(None, as_int("reference_steps", reference_steps, low=1))


def calibrate_plan(
    pipe: Any,
    call_kwargs: dict[str, Any],
    num_inference_steps: int | None,
    tolerance: float | None = None,
    target_compute: float | None = None,
    seed: int = 0,
    progress: bool = True,
    reference_steps: int | None = None,
    candidates: int = 3,
    actions: tuple[str, ...] = DEFAULT_ACTIONS,
    features: Any | None = None,
    trades: bool = False,
) -> Calibration:
    """The cheapest plan within `tolerance`, or the most accurate at `target_compute` (give exactly one), held
    against the fewer-steps baseline at its compute -- which is returned instead, as a plan of its own step count,
    where it is better (`Calibration.lost` then holds the plan it beat); see `PlanCalibrator` for the arguments, and to
    pick plans for several budgets from one set of measurements.

    Args:
        num_inference_steps: The plan's step count; `None`: pick it. Plans are calibrated at step counts from the
            fewest the budget allows up to `reference_steps` (fewer steps at full depth among them), all measured
            against the reference at `reference_steps`, and the best at the budget is returned.
        tolerance: Largest final-image error allowed (in the units of `features`'s error; 0 gives the full model).
        target_compute: Share of the reference's block compute to spend, in (0, 1].
        reference_steps: The reference images' step count (default: `num_inference_steps`; needed without it).
        candidates, actions, features, trades: See `PlanCalibrator`.
    """
    if (tolerance is None) == (target_compute is None):
        raise ValueError("Give exactly one budget: `tolerance` or `target_compute`.")
    if tolerance is not None:
        as_number("tolerance", tolerance, low=0)
    elif not 0 < as_number("target_compute", target_compute) <= 1:
        raise ValueError(f"`target_compute` must lie in (0, 1], got {target_compute!r}.")
    if num_inference_steps is None and reference_steps is None:
        raise ValueError("Without `num_inference_steps`, give `reference_steps`: the step count plans are held to.")
    if num_inference_steps is not None:
        as_int("num_inference_steps", num_inference_steps, low=2)
    reference = as_int("reference_steps", reference_steps if reference_steps is not None else num_inference_steps, 2)
    counts = [num_inference_steps] if num_inference_steps is not None else _step_counts(reference, target_compute)
    found = []
    for steps in counts:
        calibrator = PlanCalibrator(
            pipe,
            call_kwargs,
            steps,
            seed=seed,
            progress=progress,
            reference_steps=reference,
            candidates=candidates,
            actions=actions,
            features=features,
            trades=trades,
        )
        try:
            result = (
                calibrator.for_tolerance(tolerance)
                if tolerance is not None
                else calibrator.for_target_compute(target_compute)
            )
        except ValueError:  # nothing at this step count fits the budget
            if num_inference_steps is not None:
                raise
            continue
        fewer = _equal_compute_steps(result.compute_fraction, calibrator)
        if fewer is None:
            found.append(result)
            continue
        baseline = calibrator.fewer_steps(fewer)
        if baseline.error < result.error:  # the plain run at fewer steps is better: it is the plan
            plain = PlanCalibrator(
                pipe,
                call_kwargs,
                fewer,
                seed=seed,
                progress=progress,
                reference_steps=reference,
                candidates=candidates,
                features=features,
            ).as_it_is()
            lost = PlanPoint(tuple(result.plan.config.depths[::-1]), result.compute_fraction, result.error)
            result = dataclasses.replace(plain, lost=lost, left_out=result.left_out)
        found.append(dataclasses.replace(result, fewer_steps=baseline))
    if not found:
        raise ValueError(f"No plan at {counts} steps fits the budget.")
    if tolerance is not None:
        return min(found, key=lambda c: (c.compute_fraction, c.error))
    return min(found, key=lambda c: (c.error, c.compute_fraction))


def _step_counts(reference: int, target_compute: float | None) -> list[int]:
    """The step counts `calibrate_plan` tries without one: from the fewest whose full-depth run fits the budget (or
    2) up to the reference, at most six, closer together near the fewest."""
    fewest = max(2, math.floor((target_compute or 0) * reference + 1e-9))
    if fewest >= reference:
        return [reference]
    counts = {fewest, reference}
    for share in (0.15, 0.3, 0.5, 0.75):
        counts.add(round(fewest + share * (reference - fewest)))
    return sorted(counts)


def _equal_compute_steps(compute_fraction: float, calibrator: PlanCalibrator) -> int | None:
    """The most steps the model as it is can take within `compute_fraction` of the reference (`None`: fewer than 2,
    which many schedulers and pipelines do not sample with, or the plan's own step count, where the plan is the model
    as it is)."""
    base_share = sum(calibrator.base) / (len(calibrator.base) * calibrator.num_blocks)
    steps = math.floor(compute_fraction / base_share * calibrator.reference_steps + 1e-9)
    return steps if 2 <= steps < calibrator.num_inference_steps else None


def _one_per_step(recorded: list[float], steps: int) -> list[float]:
    """The scheduler's timesteps, one per sampling step, from the denoisers' calls in order (consecutive calls at one
    timestep are one step: the conditional and unconditional calls of true classifier-free guidance, say)."""
    per_step = [t for i, t in enumerate(recorded) if i == 0 or t != recorded[i - 1]]
    if len(per_step) != steps or len(set(per_step)) != steps:
        raise ValueError(
            f"A plan needs the denoiser called at {steps} distinct timesteps, one step after another; this pipeline "
            f"called it at {recorded} for {steps} steps."
        )
    return per_step


def _measured_chain(
    base: tuple[int, ...],
    sensitivity: tuple[dict[int | str, float], ...],
    measure: Callable[[tuple[int | str, ...]], float],
    candidates: int,
    until_blocks: int = 0,
) -> list[tuple[int | str, ...]]:
    """Plans from `base` to the cheapest (or the first that runs at most `until_blocks` blocks), each one move from the
    last (a step to its next shallower depth measured, or to a cheaper cached tail, or straight to `REUSE` or
    `DROP`): of the moves
    whose predicted squared error per block saved (from the sensitivities) is lowest, the `candidates` best are run as
    whole plans, and the one whose measured error grows least per block saved is taken."""
    actions, chain = list(base), [tuple(base)]
    predicted = [sensitivity[i][base[i]] ** 2 for i in range(len(base))]  # squared error of each step's action
    error = measure(tuple(base))

    def moves(i: int) -> list[int | str]:
        """The next cheaper actions of step `i`: its next shallower depth, the tails and `REUSE`/`DROP` below it."""
        current, options = actions[i], sensitivity[i]
        blocks = action_blocks(current)
        found = [max((a for a in options if a != DROP and 0 < a < current), default=None)] if current != DROP else []
        found += [action for action in options if action != DROP and action < 0 and -action < blocks]
        found += [REUSE, DROP] if blocks else []
        return [action for action in found if action is not None and action in options]

    while True:
        ranked = sorted(
            (
                (
                    (sensitivity[i][action] ** 2 - predicted[i]) / (action_blocks(actions[i]) - action_blocks(action)),
                    i,
                    action,
                )
                for i in range(len(actions))
                for action in moves(i)
            ),
            key=lambda move: move[:2],  # never compares the actions themselves: a depth and "drop" do not order
        )
        if not ranked or _blocks(actions) <= until_blocks:
            return chain
        trials = []
        for _, i, action in ranked[:candidates]:
            plan = tuple(actions[:i] + [action] + actions[i + 1 :])
            saved = action_blocks(actions[i]) - action_blocks(action)
            trials.append(((measure(plan) - error) / saved, i, action, plan))
        _, i, action, plan = min(trials, key=lambda trial: trial[:2])
        actions[i], predicted[i] = action, sensitivity[i][action] ** 2
        error = measure(plan)
        chain.append(plan)


# The most passes of trades `_traded` makes (each pass measures every trade once).
TRADE_PASSES = 3


def _traded(
    actions: tuple[int | str, ...], measure: Callable[[tuple[int | str, ...]], float]
) -> tuple[int | str, ...]:
    """`actions` after trades: two steps swapping their actions (the compute stays), one of them a reuse, a dropped
    step or a cached tail, each pass measuring every such trade as a whole plan and taking the one that lowers the
    error most, until none does (at most `TRADE_PASSES` passes). The chain moves one step at a time; a trade moves a
    reuse or a dropped step to where it costs the final images less, which no single move down the chain reaches.
    The first step keeps a computed action: it has nothing before it to reuse or to step over."""
    error = measure(actions)
    for _ in range(TRADE_PASSES):
        trades = [
            actions[:i] + (actions[j],) + actions[i + 1 : j] + (actions[i],) + actions[j + 1 :]
            for i in range(len(actions))
            for j in range(i + 1, len(actions))
            if actions[i] != actions[j]
            and not (_computed(actions[i]) and _computed(actions[j]))
            and (i or _computed(actions[j]))
        ]
        measured = [(measure(trade), trade) for trade in trades]
        if not measured or min(measured, key=lambda pair: pair[0])[0] >= error:
            return actions
        error, actions = min(measured, key=lambda pair: pair[0])
    return actions


def _computed(action: int | str) -> bool:
    """Whether a step's action runs the denoiser's first block on its own (a depth: not a reuse, a dropped step or a
    cached tail)."""
    return isinstance(action, int) and action > 0


def _blocks(actions: tuple[int | str, ...] | list[int | str]) -> int:
    """The blocks a plan runs."""
    return sum(map(action_blocks, actions))


def _fill(
    actions: tuple[int | str, ...], sensitivity: tuple[dict[int | str, float], ...], num_blocks: int, target: float
) -> tuple[int | str, ...]:
    """`actions` with blocks added back while the plan stays at or under `target` of the full compute: each time the
    step change (to any dearer action that fits, up to the base's) that the sensitivities say removes the most error
    per block, and only changes that remove some."""
    actions = list(actions)
    budget = math.floor(target * len(actions) * num_blocks + 1e-9) - _blocks(actions)
    while True:
        moves = [
            (
                (sensitivity[i][actions[i]] ** 2 - sensitivity[i][action] ** 2)
                / (action_blocks(action) - action_blocks(actions[i])),
                i,
                action,
            )
            for i in range(len(actions))
            for action in sensitivity[i]
            if action_blocks(actions[i]) < action_blocks(action) <= action_blocks(actions[i]) + budget
            and sensitivity[i][action] < sensitivity[i][actions[i]]
        ]
        if not moves:
            return tuple(actions)
        _, i, action = max(moves, key=lambda move: move[:2])
        budget -= action_blocks(action) - action_blocks(actions[i])
        actions[i] = action
