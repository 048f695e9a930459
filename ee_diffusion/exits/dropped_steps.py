"""A plan's `DROP` steps on a pipeline's scheduler: the denoiser is not called there, and the solver goes from the step
before straight to the step after.

`step_over_dropped_steps(scheduler, plan)` wraps the scheduler's `set_timesteps`: after the scheduler has made its
timesteps for a run (the pipeline's own call, with its own arguments: step count, sigmas, shift), the plan's dropped
steps are taken out of `timesteps`, and of `sigmas` where the scheduler reads its steps from them, so the pipeline's
loop never reaches them and each solver step spans the gap -- exactly the run the scheduler makes from the kept
timesteps alone (`set_timesteps(timesteps=kept)` where a scheduler takes custom timesteps). `release_scheduler` undoes
it. A run of another step count is left as it is (the exit hooks refuse its timesteps).

Which schedulers can step over a timestep: those whose step reads its end point from the run's own list, by index --
`sigmas` (Euler, flow-matching Euler, DPM-Solver++, UniPC, ...) or `timesteps` (DDPM with custom timesteps) -- and
take one model call per step (`order == 1`). DDIM computes a step's end as `t - num_train_timesteps //
num_inference_steps`, a fixed stride, so it cannot; a plan with dropped steps is refused there.

Host reads: one per pipeline call, of the run's timesteps, when the scheduler makes them (before any denoiser call).
"""

from __future__ import annotations

from typing import Any

import torch

from ..schedules import DROP, ExitSchedule

_WRAPPED = "set_timesteps"  # the instance attribute that shadows the scheduler class's method


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


def step_over_dropped_steps(scheduler: Any, plan: ExitSchedule, num_train_timesteps: int) -> None:
    """Make `scheduler` leave out `plan`'s `DROP` steps from every run of the plan's step count (`num_train_timesteps`:
    the scale of the scheduler's timesteps). Replaces an earlier wrapping."""
    check_scheduler_steps_over(scheduler)
    release_scheduler(scheduler)
    original = scheduler.set_timesteps

    def set_timesteps(*args: Any, **kwargs: Any) -> Any:
        result = original(*args, **kwargs)
        _leave_out_dropped(scheduler, plan, num_train_timesteps)
        return result

    set_timesteps.__wrapped__ = original
    setattr(scheduler, _WRAPPED, set_timesteps)


def release_scheduler(scheduler: Any) -> None:
    """Undo `step_over_dropped_steps` (a no-op on a scheduler it did not wrap)."""
    if scheduler is not None and _WRAPPED in vars(scheduler):
        delattr(scheduler, _WRAPPED)


def steps_over(scheduler: Any) -> bool:
    """Whether `scheduler` is wrapped by `step_over_dropped_steps`."""
    return scheduler is not None and _WRAPPED in vars(scheduler)


def _leave_out_dropped(scheduler: Any, plan: ExitSchedule, num_train_timesteps: int) -> None:
    timesteps = scheduler.timesteps
    values = timesteps.detach().float().cpu().tolist()
    if len(values) != len(plan.config.timesteps):
        return  # another run: the exit hooks refuse timesteps that are not the plan's
    keep = [i for i, action in enumerate(plan.depths_for(values, num_train_timesteps)) if action != DROP]
    if len(keep) == len(values):
        return
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
