"""A plan's dropped steps and cached tails, through the drop-in and stock pipelines.

A dropped step is checked against the scheduler's own run without that timestep (`set_timesteps(timesteps=kept)`),
a cached tail with plain torch hooks: the blocks that really ran, the hidden state entering the tail's first block
and the one the output layer receives.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import (
    DDPMScheduler,
    DiTPipeline,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
)

from ee_diffusion import ExitSchedule, apply_exit_schedule, get_exit_stats, remove_exit_schedule
from ee_diffusion.schedules import DROP, REUSE, cached_tail
from tests.conftest import make_tiny_dit

from .conftest import CASES, DepthRecorder, generator, images_of, make_dit_pipe

pytestmark = pytest.mark.timeout(60)

STEPS = 8
SCHEDULERS = {
    "dpm-solver++": lambda: DPMSolverMultistepScheduler(num_train_timesteps=1000, algorithm_type="dpmsolver++"),
    "euler": lambda: EulerDiscreteScheduler(num_train_timesteps=1000),
    "ddpm": lambda: DDPMScheduler(num_train_timesteps=1000),
}


def _sample(pipe, steps: int = STEPS) -> torch.Tensor:
    pipe.set_progress_bar_config(disable=True)
    return images_of(pipe(class_labels=[1, 2], num_inference_steps=steps, generator=generator(0), output_type="pt"))


def _timesteps(scheduler, steps: int = STEPS) -> list[float]:
    scheduler.set_timesteps(steps)
    return scheduler.timesteps.tolist()


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_a_dropped_step_is_the_schedulers_run_without_that_timestep(name):
    """Bit for bit: the plan's run, whose scheduler steps over the dropped steps, and the scheduler's own run from the
    kept timesteps (`set_timesteps(timesteps=kept)`), with the same denoiser at full depth."""
    pipe = make_dit_pipe()
    pipe.scheduler = SCHEDULERS[name]()
    timesteps = _timesteps(SCHEDULERS[name]())
    actions = [4, 4, DROP, 4, DROP, DROP, 4, 4]
    kept = [t for t, action in zip(timesteps, actions) if action != DROP]
    recorder = DepthRecorder.for_transformer(pipe)
    pipe.exit_schedule = ExitSchedule.plan(4, timesteps, actions, scheduler_class=type(pipe.scheduler).__name__)
    planned = _sample(pipe)
    assert [call.timesteps[0] for call in recorder.calls] == kept
    assert pipe.exit_stats.blocks_per_call == [4] * len(kept)

    pipe.exit_schedule = None
    reference_scheduler = SCHEDULERS[name]()
    own = reference_scheduler.set_timesteps
    reference_scheduler.set_timesteps = lambda steps, device=None: own(timesteps=kept, device=device)
    pipe.scheduler = reference_scheduler
    assert torch.equal(planned, _sample(pipe))
    assert not torch.equal(planned, _sample(make_dit_pipe(), steps=STEPS))


def test_dropping_steps_composes_with_depths_and_reuse_and_removal_restores_the_scheduler():
    pipe = make_dit_pipe(pipeline_cls=DiTPipeline)
    pipe.scheduler = SCHEDULERS["dpm-solver++"]()
    full = _sample(pipe)
    timesteps = _timesteps(SCHEDULERS["dpm-solver++"]())
    actions = [4, DROP, REUSE, 2, DROP, cached_tail(1), 3, 4]
    recorder = DepthRecorder.for_transformer(pipe)
    apply_exit_schedule(pipe, ExitSchedule.plan(4, timesteps, actions))
    _sample(pipe)
    assert recorder.depths == [4, 0, 2, 1, 3, 4]
    assert get_exit_stats(pipe).blocks_per_call == [4, 0, 2, 1, 3, 4]
    # the share of the full 8-step run: the two dropped steps count as calls that ran no block
    assert get_exit_stats(pipe).block_fraction == pytest.approx(14 / (8 * 4))
    assert get_exit_stats(pipe).block_fraction == pytest.approx(
        ExitSchedule.plan(4, timesteps, actions).compute_fraction(timesteps)
    )
    remove_exit_schedule(pipe)
    assert "set_timesteps" not in vars(pipe.scheduler)
    assert torch.equal(_sample(pipe), full)


@pytest.mark.parametrize("through", ["remove", "replace"])
def test_taking_a_plan_off_the_denoiser_alone_also_releases_the_pipelines_scheduler(through):
    pipe = make_dit_pipe(pipeline_cls=DiTPipeline)
    pipe.scheduler = SCHEDULERS["euler"]()
    full = _sample(pipe)
    timesteps = _timesteps(SCHEDULERS["euler"]())
    apply_exit_schedule(pipe, ExitSchedule.plan(4, timesteps, [4, DROP, 4, DROP, 4, 4, 4, 4]))
    assert len(_timesteps(pipe.scheduler)) == STEPS - 2
    if through == "remove":
        remove_exit_schedule(pipe.transformer)
        assert torch.equal(_sample(pipe), full)
    else:
        apply_exit_schedule(pipe.transformer, ExitSchedule.constant(4, 4))
        _sample(pipe)
        assert len(get_exit_stats(pipe.transformer).calls) == STEPS
    assert "set_timesteps" not in vars(pipe.scheduler)


def test_the_drop_in_counts_dropped_steps_in_its_block_fraction():
    pipe = make_dit_pipe()
    pipe.scheduler = SCHEDULERS["euler"]()
    timesteps = _timesteps(SCHEDULERS["euler"]())
    actions = [4, 4, DROP, DROP, 4, 4, DROP, 4]
    pipe.exit_schedule = ExitSchedule.plan(4, timesteps, actions)
    for _ in range(2):  # each call starts the record afresh
        _sample(pipe)
        assert pipe.exit_stats.block_fraction == pytest.approx(5 / 8)
        assert (pipe.exit_stats.steps_run, pipe.exit_stats.steps_dropped) == (5, 3)


def test_a_plan_that_drops_steps_is_refused_where_no_scheduler_can_step_over_them():
    timesteps = _timesteps(SCHEDULERS["dpm-solver++"]())
    plan = ExitSchedule.plan(4, timesteps, [4, DROP, 4, 4, 4, 4, 4, 4])
    with pytest.raises(ValueError, match="apply it to the pipeline"):
        apply_exit_schedule(make_tiny_dit(), plan)
    pipe = make_dit_pipe(pipeline_cls=DiTPipeline)  # DDIM: a fixed stride from each timestep
    with pytest.raises(ValueError, match="DDIMScheduler steps from each timestep to one a fixed stride below"):
        apply_exit_schedule(pipe, plan)
    assert "set_timesteps" not in vars(pipe.scheduler)

    pipe.scheduler = SCHEDULERS["dpm-solver++"]()
    apply_exit_schedule(pipe, plan)
    pipe.scheduler = SCHEDULERS["dpm-solver++"]()  # set after the plan: nothing steps over the dropped step
    with pytest.raises(ValueError, match=r"at timestep \d+, a step the plan drops"):
        _sample(pipe)


def test_the_drop_in_pipeline_steps_over_on_the_scheduler_set_after_the_plan():
    pipe = make_dit_pipe()
    pipe.scheduler = SCHEDULERS["euler"]()
    timesteps = _timesteps(SCHEDULERS["euler"]())
    pipe.exit_schedule = ExitSchedule.plan(4, timesteps, [4, DROP, 4, DROP, 4, 4, 4, 4])
    planned = _sample(pipe)
    pipe.scheduler = SCHEDULERS["euler"]()
    assert torch.equal(_sample(pipe), planned)
    assert len(pipe.exit_stats.calls) == STEPS - 2


def test_a_cached_tail_runs_its_first_blocks_and_adds_the_tails_change_from_the_last_computed_step():
    """Per step of a guided run (one call, both halves): blocks `0..k-1` run, the others do not, and what reaches the
    output layer is what enters block `k` plus the change the last computed call made from block `k` on."""
    case = CASES["dit"]
    pipe = case.make()
    pipe.scheduler = SCHEDULERS["dpm-solver++"]()
    timesteps = _timesteps(SCHEDULERS["dpm-solver++"](), 6)
    actions = [4, cached_tail(1), cached_tail(2), 3, cached_tail(3), REUSE]
    pipe.exit_schedule = ExitSchedule.plan(4, timesteps, actions)
    recorder = case.recorder(pipe)
    transformer = pipe.transformer
    entering = {k: [] for k in range(4)}
    for k, block in enumerate(transformer.transformer_blocks):
        block.register_forward_pre_hook(
            lambda module, args, kwargs, k=k: entering[k].append(
                kwargs.get("hidden_states", args[0] if args else None)
            ),
            with_kwargs=True,
        )
    ends = []
    transformer.norm_out.register_forward_pre_hook(lambda module, args: ends.append(args[0]))
    images = images_of(pipe(**case.inputs(batch=2, guidance=True, steps=6)))

    assert recorder.depths == [4, 1, 2, 3, 3, 0]
    assert pipe.exit_stats.blocks_per_call == [4, 1, 2, 3, 3, 0]
    assert torch.isfinite(images).all()
    # block k's input at the tail call vs at the last computed call (step 0 for steps 1-2, step 3 for steps 4-5): the
    # blocks' hooks fire even when skipped, so `entering[k][step]` is block k's input at that step
    for step, k, computed in ((1, 1, 0), (2, 2, 0), (4, 3, 3), (5, 0, 3)):
        change = ends[computed] - entering[k][computed]
        assert torch.equal(ends[step], entering[k][step] + change), (step, k)


def test_cached_tails_are_refused_on_u_nets():
    case = CASES["ddpm"]
    pipe = case.make()
    with pytest.raises(ValueError, match="only whole-step `REUSE` applies"):
        apply_exit_schedule(pipe, ExitSchedule.plan(case.num_units, [999, 500], [case.num_units, cached_tail(2)]))
