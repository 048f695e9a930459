"""The shipped digits-flux-ase: digits-flux with its transformer ASE fine-tuned under an exit schedule, an
`EarlyExitFluxPipeline` folder that samples under it offline."""

import pytest
import torch

from ee_diffusion import EarlyExitFluxPipeline, load_early_exit_pipeline
from ee_diffusion.bench.noise_schedulers import build_scheduler, schedulers_for
from ee_diffusion.shipped import shipped_model_path
from ee_diffusion.training.digits_flux import DEFAULT_STEPS, digits_flux_accuracy

FOLDER = shipped_model_path("digits-flux-ase")
pytestmark = pytest.mark.skipif(FOLDER is None, reason="digits-flux-ase not shipped")


def load(name: str = "digits-flux-ase") -> EarlyExitFluxPipeline:
    pipe = load_early_exit_pipeline(name)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_digits_flux_ase_is_digits_flux_with_only_its_transformer_fine_tuned_under_its_schedule():
    files = {p.relative_to(FOLDER).as_posix() for p in FOLDER.rglob("*") if p.is_file()}
    assert not any(name.endswith("checkpoint.pt") for name in files) and "exit_schedule/exit_schedule.json" in files
    assert sum((FOLDER / name).stat().st_size for name in files) < 3 * 2**20
    pipe, base = load(), load("digits-flux")
    assert type(pipe) is EarlyExitFluxPipeline and pipe.exit_schedule.config.shape == "step"
    for part in ("vae", "text_encoder", "text_encoder_2"):
        assert all(
            torch.equal(a, b) for a, b in zip(getattr(pipe, part).parameters(), getattr(base, part).parameters())
        )
    tuned, own = pipe.transformer.state_dict(), base.transformer.state_dict()
    changed = {name for name in tuned if not torch.equal(tuned[name], own[name])}
    assert changed and not any("timestep_embedder" in name for name in changed)
    card = " ".join((FOLDER / "README.md").read_text().split())
    schedule = pipe.exit_schedule.describe()
    assert f"ee-diffusion finetune-ase --model digits-flux --schedule {schedule} --target teacher" in card
    for name in schedulers_for(pipe.scheduler.config):
        assert f"| {name} | {DEFAULT_STEPS} | 8 | off |" in card


def test_digits_flux_ase_runs_its_schedules_depths_at_any_step_count():
    pipe = load()
    for steps in (6, DEFAULT_STEPS):
        images = pipe(
            ["a handwritten seven", "a handwritten two"],
            height=32,
            width=32,
            num_inference_steps=steps,
            max_sequence_length=8,
            generator=torch.Generator().manual_seed(0),
            output_type="pt",
        ).images
        assert images.shape == (2, 1, 32, 32) and torch.isfinite(images).all()
        depths = pipe.exit_schedule.depths_for(pipe.scheduler.timesteps)
        assert pipe.exit_stats.blocks_per_call == depths and min(depths) < max(depths)
        assert (8 in depths) == (steps == DEFAULT_STEPS)  # full depth only near the clean end, past 6 steps' last


@pytest.mark.slow
@pytest.mark.parametrize("steps", [6, DEFAULT_STEPS])
@pytest.mark.parametrize("scheduler", ["dpm-solver++", "euler"])
def test_digits_flux_ase_samples_the_digits_asked_for_under_its_schedule(scheduler, steps):
    """500 samples (0..9 in turn, seed 0), unguided, 8 T5 tokens, under the model's own schedule: at least 95%
    recognised at the pipeline's default 28 steps and at the 6 steps of docs/results.md."""
    pipe = load()
    pipe.scheduler = build_scheduler(scheduler, pipe.scheduler.config)
    assert digits_flux_accuracy(pipe, num_samples=500, num_inference_steps=steps) >= 0.95
