"""Exit schedules compose with diffusers solvers: the depth run at each step is the schedule's depth at the timestep
the solver actually hands the denoiser, whatever the solver's timestep spacing."""

from __future__ import annotations

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
)

from ee_diffusion import ExitSchedule

from .conftest import CASES, assert_depths_follow_schedule, images_of

pytestmark = pytest.mark.timeout(60)

SOLVERS = {
    "dpmsolver++2-karras": (
        DPMSolverMultistepScheduler,
        dict(algorithm_type="dpmsolver++", solver_order=2, use_karras_sigmas=True),
    ),
    "dpmsolver++3-karras": (
        DPMSolverMultistepScheduler,
        dict(algorithm_type="dpmsolver++", solver_order=3, use_karras_sigmas=True),
    ),
    "ddim": (DDIMScheduler, {}),
    "ddpm": (DDPMScheduler, {}),
    "euler": (EulerDiscreteScheduler, {}),
}


def schedules(num_blocks: int) -> list[ExitSchedule]:
    return [
        ExitSchedule.linear(num_blocks=num_blocks, min_blocks=1),
        ExitSchedule.step(num_blocks, [num_blocks, num_blocks - 1, 2, 1]),
    ]


def run_and_check(pipe, case, schedule, steps: int, num_train_timesteps: int | None = None) -> list[int]:
    pipe.exit_schedule = schedule
    recorder = case.recorder(pipe)
    images = images_of(pipe(**case.inputs(steps=steps)))
    assert torch.isfinite(images).all()
    scale = pipe.scheduler.config.num_train_timesteps if num_train_timesteps is None else num_train_timesteps
    depths = assert_depths_follow_schedule(recorder, schedule, scale, pipe.exit_stats)
    # The timesteps the denoiser saw are the solver's, one call per step.
    seen = [call.timesteps[0] for call in recorder.calls]
    assert seen == pytest.approx(pipe.scheduler.timesteps.float().tolist(), abs=1e-3)
    assert len(set(depths)) >= 2, f"the schedule did not vary over the run: {depths} at {seen}"
    recorder.remove()
    return depths


@pytest.mark.parametrize("pipeline", ["dit", "ddpm"])
@pytest.mark.parametrize("solver", sorted(SOLVERS))
def test_depth_per_step_under_solver(pipeline, solver):
    case = CASES[pipeline]
    pipe = case.make()
    cls, kwargs = SOLVERS[solver]
    pipe.scheduler = cls.from_config(pipe.scheduler.config, **kwargs)
    assert isinstance(pipe.scheduler, cls)
    for key, value in kwargs.items():
        assert pipe.scheduler.config[key] == value
    for schedule in schedules(case.num_units):
        run_and_check(pipe, case, schedule, steps=6 if solver.startswith("dpm") else 5)


def test_karras_sigmas_move_the_timesteps_and_the_depths_follow():
    """The same schedule gives different per-step depths when the solver spaces its timesteps differently: the depth
    comes from each step's timestep, not from the step index."""
    case = CASES["dit"]
    schedule = ExitSchedule.linear(num_blocks=case.num_units, min_blocks=1)
    pipe = case.make()
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config, algorithm_type="dpmsolver++")
    uniform = run_and_check(pipe, case, schedule, steps=6)
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(
        pipe.scheduler.config, algorithm_type="dpmsolver++", use_karras_sigmas=True
    )
    karras = run_and_check(pipe, case, schedule, steps=6)
    assert uniform != karras


def test_swapped_scheduler_with_other_num_train_timesteps_rescales():
    """Timesteps are normalised by the *current* scheduler's num_train_timesteps, even after a swap."""
    case = CASES["ddpm"]
    schedule = ExitSchedule.linear(num_blocks=case.num_units, min_blocks=1)
    pipe = case.make(exit_schedule=schedule)
    pipe.scheduler = DDPMScheduler.from_config(pipe.scheduler.config, num_train_timesteps=500)
    depths = run_and_check(pipe, case, schedule, steps=4, num_train_timesteps=500)
    wrong_scale = schedule.depths_for(pipe.scheduler.timesteps, 1000)
    assert depths != wrong_scale  # so the check above can tell the two scales apart


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_sd3_flow_match_timesteps_are_sigma_times_1000(shift):
    case = CASES["sd3"]
    pipe = case.make()
    pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config, shift=shift)
    assert pipe.scheduler.config.num_train_timesteps == 1000
    for schedule in schedules(case.num_units):
        run_and_check(pipe, case, schedule, steps=5)
        sigmas = pipe.scheduler.sigmas[:-1].float()
        assert pipe.scheduler.timesteps.float() == pytest.approx((sigmas * 1000).tolist(), abs=1e-3)
        expected = [schedule.blocks_at(float(s) * 1000, 1000) for s in sigmas]
        assert pipe.exit_stats.blocks_per_call == expected


def test_sd3_flow_match_with_guidance_batch():
    case = CASES["sd3"]
    schedule = ExitSchedule.linear(num_blocks=case.num_units, min_blocks=1)
    pipe = case.make(exit_schedule=schedule)
    recorder = case.recorder(pipe)
    pipe(**case.inputs(batch=2, guidance=True, steps=5))
    assert [call.batch for call in recorder.calls] == [4] * 5
    assert len(set(assert_depths_follow_schedule(recorder, schedule, 1000, pipe.exit_stats))) >= 2
