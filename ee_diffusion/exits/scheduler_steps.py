"""An exit schedule on a pipeline's scheduler: the step being sampled, known on the host, and a plan's dropped steps.

`track_scheduler(scheduler, schedule, num_train_timesteps)` wraps two methods of the scheduler instance (the class is
untouched; `release_scheduler` takes the wrappers off):

- `set_timesteps`: after the scheduler has made its timesteps for a run (the pipeline's own call, with its own
  arguments: step count, sigmas, shift), a plan's `DROP` steps are taken out of `timesteps`, and of `sigmas` where the
  scheduler reads its steps from them, so the pipeline's loop never reaches them and each solver step spans the gap --
  exactly the run the scheduler makes from the kept timesteps alone (`set_timesteps(timesteps=kept)` where a scheduler
  takes custom timesteps). A run of another step count is left as it is (the exit hooks refuse its timesteps). Then
  the run's timesteps are copied to the host: the one host read of a pipeline call, before its first denoiser call.
- `step`: each solver step moves the run on by one step.

So the exit hooks know the timestep of every denoiser call from the host (`SchedulerSteps.current`) and never read
the timestep tensor the pipeline hands the model, which on a GPU would make the host wait for the queue once per
call. Pipelines that start a run part-way (image-to-image) are followed from the scheduler's `begin_index`, or, for a
scheduler without one, from the step of the run's first call (read once).
What the model was really handed is checked after the run (`SchedulerSteps.check`): a pipeline that calls its
denoiser at timesteps other than its scheduler's, one by one, is an error, not a silently wrong plan.

Which schedulers can step over a timestep: those whose step reads its end point from the run's own list, by index --
`sigmas` (Euler, flow-matching Euler, DPM-Solver++, UniPC, ...) or `timesteps` (DDPM with custom timesteps) -- and
take one model call per step (`order == 1`). DDIM computes a step's end as `t - num_train_timesteps //
num_inference_steps`, a fixed stride, so it cannot; a plan with dropped steps is refused there.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ..schedules import DROP, ExitSchedule

_WRAPPED = ("set_timesteps", "step")  # the instance attributes that shadow the scheduler class's methods
_STEPS = "_ee_scheduler_steps"


class SchedulerSteps:
    """The run in progress of a tracked scheduler, on the host: its timesteps and the step being sampled, and the
    denoiser calls made at them that are still to be checked."""

    def __init__(self, scheduler: Any) -> None:
        self.scheduler = scheduler
        self.timesteps: list[float] | None = None
        self.start: int | None = None  # the step the run starts at, once known
        self.index = 0  # solver steps taken since
        # per denoiser call: the timestep argument the model was handed, the scheduler timestep it was taken as, how
        # far from it the model's value may lie (its dtype's rounding), and `to_scheduler`, which converts it back
        self.unchecked: list[tuple[torch.Tensor, float, float, Callable[[torch.Tensor], torch.Tensor]]] = []

    def current(self, read: Callable[[], float]) -> float | None:
        """The timestep of the step being sampled (`None` outside a run made by the tracked `set_timesteps`).

        Where the run starts: the scheduler's `begin_index` (0 unless an image-to-image pipeline set it), or, for a
        scheduler without one (DDIM, DDPM, PNDM: such pipelines slice the timesteps themselves), the step nearest the
        timestep of the run's first call, which `read()` gives (the one host read of such a run)."""
        if self.timesteps is None:
            return None
        if self.start is None:
            if hasattr(self.scheduler, "begin_index"):
                self.start = self.scheduler.begin_index or 0
            else:
                first = read()
                self.start = min(range(len(self.timesteps)), key=lambda i: abs(self.timesteps[i] - first))
        index = self.start + self.index
        return self.timesteps[index] if index < len(self.timesteps) else None

    def record(
        self, timestep: torch.Tensor, t: float, bound: float, to_scheduler: Callable[[torch.Tensor], torch.Tensor]
    ) -> None:
        """Keep a call's timestep argument, taken as `t`, to check once the run is over (no host read now): it may lie
        `bound` from `t`, in the scheduler's units."""
        self.unchecked.append((torch.as_tensor(timestep).detach(), t, bound, to_scheduler))

    def check(self) -> None:
        """Raise a `ValueError` if a recorded call was handed a timestep farther from the step it was taken as than
        its bound; one host read for all of them."""
        unchecked, self.unchecked = self.unchecked, []
        if not unchecked:
            return
        handed = [to_scheduler(noisiest(timestep).float()).reshape(-1) for timestep, _, _, to_scheduler in unchecked]
        values = torch.cat([value.cpu() for value in handed]).tolist()
        taken = [(t, bound) for value, (_, t, bound, _) in zip(handed, unchecked) for _ in range(value.numel())]
        for value, (t, bound) in zip(values, taken):
            if abs(value - t) > bound:
                raise ValueError(
                    f"The denoiser was handed timestep {value:g} while its pipeline's scheduler was at its step of "
                    f"timestep {t:g}: this pipeline does not call its denoiser at its scheduler's steps one by one, "
                    "so "
                    "the exit schedule cannot follow its run on the scheduler. Apply the schedule to the denoiser "
                    "alone (`apply_exit_schedule(pipe.transformer, schedule)`), which reads each call's timestep."
                )


def noisiest(timestep: Any) -> torch.Tensor:
    """A denoiser's timestep argument as one value per sample, flat: a sample's noisiest token where the model is
    handed per-token timesteps."""
    timestep = torch.as_tensor(timestep)
    return timestep.flatten(1).amax(dim=1) if timestep.ndim >= 2 else timestep.reshape(-1)


def check_scheduler_steps_over(scheduler: Any) -> None:
    """Raise a `ValueError` unless `scheduler` can step over a dropped timestep (see the module's docstring)."""
    name = type(scheduler).__name__
    if getattr(scheduler, "order", 1) != 1:
        raise ValueError(
            f"{name} calls the denoiser {scheduler.order} times per step; a plan that drops steps needs a "
            "one-call-per-step scheduler (Euler, DPM-Solver++, UniPC, flow-matching Euler)."
        )
    if not hasattr(scheduler, "sigmas") and not hasattr(scheduler, "custom_timesteps"):
        raise ValueError(
            f"{name} steps from each timestep to one a fixed stride below, so it cannot step over a timestep: a plan "
            "that drops steps needs a scheduler that reads each step's end from its list (Euler, DPM-Solver++, "
            "UniPC, flow-matching Euler, DDPM)."
        )


def track_scheduler(
    scheduler: Any, schedule: ExitSchedule, num_train_timesteps: int, stats: Any = None
) -> SchedulerSteps:
    """Follow `scheduler`'s runs on the host and leave out `schedule`'s dropped steps from every run of its step count
    (`num_train_timesteps`: the scale of the scheduler's timesteps). Replaces an earlier tracking of it. Each run's
    steps, taken and dropped, are added to `stats` (an `ExitStats`: `steps_run`, `steps_dropped`) when given."""
    if schedule.drops:
        check_scheduler_steps_over(scheduler)
    release_scheduler(scheduler)
    steps = SchedulerSteps(scheduler)
    set_timesteps, step = scheduler.set_timesteps, scheduler.step

    def tracked_set_timesteps(*args: Any, **kwargs: Any) -> Any:
        steps.check()  # the last run's calls, where nothing read the stats after it
        result = set_timesteps(*args, **kwargs)
        made = steps.timesteps = scheduler.timesteps.detach().float().cpu().tolist()
        if schedule.drops:
            steps.timesteps = _leave_out_dropped(scheduler, made, schedule, num_train_timesteps)
        if stats is not None:
            stats.steps_run += len(steps.timesteps)
            stats.steps_dropped += len(made) - len(steps.timesteps)
        steps.start, steps.index = None, 0
        return result

    def tracked_step(*args: Any, **kwargs: Any) -> Any:
        result = step(*args, **kwargs)
        steps.index += 1
        return result

    tracked_set_timesteps.__wrapped__, tracked_step.__wrapped__ = set_timesteps, step
    scheduler.set_timesteps, scheduler.step = tracked_set_timesteps, tracked_step
    setattr(scheduler, _STEPS, steps)
    return steps


def tracked_steps(scheduler: Any) -> SchedulerSteps | None:
    """The `SchedulerSteps` of a tracked scheduler, or `None`."""
    return None if scheduler is None else vars(scheduler).get(_STEPS)


def release_scheduler(scheduler: Any) -> None:
    """Undo `track_scheduler` (a no-op on a scheduler it did not wrap)."""
    if tracked_steps(scheduler) is None:
        return
    for name in (*_WRAPPED, _STEPS):
        delattr(scheduler, name)


def _leave_out_dropped(
    scheduler: Any, values: list[float], plan: ExitSchedule, num_train_timesteps: int
) -> list[float]:
    """Take `plan`'s dropped steps out of the run `scheduler` made, whose timesteps are `values`; the kept ones."""
    timesteps = scheduler.timesteps
    if len(values) != len(plan.config.timesteps):
        return values  # another run: the exit hooks refuse timesteps that are not the plan's
    keep = [i for i, action in enumerate(plan.depths_for(values, num_train_timesteps)) if action != DROP]
    if len(keep) == len(values):
        return values
    scheduler.timesteps = timesteps[torch.tensor(keep, device=timesteps.device)]
    sigmas = getattr(scheduler, "sigmas", None)
    if isinstance(sigmas, torch.Tensor) and len(sigmas) == len(values) + 1:  # a sigma per step and the final one
        scheduler.sigmas = sigmas[torch.tensor([*keep, len(values)], device=sigmas.device)]
    elif hasattr(scheduler, "custom_timesteps"):  # DDPM: each step's end is the next entry of `timesteps`
        scheduler.custom_timesteps = True
    else:
        raise ValueError(
            f"{type(scheduler).__name__} made {len(values)} timesteps but no sigma per step; it cannot step over "
            "the plan's dropped steps."
        )
    scheduler.num_inference_steps = len(keep)
    return [values[i] for i in keep]
