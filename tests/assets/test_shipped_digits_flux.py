"""The shipped digits-flux: a stock FluxPipeline folder that loads offline and samples the digits its prompts name."""

from pathlib import Path

import pytest
import torch
from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler, FluxPipeline

from ee_diffusion import load_early_exit_pipeline
from ee_diffusion.bench.noise_schedulers import build_scheduler, schedulers_for
from ee_diffusion.shipped import shipped_model_path
from ee_diffusion.training.digits_flux import DEFAULT_STEPS, digits_flux_accuracy

FOLDER = shipped_model_path("digits-flux")
pytestmark = pytest.mark.skipif(FOLDER is None, reason="digits-flux not shipped")


def load() -> FluxPipeline:
    pipe = DiffusionPipeline.from_pretrained(FOLDER)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_digits_flux_is_a_small_stock_flux_pipeline_with_its_card():
    assert FOLDER == Path(__file__).resolve().parents[2] / "ee_diffusion" / "assets" / "digits-flux"
    files = {p.relative_to(FOLDER).as_posix() for p in FOLDER.rglob("*") if p.is_file()}
    assert not any(name.endswith("checkpoint.pt") for name in files)
    assert sum((FOLDER / name).stat().st_size for name in files) < 3 * 2**20
    pipe = load()
    assert type(pipe) is FluxPipeline and isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler)
    assert pipe.vae_scale_factor == 4 and pipe.transformer.config.in_channels == 4 * pipe.vae.config.latent_channels
    assert pipe.transformer.config.num_layers >= 2 and pipe.transformer.config.num_single_layers >= 4
    card = (FOLDER / "README.md").read_text()
    assert "ee-diffusion train-flux --out out/digits-flux" in card and "cp -r out/digits-flux" in card
    for name in schedulers_for(pipe.scheduler.config):
        assert (
            f"| {name} | {DEFAULT_STEPS} | 8 | off |" in card and f"| {name} | {DEFAULT_STEPS} | 512 | off |" in card
        )


@pytest.mark.parametrize("name", ["digits-flux", "digits-flux-ase"])
def test_the_text_encoders_load_the_weights_their_files_hold(name):
    """On every transformers the package allows (5.0 reads a CLIP text model's weights only under `text_model.`)."""
    from safetensors.torch import load_file

    folder = shipped_model_path(name)
    pipe = load_early_exit_pipeline(name)
    for part in ("text_encoder", "text_encoder_2"):
        loaded = getattr(pipe, part).state_dict()
        for key, value in load_file(folder / part / "model.safetensors").items():
            assert torch.equal(loaded.get(key, loaded.get(key.removeprefix("text_model."))), value), (name, part, key)


def test_digits_flux_samples_32x32_digits_from_a_prompt_offline():
    pipe = load()
    images = pipe(
        ["a handwritten seven", "a handwritten two"],
        height=32,
        width=32,
        num_inference_steps=4,
        max_sequence_length=8,
        generator=torch.Generator().manual_seed(0),
        output_type="pt",
    ).images
    assert images.shape == (2, 1, 32, 32) and torch.isfinite(images).all() and images.std() > 0.1
    guided = pipe(
        "a handwritten seven",
        negative_prompt="",
        true_cfg_scale=2.0,
        height=32,
        width=32,
        num_inference_steps=2,
        output_type="pt",
    ).images  # the pipeline's default max_sequence_length: 512 T5 tokens
    assert guided.shape == (1, 1, 32, 32) and torch.isfinite(guided).all()


def test_the_bench_schedulers_that_fit_digits_flux_build_and_the_others_are_refused():
    pipe = load()
    assert schedulers_for(pipe.scheduler.config) == ["dpm-solver++", "euler"]
    for name in ("ddim", "ddpm"):
        with pytest.raises(ValueError, match="flow-matching"):
            build_scheduler(name, pipe.scheduler.config)


@pytest.mark.slow
@pytest.mark.parametrize("scheduler", ["dpm-solver++", "euler"])
def test_digits_flux_samples_the_digits_asked_for_at_its_default_steps(scheduler):
    """500 samples (0..9 in turn, seed 0) at the pipeline's default 28 steps, unguided, 8 T5 tokens: at least 95%
    recognised (the card's figures: 97.8% and 98.6%)."""
    pipe = load()
    pipe.scheduler = build_scheduler(scheduler, pipe.scheduler.config)
    assert digits_flux_accuracy(pipe, num_samples=500, num_inference_steps=DEFAULT_STEPS) >= 0.95


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_digits_flux_samples_the_digits_asked_for_at_the_pipelines_default_text_length():
    """The same at `FluxPipeline`'s default `max_sequence_length` of 512 T5 tokens (528 tokens per image, so 200
    samples of the shipped scheduler only)."""
    pipe = load()
    accuracy = digits_flux_accuracy(pipe, num_samples=200, num_inference_steps=DEFAULT_STEPS, max_sequence_length=512)
    assert accuracy >= 0.95
