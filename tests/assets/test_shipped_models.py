"""The models shipped in ee_diffusion/assets load offline and sample; their sizes and schedules are as promised."""

import json
from pathlib import Path

import pytest
import torch
from diffusers import DPMSolverMultistepScheduler

from ee_diffusion import EarlyExitDiTPipeline, EarlyExitUNet2DPipeline, load_early_exit_pipeline
from ee_diffusion.bench.noise_schedulers import SCHEDULERS, build_scheduler
from ee_diffusion.metrics import class_accuracy, load_digits_classifier
from ee_diffusion.pipelines import shipped_model_path

ASSETS = Path(__file__).resolve().parents[2] / "ee_diffusion" / "assets"
MODELS = {
    "digits-dit": EarlyExitDiTPipeline,
    "digits-dit-ase": EarlyExitDiTPipeline,
    "digits-unet": EarlyExitUNet2DPipeline,
    "digits-unet-ase": EarlyExitUNet2DPipeline,
}
SHIPPED = [name for name in MODELS if shipped_model_path(name) is not None]


def test_shipped_weights_are_small():
    files = [p for p in ASSETS.rglob("*.safetensors")]
    assert files
    assert sum(p.stat().st_size for p in files) < 25 * 2**20
    for folder in {p.parent.parent if p.parent.parent != ASSETS else p.parent for p in files}:
        assert (folder / "README.md").exists(), f"{folder.name} has no model card"


def test_no_shipped_config_names_the_folder_it_was_saved_from():
    """`_name_or_path` in a saved config is where the saving process loaded a component from (a path on another
    machine), not part of the model: the save functions drop it."""
    configs = [*ASSETS.glob("*/model_index.json"), *ASSETS.glob("*/*/config.json"), *ASSETS.glob("*/config.json")]
    assert len(configs) > 10
    assert [str(p.relative_to(ASSETS)) for p in configs if "_name_or_path" in json.loads(p.read_text())] == []


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_model_loads_offline_and_samples(name):
    pipe = load_early_exit_pipeline(name)
    assert type(pipe) is MODELS[name] and pipe.vae is None
    assert isinstance(pipe.scheduler, DPMSolverMultistepScheduler)
    pipe.set_progress_bar_config(disable=True)
    images = pipe(
        class_labels=[3, 7], num_inference_steps=4, generator=torch.Generator().manual_seed(0), output_type="pt"
    ).images
    assert images.shape == (2, 1, 32, 32) and torch.isfinite(images).all()


@pytest.mark.skipif("digits-dit-ase" not in SHIPPED, reason="digits-dit-ase not shipped yet")
def test_ase_model_schedule_runs_at_most_70_percent_of_blocks_over_50_dpm_steps():
    pipe = load_early_exit_pipeline("digits-dit-ase")
    assert pipe.exit_schedule is not None
    pipe.scheduler.set_timesteps(50)
    assert pipe.exit_schedule.compute_fraction(pipe.scheduler.timesteps) <= 0.70


def test_shipped_plan_runs_on_its_model_at_the_compute_its_calibration_measured():
    from ee_diffusion.bench.methods import Target, build_method

    pipe = load_early_exit_pipeline("digits-dit-ase")
    pipe.set_progress_bar_config(disable=True)
    own = pipe.exit_schedule
    folder = shipped_model_path("digits-dit-ase") / "plans" / "dpm-solver++-10"
    report = json.loads((folder / "calibration.json").read_text())
    assert (report["model"], report["scheduler"], report["steps"]) == ("digits-dit-ase", "dpm-solver++", 10)
    method = build_method("finetuned:digits-dit-ase:plans/dpm-solver++-10", Target("digits-dit", lambda _: pipe, 10))
    with method.session(pipe) as block_fraction:
        pipe(class_labels=[3, 7], guidance_scale=2.0, num_inference_steps=10, output_type="pt")
        assert block_fraction() == pytest.approx(report["compute_fraction"]) and report["compute_fraction"] < 0.5
    assert pipe.exit_schedule is own  # the model's own schedule is back


def shipped_heads_pipe():
    from ee_diffusion.exits import ExitHeads

    heads = ExitHeads.from_pretrained(shipped_model_path("digits-dit") / "exit_heads")
    pipe = EarlyExitDiTPipeline.from_pretrained(shipped_model_path("digits-dit"), exit_heads=heads)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_shipped_exit_heads_fit_digits_dit_and_exit_earlier_at_the_noisy_steps():
    pipe = shipped_heads_pipe()
    card = (shipped_model_path("digits-dit") / "exit_heads" / "README.md").read_text()
    assert "ee-diffusion train-uem --model digits-dit" in card
    pipe(
        class_labels=[3, 7],
        guidance_scale=2.0,
        num_inference_steps=10,
        output_type="pt",
        generator=torch.Generator().manual_seed(0),
    )
    profile = pipe.exit_stats.mean_depth_per_call
    # the run's first step runs every block (the default decision knows nothing before it), then the noisy steps exit
    # earlier than the clean ones
    assert len(profile) == 10 and profile[0] == 12 and profile[1] < profile[-1] and pipe.exit_stats.block_fraction < 1


@pytest.mark.slow
@pytest.mark.parametrize("steps", [10, 50])
@pytest.mark.parametrize("scheduler", list(SCHEDULERS))
def test_shipped_exit_heads_sample_the_digits_asked_for_under_every_bench_scheduler(scheduler, steps):
    """`digits-dit` with its exit heads at their own rule: 100 samples, guidance 2, at least 90% recognised."""
    pipe = shipped_heads_pipe()
    pipe.scheduler = build_scheduler(scheduler, pipe.scheduler.config)
    labels = torch.arange(100) % 10
    images = pipe(
        class_labels=labels.tolist(),
        guidance_scale=2.0,
        num_inference_steps=steps,
        generator=torch.Generator().manual_seed(0),
        output_type="pt",
    ).images
    assert pipe.exit_stats.block_fraction < 1
    assert class_accuracy(images, labels, load_digits_classifier()) >= 0.9


@pytest.mark.slow
@pytest.mark.parametrize("steps", [10, 25])
@pytest.mark.parametrize("scheduler", list(SCHEDULERS))
@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_model_samples_the_digits_asked_for_under_every_bench_scheduler(name, scheduler, steps):
    """100 samples, 10 and 25 steps of each scheduler the bench offers (built as the bench builds it), guidance 2:
    the feature network recognises at least 90% of them."""
    pipe = load_early_exit_pipeline(name)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = build_scheduler(scheduler, pipe.scheduler.config)
    labels = torch.arange(100) % 10
    images = pipe(
        class_labels=labels.tolist(),
        guidance_scale=2.0,
        num_inference_steps=steps,
        generator=torch.Generator().manual_seed(0),
        output_type="pt",
    ).images
    assert class_accuracy(images, labels, load_digits_classifier()) >= 0.9
