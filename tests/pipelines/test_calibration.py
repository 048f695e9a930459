"""Calibrated plans: budgets honoured, repeatable, on transformers, U-Nets and flow matching, and bad budgets
refused."""

from __future__ import annotations

import json

import pytest

from ee_diffusion import PlanCalibrator, calibrate_plan, load_early_exit_pipeline
from ee_diffusion.bench.noise_schedulers import build_scheduler
from ee_diffusion.calibration import Calibration
from ee_diffusion.cli import main
from ee_diffusion.schedules import DROP, REUSE, ExitSchedule
from tests.conftest import save_digits_shaped_dit

from .conftest import CASES, DepthRecorder

pytestmark = pytest.mark.timeout(120)

STEPS = 4


def calibrate(name: str, **budget):
    case = CASES[name]
    pipe = case.make()
    kwargs = case.inputs(batch=2, steps=STEPS, guidance=case.guided)
    for key in ("num_inference_steps", "generator", "output_type"):
        kwargs.pop(key)
    return case, pipe, calibrate_plan(pipe, kwargs, STEPS, progress=False, **budget)


def test_zero_tolerance_gives_the_full_model_and_larger_tolerances_never_cost_more():
    case, pipe, exact = calibrate("dit", tolerance=0)
    assert exact.plan.config.depths == [case.num_units] * STEPS and exact.error == 0 and exact.compute_fraction == 1
    kwargs = case.inputs(batch=2, steps=STEPS, guidance=case.guided)
    for key in ("num_inference_steps", "generator", "output_type"):
        kwargs.pop(key)
    calibrator = PlanCalibrator(pipe, kwargs, STEPS, progress=False)  # one set of runs, any number of budgets
    computes = [calibrator.for_tolerance(tolerance).compute_fraction for tolerance in (0.001, 0.01, 0.05, 1.0)]
    assert computes == sorted(computes, reverse=True) and computes[-1] < 1
    assert pipe.exit_schedule is None  # the pipeline is left as it was found


@pytest.mark.parametrize("target", [0.9, 0.6, 0.3])
def test_a_compute_target_is_met_within_one_block_per_step(target):
    case, pipe, result = calibrate("dit", target_compute=target)
    assert result.compute_fraction <= target + 1e-12
    assert target - result.compute_fraction < 1 / case.num_units
    # what the plan really runs, counted by independent hooks, is what it claims
    recorder = DepthRecorder.for_transformer(pipe)
    pipe.exit_schedule = result.plan
    kwargs = case.inputs(batch=2, steps=STEPS, guidance=True)
    pipe(**kwargs)
    assert sum(recorder.depths) / (STEPS * case.num_units) == pytest.approx(result.compute_fraction)


def test_calibration_is_repeatable_and_every_chain_plan_is_measured():
    _, _, first = calibrate("dit", tolerance=0.02)
    _, _, again = calibrate("dit", tolerance=0.02)
    assert first.plan == again.plan and first.chain == again.chain
    assert first.chain[0].error == 0 and first.chain[0].compute_fraction == 1
    assert [p.compute_fraction for p in first.chain] == sorted((p.compute_fraction for p in first.chain), reverse=True)
    assert first.sensitivity[0].keys() == set(range(1, 5))  # the first step cannot reuse
    assert REUSE in first.sensitivity[1]


@pytest.mark.parametrize("name", ["ddim", "sd3"])
def test_u_nets_and_flow_matching_calibrate_too(name):
    case, pipe, result = calibrate(name, target_compute=0.5)
    assert 0.5 - 1 / case.num_units < result.compute_fraction <= 0.5
    assert result.plan.config.shape == "plan" and len(result.timesteps) == STEPS
    denoiser = pipe.unet if case.is_unet else pipe.transformer
    assert result.plan.config.denoiser_class == type(denoiser).__name__  # refused on another class


@pytest.mark.parametrize(
    "budget, error, match",
    [
        (dict(), ValueError, "exactly one budget"),
        (dict(tolerance=0.1, target_compute=0.5), ValueError, "exactly one budget"),
        (dict(tolerance=-0.1), ValueError, "`tolerance` must be a finite number >= 0"),
        (dict(tolerance=float("nan")), ValueError, "`tolerance` must be a finite number"),
        (dict(target_compute=0), ValueError, r"`target_compute` must lie in \(0, 1\]"),
        (dict(target_compute=1.5), ValueError, r"`target_compute` must lie in \(0, 1\]"),
        (dict(target_compute="half"), TypeError, "`target_compute` must be a number"),
        (dict(target_compute=0.5, num_inference_steps=1), ValueError, "`num_inference_steps` must be an integer >= 2"),
        (dict(target_compute=0.5, seed=1.5), TypeError, "`seed` must be an integer, got 1.5"),
        (dict(target_compute=0.5, seed="0"), TypeError, "`seed` must be an integer"),
    ],
)
def test_bad_budgets_are_refused_before_any_run(budget, error, match):
    case = CASES["dit"]
    pipe = case.make()
    calls = []
    pipe.transformer.register_forward_pre_hook(lambda *args: calls.append(1))
    steps = budget.pop("num_inference_steps", STEPS)
    with pytest.raises(error, match=match):
        calibrate_plan(pipe, {"class_labels": [1]}, steps, progress=False, **budget)
    assert not calls


def test_a_calibration_is_saved_only_over_an_earlier_one(tmp_path):
    plan = ExitSchedule.plan(12, [500, 999], [6, 12])
    found = Calibration(plan, 0.75, 0.01, (999.0, 500.0), ({}, {}), (), (12, 12))
    found.save_pretrained(tmp_path / "plan")
    found.save_pretrained(tmp_path / "plan")  # over its own earlier output
    assert ExitSchedule.from_pretrained(tmp_path / "plan") == plan
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="holds notes.txt, which ee-diffusion calibrate does not write"):
        found.save_pretrained(tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "mine"


def test_a_pipeline_with_its_own_schedule_is_the_reference_and_plans_only_cut_below_it():
    case = CASES["dit"]
    pipe = case.make()
    own = ExitSchedule.step(case.num_units, [4, 3, 2, 1])  # a fine-tuned model's schedule, say
    pipe.exit_schedule = own
    kwargs = {"class_labels": [1, 2], "guidance_scale": 2.0}
    exact = calibrate_plan(pipe, kwargs, STEPS, tolerance=0, progress=False)
    base = tuple(own.depths_for(exact.timesteps))
    assert exact.base == base and tuple(exact.plan.config.depths[::-1]) == base and exact.error == 0
    assert exact.compute_fraction == own.compute_fraction(exact.timesteps) < 1
    for point in exact.chain:  # never deeper than the schedule it was trained for
        assert all(action <= depth for action, depth in zip(point.actions, base))
    assert exact.chain[-1].compute_fraction == 0.25 / STEPS  # the first step at one block, every later one reused
    assert pipe.exit_schedule is own  # and it is left on the pipeline


def test_calibrate_command_writes_a_plan_the_bench_runs(tmp_path, capsys):
    from ee_diffusion.bench.harness import BenchConfig, run_bench

    save_digits_shaped_dit(tmp_path / "model")
    out = tmp_path / "plan"
    assert (
        main(
            [
                "calibrate",
                "--model",
                str(tmp_path / "model"),
                "--steps",
                "3",
                "--target-compute",
                "0.5",
                "--num-probes",
                "2",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    report = json.loads((out / "calibration.json").read_text())
    plan = ExitSchedule.from_pretrained(out)
    assert report["compute_fraction"] == plan.compute_fraction(report["timesteps"]) <= 0.5
    assert report["actions"] == ["reuse", "drop"]  # the default: no cached tails
    assert all(
        isinstance(action, str) or action >= 0 for step in report["sensitivity"] for action in map(_action, step)
    )
    printed = capsys.readouterr().out
    assert f"--methods ase:{out}" in printed
    rows = run_bench(
        BenchConfig(
            model=str(tmp_path / "model"), methods=["baseline", f"ase:{out}"], num_samples=2, steps=3, repeats=1
        ),
        progress=False,
    )
    assert rows[1].block_fraction == pytest.approx(report["compute_fraction"])
    # the FLOPs calibrate counts are the bench's: the plan's call over the full model's at the reference's steps
    assert f"({rows[1].flop_fraction:.1%} of its FLOPs, counted over one call of the probes)" in printed
    # on a model that carries a schedule, the plan is calibrated against it and benched on that model
    tuned = tmp_path / "tuned"
    save_digits_shaped_dit(tuned, exit_schedule=ExitSchedule.step(2, [2, 1]))
    assert (
        main(
            [
                "calibrate",
                "--model",
                str(tuned),
                "--steps",
                "3",
                "--tolerance",
                "0",
                "--num-probes",
                "2",
                "--out",
                str(tmp_path / "tuned-plan"),
            ]
        )
        == 0
    )
    assert f"--methods finetuned:{tuned}:{tmp_path / 'tuned-plan'}" in capsys.readouterr().out
    rows = run_bench(
        BenchConfig(
            model=str(tmp_path / "model"),
            methods=["baseline", f"finetuned:{tuned}", f"finetuned:{tuned}:{tmp_path / 'tuned-plan'}"],
            num_samples=2,
            steps=3,
            repeats=1,
        ),
        progress=False,
    )
    assert rows[1].model == rows[2].model == str(tuned)
    assert rows[2].block_fraction == rows[1].block_fraction < 1  # tolerance 0: the model's own schedule


def test_a_pipeline_calibration_cannot_drive_is_an_error_naming_it_and_what_is_supported(tmp_path, capsys):
    """A pipeline without a denoiser the exits know, or of a class the loader does not open: a message, not a
    traceback."""
    import torch

    from ee_diffusion.calibration import PlanCalibrator

    class Stub:
        transformer = torch.nn.Linear(2, 2)

    with pytest.raises(TypeError, match=r"Cannot calibrate a plan for Stub: Early exit does not support Linear\. "):
        PlanCalibrator(Stub(), {}, STEPS)
    with pytest.raises(ValueError, match="`call_kwargs` must leave out 'num_inference_steps'"):
        PlanCalibrator(CASES["dit"].make(), {"class_labels": [1], "num_inference_steps": 4}, STEPS)

    from diffusers import CMStochasticIterativeScheduler, ConsistencyModelPipeline

    from .conftest import make_unet2d

    ConsistencyModelPipeline(unet=make_unet2d(), scheduler=CMStochasticIterativeScheduler()).save_pretrained(
        tmp_path / "cm"
    )
    argv = ["calibrate", "--model", str(tmp_path / "cm"), "--tolerance", "0.1", "--out", str(tmp_path / "out")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "error: " in err and "holds a ConsistencyModelPipeline; supported pipeline classes:" in err
    assert "EarlyExitPixArtAlphaPipeline" in err and "Traceback" not in err


def test_a_plan_is_held_against_fewer_steps_and_without_a_step_count_never_loses_to_them():
    """With a step count, the result says how the plan stands against the model at fewer steps with the same compute
    (measured from the same noise against the same reference); without one, plans at several step counts (fewer
    steps at full depth among them) are held to one reference and the best wins, so it is never worse than the
    fewer-steps baseline it measured."""
    case = CASES["dit"]
    pipe = case.make()
    kwargs = {"class_labels": [1], "guidance_scale": 1.0}
    at_steps = calibrate_plan(pipe, kwargs, STEPS, target_compute=0.5, progress=False, candidates=1)
    assert at_steps.steps == STEPS and at_steps.reference_steps == STEPS and at_steps.compute_fraction <= 0.5
    fewer = at_steps.fewer_steps
    assert fewer.steps == STEPS // 2 and fewer.compute_fraction == 0.5 and fewer.error > 0
    assert at_steps.beats_fewer_steps and at_steps.lost is None

    picked = calibrate_plan(
        pipe, kwargs, None, target_compute=0.5, reference_steps=STEPS, progress=False, candidates=1
    )
    assert picked.reference_steps == STEPS and picked.compute_fraction <= 0.5 + 1e-12
    assert picked.error <= min(at_steps.error, fewer.error) + 1e-12  # the 4-step plan and 2 plain steps were tried
    pipe.exit_schedule = picked.plan  # the plan runs at its own step count, and only there
    pipe(**kwargs, num_inference_steps=picked.steps)
    with pytest.raises(ValueError, match=f"made for {picked.steps} steps"):
        pipe(**kwargs, num_inference_steps=picked.steps + 1)
    with pytest.raises(ValueError, match="give `reference_steps`"):
        calibrate_plan(pipe, kwargs, None, target_compute=0.5, progress=False)


def test_every_plan_of_the_chain_is_measured_whole():
    """The chain's errors are the errors of the plans run whole (compounding included), not sums of single-step
    errors: running any chain plan again gives its recorded error."""
    case = CASES["dit"]
    pipe = case.make()
    kwargs = {"class_labels": [1, 2], "guidance_scale": 2.0}
    calibrator = PlanCalibrator(pipe, kwargs, STEPS, progress=False)
    chain = calibrator.chain
    point = chain[len(chain) // 2]
    pipe.exit_schedule = calibrator.plan_of(point.actions)
    import numpy as np
    import torch

    images = pipe(**kwargs, num_inference_steps=STEPS, generator=torch.Generator().manual_seed(0), output_type="np")
    pipe.exit_schedule = None
    full = pipe(**kwargs, num_inference_steps=STEPS, generator=torch.Generator().manual_seed(0), output_type="np")
    error = float(np.sqrt(np.mean((np.asarray(images.images, dtype=np.float64) - full.images) ** 2)))
    assert error == pytest.approx(point.error)


@pytest.mark.parametrize("target", [0.34, 0.5, 0.67])
def test_a_calibrated_plan_never_measures_worse_than_fewer_steps_at_its_compute(target):
    """On the trained digits DiT, whose plans at a low budget do lose to fewer steps without dropped steps: with them
    (and the fewer-steps plans inside the run as seeds) the plan is at least as good as the plain run at the same
    compute; where it is not, that plain run is what comes back, as a plan of its own step count, with the plan it
    beat."""
    pipe = load_early_exit_pipeline("digits-dit")
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = build_scheduler("dpm-solver++", pipe.scheduler.config)
    kwargs = {"class_labels": [0, 7], "guidance_scale": 1.0}
    result = calibrate_plan(pipe, kwargs, 6, target_compute=target, progress=False, candidates=1)
    assert result.fewer_steps is not None and result.compute_fraction <= target + 1e-12
    assert result.error <= result.fewer_steps.error
    if result.lost is not None:  # the plain run, as a plan: every step at full depth
        assert result.steps == result.fewer_steps.steps and result.lost.error > result.error
        assert result.plan.config.depths == [pipe.transformer.config.num_layers] * result.steps
    pipe.exit_schedule = result.plan
    pipe(**kwargs, num_inference_steps=result.steps)  # it runs at its own step count


def test_without_dropped_steps_a_losing_plan_is_replaced_by_fewer_steps():
    """Depths and reuse alone lose to fewer steps on the digits DiT at half the compute of 8 DPM-Solver++ steps: the
    result is the plain run at that compute, and says which plan it beat and by how much."""
    pipe = load_early_exit_pipeline("digits-dit")
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = build_scheduler("dpm-solver++", pipe.scheduler.config)
    kwargs = {"class_labels": [0, 7], "guidance_scale": 1.0}
    result = calibrate_plan(pipe, kwargs, 8, target_compute=0.5, progress=False, candidates=1, actions=("reuse",))
    assert result.lost is not None and len(result.lost.actions) == 8 and DROP not in result.lost.actions
    assert result.steps == 4 and result.error == result.fewer_steps.error < result.lost.error


def _action(written: str) -> int | str:
    return written if written == DROP else int(written)


def test_cached_tails_are_tried_when_asked_for():
    case = CASES["dit"]
    pipe = case.make()
    kwargs = {"class_labels": [1], "guidance_scale": 1.0}
    with_tails = PlanCalibrator(pipe, kwargs, STEPS, progress=False, candidates=1, actions=("reuse", "tail"))
    assert len(with_tails.chain) > 1  # the sensitivities, then the chain
    assert all(-1 in step and -2 in step for step in with_tails.sensitivity[1:])  # tails after one and two blocks
    with pytest.raises(ValueError, match="`actions` must be a tuple of 'reuse', 'tail', 'drop'"):
        PlanCalibrator(pipe, kwargs, STEPS, actions=("skip",))


def test_actions_the_pipeline_cannot_take_are_left_out_and_named_with_why():
    case, pipe, result = calibrate("ddim", target_compute=0.5, actions=("reuse", "tail", "drop"))
    assert dict(result.left_out) == {
        "tail": "UNet2DModel reuses whole steps only, no cached tails",
        "drop": "DDIMScheduler cannot step over a dropped step",
    }
    assert all(action == REUSE or action > 0 for action in result.plan.config.depths)
    _, _, flow = calibrate("sd3", target_compute=0.5, actions=("reuse", "tail", "drop"))
    assert flow.left_out == ()


class _Projected:
    """A feature network for the tests: each image's pixels through one fixed random projection to 6 features."""

    def __init__(self) -> None:
        self.weights = None

    def features(self, images):
        import torch

        pixels = images.flatten(1).double()
        if self.weights is None:
            self.weights = torch.randn(pixels.shape[1], 6, generator=torch.Generator().manual_seed(0)).double()
        return pixels @ self.weights


def test_a_frechet_error_is_fids_distance_between_the_two_sets_of_probe_images():
    """With a feature network, a plan's error is the square root of the Fréchet distance between the features of its
    probes' final images and the reference's (recomputed here from runs of the plan and of the full model); the model
    as it is measures 0."""
    import math

    import torch

    from ee_diffusion.metrics import frechet_distance

    case = CASES["dit"]
    pipe = case.make()
    kwargs = {"class_labels": [i % 2 for i in range(50)], "guidance_scale": 1.0}
    features = _Projected()
    calibrator = PlanCalibrator(pipe, kwargs, STEPS, progress=False, candidates=1, features=features)
    result = calibrator.for_target_compute(0.5)
    assert calibrator.chain[0].error == 0 and result.error > 0

    def probe_features(plan):
        pipe.exit_schedule = plan
        images = pipe(
            **kwargs, num_inference_steps=STEPS, generator=torch.Generator().manual_seed(0), output_type="pt"
        )
        return features.features(images.images)

    distance = frechet_distance(probe_features(result.plan), probe_features(None))
    assert result.error == pytest.approx(math.sqrt(distance), rel=1e-6)


def test_a_frechet_error_refuses_too_few_probes_and_a_feature_network_without_features():
    pipe = CASES["dit"].make()
    kwargs = {"class_labels": [0, 1] * 10, "guidance_scale": 1.0}
    with pytest.raises(ValueError, match="A Fréchet error needs at least 50 probes .*, got 20"):
        calibrate_plan(pipe, kwargs, STEPS, target_compute=0.5, progress=False, features=_Projected())
    with pytest.raises(TypeError, match="`features` must be a feature network with a `features"):
        PlanCalibrator(pipe, kwargs, STEPS, progress=False, features=lambda images: images)


def test_trades_of_two_steps_actions_leave_no_trade_that_improves_the_plan():
    """With `trades`, after the chain, two steps swap their actions (a reuse moved to another step) while that lowers
    the measured error. On the digits DiT at half the compute of 8 steps, with reuse alone, that is what beats 4 plain
    steps (without trades the chain's plan loses to them: the test above); no single trade improves the plan returned
    (each trade run whole here)."""
    import numpy as np
    import torch

    from ee_diffusion.calibration import _computed

    pipe = load_early_exit_pipeline("digits-dit")
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = build_scheduler("dpm-solver++", pipe.scheduler.config)
    kwargs = {"class_labels": [0, 7], "guidance_scale": 1.0}
    result = calibrate_plan(
        pipe, kwargs, 8, target_compute=0.5, progress=False, candidates=1, actions=("reuse",), trades=True
    )
    assert result.lost is None and result.steps == 8 and result.error < result.fewer_steps.error

    def images(plan):
        pipe.exit_schedule = plan
        generator = torch.Generator().manual_seed(0)
        return np.asarray(pipe(**kwargs, num_inference_steps=8, generator=generator, output_type="np").images)

    reference = images(None)
    actions = tuple(result.plan.config.depths[::-1])  # a plan's depths run from the last step to the first
    for i in range(8):
        for j in range(i + 1, 8):
            if (
                actions[i] == actions[j]
                or (_computed(actions[i]) and _computed(actions[j]))
                or not (i or _computed(actions[j]))
            ):
                continue
            traded = list(actions)
            traded[i], traded[j] = actions[j], actions[i]
            plan = ExitSchedule.plan(
                12,
                result.timesteps,
                traded,
                num_train_timesteps=pipe.scheduler.config.num_train_timesteps,
                scheduler_class="DPMSolverMultistepScheduler",
                denoiser_class="DiTTransformer2DModel",
            )
            error = float(np.sqrt(np.mean((images(plan) - reference) ** 2)))
            assert error >= result.error - 1e-9, (traded, error, result.error)


def test_calibrate_command_with_the_frechet_error_and_trades_records_both(tmp_path, capsys):
    save_digits_shaped_dit(tmp_path / "model")
    out = tmp_path / "plan"
    argv = ["calibrate", "--model", str(tmp_path / "model"), "--steps", "3", "--target-compute", "0.5"]
    argv += ["--num-probes", "50", "--error", "digits", "--trades", "--out", str(out)]
    assert main(argv) == 0
    report = json.loads((out / "calibration.json").read_text())
    assert report["error_measure"] == "digits" and report["trades"] is True and report["num_probes"] == 50
    assert report["compute_fraction"] <= 0.5 and report["error"] > 0
    printed = capsys.readouterr().out
    assert f"final-image error {report['error']:.4f} (square root of the Fréchet distance of the digits" in printed
