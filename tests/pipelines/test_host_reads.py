"""No host read inside a denoiser call under an exit schedule or plan applied to a pipeline: the hooks take each
call's timestep from the pipeline's scheduler, followed on the host, and check what the model was handed after the
run. Counted on the CPU (`tests.host_reads`), where such a read would drain a GPU's queue."""

from __future__ import annotations

import pytest
import torch

from ee_diffusion import ExitSchedule, apply_exit_schedule, get_exit_stats
from ee_diffusion.bench.harness import BenchConfig, load_pipe
from ee_diffusion.bench.methods import Target, build_method
from ee_diffusion.bench.noise_schedulers import build_scheduler
from ee_diffusion.exits import tracked_steps
from ee_diffusion.schedules import DROP, REUSE, cached_tail
from tests.host_reads import HostReads

from .conftest import CASES, generator, make_dit_pipe

pytestmark = pytest.mark.timeout(60)


def _plan(case, pipe, steps=4):
    recorder = case.recorder(pipe)
    pipe(**case.inputs(steps=steps))
    timesteps = [call.timesteps[0] for call in recorder.calls]
    recorder.remove()
    return timesteps


@pytest.mark.parametrize("name", sorted(CASES))
def test_schedules_and_plans_read_nothing_on_the_host_inside_a_denoiser_call(name):
    case = CASES[name]
    pipe = case.make()
    denoiser = pipe.unet if case.is_unet else pipe.transformer
    n = case.num_units
    timesteps = _plan(case, pipe)
    schedules = [ExitSchedule.linear(n, 1), ExitSchedule.plan(n, timesteps, [n, REUSE, n - 1, 1])]
    if not case.is_unet:
        schedules.append(ExitSchedule.plan(n, timesteps, [n, cached_tail(1), REUSE, n]))
    for schedule in schedules:
        pipe.exit_schedule = schedule
        with HostReads(denoiser) as reads:
            pipe(**case.inputs(steps=4, guidance=case.guided))
        # a scheduler without a `begin_index` (DDIM, DDPM) is located once per run, at its first call
        first = 0 if hasattr(pipe.scheduler, "begin_index") else 1
        calls = len(pipe.exit_stats.calls)
        assert reads.per_call == [first] + [0] * (calls - 1), (schedule.describe(), reads.kinds)
        assert [call.timesteps[0] for call in pipe.exit_stats.calls] == pytest.approx(timesteps)


def test_the_bench_rows_of_schedules_and_plans_read_nothing_inside_a_call(tmp_path):
    pipe = load_pipe("random:dit-tiny", BenchConfig(model="random:dit-tiny"), torch.device("cpu"))
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = build_scheduler("dpm-solver++", pipe.scheduler.config)  # the bench's default
    pipe.scheduler.set_timesteps(6)
    n = pipe.transformer.config.num_layers
    plan = ExitSchedule.plan(n, pipe.scheduler.timesteps, [n, REUSE, DROP, n - 1, cached_tail(1), n])
    plan.save_pretrained(tmp_path / "plan")
    target = Target("random:dit-tiny", lambda model: pipe, 6)
    for spec in ("baseline", "ase:linear:1", f"ase:{tmp_path / 'plan'}"):
        method = build_method(spec, target)
        with method.session(pipe) as work, HostReads(pipe.transformer) as reads:
            pipe(class_labels=[1, 2], num_inference_steps=6, generator=generator(0), output_type="pt")
            assert 0 < work() <= 1
        assert reads.per_call and set(reads.per_call) == {0}, (spec, reads.kinds)


def test_a_pipeline_that_hands_its_denoiser_other_timesteps_than_its_schedulers_is_an_error():
    """The hooks take the scheduler's step on trust while sampling; after the run, what the model was handed is read
    (once) and a call at another timestep is an error naming both."""
    pipe = make_dit_pipe()

    def shifted(module, args, kwargs):
        if "timestep" in kwargs:
            return args, {**kwargs, "timestep": kwargs["timestep"] - 100}
        return (args[0], args[1] - 100, *args[2:]), kwargs

    pipe.transformer.register_forward_pre_hook(shifted, with_kwargs=True)
    apply_exit_schedule(pipe, ExitSchedule.linear(pipe.transformer.config.num_layers, 1))
    pipe(class_labels=[1], num_inference_steps=3, generator=generator(0), output_type="pt")
    with pytest.raises(ValueError, match=r"handed timestep \d+ while its pipeline's scheduler was at its step of"):
        get_exit_stats(pipe)


def test_an_image_to_image_run_that_slices_the_timesteps_is_followed_from_its_first_step():
    """Image-to-image pipelines start part-way: with `set_begin_index` (DPM-Solver++), or by slicing the timesteps
    themselves (DDIM, which has no begin index). Either way each call gets the depth of its own timestep."""
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

    for scheduler in (DPMSolverMultistepScheduler(num_train_timesteps=1000), DDIMScheduler(num_train_timesteps=1000)):
        pipe = make_dit_pipe()
        pipe.scheduler = scheduler
        schedule = ExitSchedule.step(pipe.transformer.config.num_layers, [4, 3, 2, 1])
        apply_exit_schedule(pipe.transformer, schedule)  # reads each call's timestep: the reference
        reference = _img2img(pipe)
        apply_exit_schedule(pipe, schedule)  # follows the scheduler on the host
        assert _img2img(pipe) == reference and len(set(depth for depth, _ in reference)) > 1
        get_exit_stats(pipe)  # the check after the run passes


def _img2img(pipe, steps=8, start=3):
    """The loop of an image-to-image pipeline, from step `start` of `steps`: each call's (depth, timestep)."""
    scheduler, transformer = pipe.scheduler, pipe.transformer
    scheduler.set_timesteps(steps)
    timesteps = scheduler.timesteps[start:]
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(start)
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for t in timesteps:
            output = transformer(latents, timestep=t.reshape(1), class_labels=torch.tensor([1])).sample
            latents = scheduler.step(output[:, :4], t, latents).prev_sample
    target = pipe if tracked_steps(scheduler) is not None else transformer
    return [(call.depths[0], round(call.timesteps[0])) for call in get_exit_stats(target).calls[-len(timesteps) :]]
