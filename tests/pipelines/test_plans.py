"""Plans: per-step depths and reuse steps, on every drop-in pipeline's architecture.

Reuse is checked with plain torch hooks: the units that really ran (`DepthRecorder`), the hidden state entering the
first block and the one leaving the last (transformers), the denoiser's output (U-Nets).
"""

from __future__ import annotations

import pytest
import torch

from ee_diffusion import ExitSchedule, apply_exit_schedule, get_exit_schedule, get_exit_stats
from ee_diffusion.schedules import REUSE
from tests.conftest import make_tiny_dit

from .conftest import CASES, assert_depths_follow_schedule, images_of

pytestmark = pytest.mark.timeout(60)


def _hidden_states(args: tuple, kwargs: dict) -> torch.Tensor:
    return kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]


class SpanRecorder:
    """Per denoiser call: the hidden state entering the first block and the one the output norm receives."""

    def __init__(self, denoiser: torch.nn.Module) -> None:
        self.starts, self.ends = [], []
        denoiser.transformer_blocks[0].register_forward_pre_hook(
            lambda module, args, kwargs: self.starts.append(_hidden_states(args, kwargs)), with_kwargs=True
        )
        denoiser.norm_out.register_forward_pre_hook(lambda module, args: self.ends.append(args[0]))


def _run(pipe, case, steps=5):
    return images_of(pipe(**case.inputs(steps=steps, guidance=case.guided)))


@pytest.mark.parametrize("name", sorted(CASES))
def test_reuse_steps_run_no_block_and_take_the_last_computed_steps_work(name):
    case = CASES[name]
    pipe = case.make()
    recorder = case.recorder(pipe)
    full = _run(pipe, case)
    timesteps = [call.timesteps[0] for call in recorder.calls]
    actions = [case.num_units, REUSE, case.num_units - 1, REUSE, case.num_units]
    plan = ExitSchedule.plan(case.num_units, timesteps, actions)
    pipe.exit_schedule = plan
    recorder.reset()
    denoiser = pipe.unet if case.is_unet else pipe.transformer
    if case.is_unet:
        outputs = []
        denoiser.register_forward_hook(lambda module, args, output: outputs.append(output[0]))
    else:
        span = SpanRecorder(denoiser)
    planned = _run(pipe, case)

    assert assert_depths_follow_schedule(recorder, plan, 1000, pipe.exit_stats) == actions
    assert pipe.exit_stats.block_fraction == pytest.approx(sum(actions) / (5 * case.num_units))
    for step in (1, 3):  # the reuse steps
        if case.is_unet:  # the whole prediction of the step before
            assert torch.equal(outputs[step], outputs[step - 1])
        else:  # this step's input to the blocks plus the last computed step's change across them
            residual = span.ends[step - 1] - span.starts[step - 1]
            assert torch.equal(span.ends[step], span.starts[step] + residual)
    assert not torch.equal(planned, full)
    assert torch.equal(_run(pipe, case), planned)  # nothing carries over from one call to the next


def test_a_reuse_step_with_nothing_cached_runs_at_full_depth_and_a_new_run_forgets_the_cache():
    model = make_tiny_dit()
    apply_exit_schedule(model, ExitSchedule.plan(4, [999, 500], [4, REUSE]))
    x, y = torch.randn(2, 4, 8, 8), torch.tensor([1, 2])
    with torch.no_grad():
        model(x, timestep=torch.tensor([500, 500]), class_labels=y)  # reuse, but nothing computed yet
        model(x, timestep=torch.tensor([999, 999]), class_labels=y)  # a new run: computes
        model(x, timestep=torch.tensor([500, 500]), class_labels=y)  # reuses
        model(x[:1], timestep=torch.tensor([500]), class_labels=y[:1])  # another batch: nothing cached for it
        model(x, timestep=torch.tensor([999, 999]), class_labels=y)
        model(x, timestep=torch.tensor([500, 500]), class_labels=y)
    assert get_exit_stats(model).blocks_per_call == [4, 4, 0, 4, 4, 0]
    with pytest.raises(ValueError, match="mix the plan's actions"):
        model(x, timestep=torch.tensor([999, 500]), class_labels=y)


def test_plans_round_trip_through_a_pipeline_folder(tmp_path):
    case = CASES["dit"]
    plan = ExitSchedule.plan(case.num_units, [999, 749, 499, 249], [4, REUSE, 2, REUSE], num_train_timesteps=1000)
    pipe = case.make(exit_schedule=plan)
    pipe.save_pretrained(tmp_path)
    loaded = type(pipe).from_pretrained(tmp_path)
    assert loaded.exit_schedule == plan and loaded.exit_schedule.reuses
    assert ExitSchedule.from_spec(str(tmp_path / "exit_schedule"), case.num_units) == plan


def test_a_plan_runs_only_at_its_own_scheduler_and_step_count(tmp_path):
    """A plan holds one action per step of one run: a pipeline refuses another step count or scheduler class before
    the first step, and the hooks refuse a timestep that is not one of the plan's (a run the pipeline cannot see, or
    a bare denoiser)."""
    from diffusers import EulerDiscreteScheduler

    case = CASES["dit"]
    pipe = case.make()
    recorder = case.recorder(pipe)
    _run(pipe, case, steps=4)
    timesteps = [call.timesteps[0] for call in recorder.calls]
    plan = ExitSchedule.plan(
        case.num_units, timesteps, [4, REUSE, 2, 2], scheduler_class=type(pipe.scheduler).__name__
    )
    pipe.exit_schedule = plan
    planned = _run(pipe, case, steps=4)
    for steps in (3, 5, 8):
        with pytest.raises(
            ValueError,
            match=rf"made for 4 steps of {type(pipe.scheduler).__name__}; the run asks "
            rf"for {steps} steps",
        ):
            _run(pipe, case, steps=steps)
    own = pipe.scheduler
    pipe.scheduler = EulerDiscreteScheduler.from_config(own.config)
    with pytest.raises(ValueError, match="the run asks for 4 steps of EulerDiscreteScheduler"):
        _run(pipe, case, steps=4)
    pipe.scheduler = own
    plan.save_pretrained(tmp_path)
    loaded = ExitSchedule.from_pretrained(tmp_path)
    assert loaded == plan and loaded.config.scheduler_class == type(own).__name__
    assert torch.equal(_run(pipe, case, steps=4), planned)  # refusals leave nothing behind

    model = make_tiny_dit()
    apply_exit_schedule(model, ExitSchedule.plan(4, [999, 500], [4, 2]))
    x, y = torch.randn(2, 4, 8, 8), torch.tensor([1, 2])
    with torch.no_grad(), pytest.raises(ValueError, match=r"Timestep 750 is not a step of this plan"):
        model(x, timestep=torch.tensor([750, 750]), class_labels=y)


def test_a_plan_without_a_scheduler_class_is_still_held_to_its_steps():
    plan = ExitSchedule.plan(4, [999, 500], [4, 2])
    plan.check_run("AnyScheduler", 2)
    with pytest.raises(ValueError, match="made for 2 steps of its scheduler; the run asks for 3 steps"):
        plan.check_run("AnyScheduler", 3)
    ExitSchedule.linear(4, 2).check_run("AnyScheduler", 37)  # a schedule of timesteps runs at any step count
    with pytest.raises(ValueError, match="`scheduler_class` is a plan's scheduler class name"):
        ExitSchedule(num_blocks=4, shape="linear", min_blocks=2, scheduler_class="DDIMScheduler")


def test_a_run_given_by_custom_sigmas_is_held_to_the_plan_by_their_count():
    """Diffusers' pipelines take a run's steps from `sigmas` when given (ignoring `num_inference_steps`)."""
    case = CASES["sd3"]
    pipe = case.make()
    recorder = case.recorder(pipe)

    def run(sigmas):
        inputs = {**case.inputs(guidance=True), "sigmas": sigmas}
        del inputs["num_inference_steps"]  # the pipeline's default, 28
        return images_of(pipe(**inputs))

    full = run([1.0, 0.75, 0.5, 0.25])
    timesteps = [call.timesteps[0] for call in recorder.calls]
    assert len(timesteps) == 4
    pipe.exit_schedule = ExitSchedule.plan(
        case.num_units, timesteps, [case.num_units] * 4, scheduler_class=type(pipe.scheduler).__name__
    )
    assert torch.equal(run([1.0, 0.75, 0.5, 0.25]), full)
    with pytest.raises(ValueError, match="made for 4 steps .* the run asks for 5 steps"):
        run([1.0, 0.8, 0.6, 0.4, 0.2])


def test_the_drop_in_refuses_exit_hooks_put_on_its_denoiser_directly_and_keeps_a_scale_given_to_it():
    case = CASES["dit"]
    pipe = case.make()
    apply_exit_schedule(pipe.transformer, ExitSchedule.constant(case.num_units, 2))
    with pytest.raises(ValueError, match=r"hooks put on it directly, which are not the pipeline's `exit_schedule`"):
        _run(pipe, case, steps=3)
    assert get_exit_schedule(pipe.transformer) is not None  # refused, not silently taken off

    pipe = case.make()
    schedule = ExitSchedule.linear(case.num_units, 1)
    apply_exit_schedule(pipe, schedule, num_train_timesteps=2000)  # on a drop-in: its `exit_schedule` too
    assert pipe.exit_schedule is schedule
    _run(pipe, case, steps=3)
    for call in pipe.exit_stats.calls:
        assert call.depths[0] == schedule.blocks_at(call.timesteps[0], 2000)


def test_a_plan_is_refused_on_a_denoiser_of_another_class_than_it_was_made_for():
    from ee_diffusion import load_early_exit_pipeline
    from ee_diffusion.pipelines import shipped_model_path

    unet_plan = ExitSchedule.from_pretrained(shipped_model_path("digits-unet-ase") / "plans" / "dpm-solver++-10")
    assert unet_plan.config.denoiser_class == "UNet2DModel"
    pipe = load_early_exit_pipeline("digits-dit")  # 12 blocks too, and the same scheduler: only the class differs
    with pytest.raises(ValueError, match="made for a UNet2DModel; this denoiser is a DiTTransformer2DModel"):
        pipe.exit_schedule = unet_plan
    assert pipe.exit_schedule is None and get_exit_schedule(pipe) is None  # refused, nothing left behind
    with pytest.raises(ValueError, match="`denoiser_class` is a plan's denoiser class name"):
        ExitSchedule(num_blocks=4, shape="linear", min_blocks=2, denoiser_class="DiTTransformer2DModel")
