"""Class-conditional pixel-space pipelines (no VAE): DiT and UNet2DModel, guidance with the model's null class."""

import json
import re

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DiTPipeline, DiTTransformer2DModel, DPMSolverMultistepScheduler, UNet2DModel

from ee_diffusion import (
    EarlyExitDiTPipeline,
    EarlyExitUNet2DPipeline,
    ExitSchedule,
    load_early_exit_pipeline,
    num_exit_blocks,
)
from ee_diffusion.pipelines.class_conditional import null_class_label
from tests.conftest import assert_same_after_reload

from .conftest import DepthRecorder, assert_depths_follow_schedule, make_dit_pipe


def pixel_dit(seed: int = 0) -> DiTTransformer2DModel:
    torch.manual_seed(seed)
    return DiTTransformer2DModel(
        in_channels=1,
        out_channels=1,
        sample_size=8,
        patch_size=2,
        num_layers=4,
        num_attention_heads=2,
        attention_head_dim=8,
        num_embeds_ada_norm=10,
    ).eval()


def pixel_unet(seed: int = 0) -> UNet2DModel:
    torch.manual_seed(seed)
    return UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        layers_per_block=1,
        block_out_channels=(8, 16),
        norm_num_groups=4,
        attention_head_dim=8,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        num_class_embeds=11,
    ).eval()


def make_pipe(kind: str, exit_schedule=None):
    scheduler = DPMSolverMultistepScheduler(num_train_timesteps=1000)
    if kind == "dit":
        pipe = EarlyExitDiTPipeline(
            transformer=pixel_dit(), vae=None, scheduler=scheduler, exit_schedule=exit_schedule
        )
    else:
        pipe = EarlyExitUNet2DPipeline(unet=pixel_unet(), scheduler=scheduler, exit_schedule=exit_schedule)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def denoiser_of(pipe):
    return pipe.transformer if isinstance(pipe, EarlyExitDiTPipeline) else pipe.unet


def run(pipe, guidance_scale=1.0, labels=(1, 2), steps=4, output_type="pt"):
    generator = torch.Generator().manual_seed(0)
    return pipe(
        class_labels=list(labels),
        guidance_scale=guidance_scale,
        generator=generator,
        num_inference_steps=steps,
        output_type=output_type,
    ).images


def manual_loop(pipe, labels, steps=4, guidance_scale=1.0):
    """The sampling loop written out by hand: noise, scheduler steps with the denoiser, pixels mapped to [0, 1]."""
    denoiser, scheduler = denoiser_of(pipe), pipe.scheduler
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(len(labels), 1, 8, 8, generator=generator)
    scheduler.set_timesteps(steps)
    labels = torch.tensor(labels)
    null = torch.full_like(labels, null_class_label(denoiser))
    with torch.no_grad():
        for t in scheduler.timesteps:
            eps = denoiser(x, t.expand(len(x)), class_labels=labels).sample
            if guidance_scale > 1:
                uncond = denoiser(x, t.expand(len(x)), class_labels=null).sample
                eps = uncond + guidance_scale * (eps - uncond)
            x = scheduler.step(eps, t, x).prev_sample
    return (x / 2 + 0.5).clamp(0, 1)


@pytest.mark.parametrize("kind", ["dit", "unet"])
@pytest.mark.parametrize("guidance_scale", [1.0, 3.0])
def test_pixel_space_pipeline_returns_the_denoised_pixels(kind, guidance_scale):
    pipe = make_pipe(kind)
    images = run(pipe, guidance_scale)
    assert images.shape == (2, 1, 8, 8) and images.min() >= 0 and images.max() <= 1
    assert torch.allclose(images, manual_loop(pipe, [1, 2], guidance_scale=guidance_scale), atol=1e-5)
    assert run(pipe, output_type="np").shape == (2, 8, 8, 1)
    assert len(run(pipe, output_type="pil")) == 2


@pytest.mark.parametrize("kind, null", [("dit", 10), ("unet", 10)])
def test_guidance_uses_the_models_null_class(kind, null):
    pipe = make_pipe(kind)
    seen = []
    denoiser_of(pipe).register_forward_pre_hook(
        lambda m, a, kw: seen.append(kw["class_labels"].tolist()), with_kwargs=True
    )
    run(pipe, guidance_scale=4.0, labels=(3, 7))
    assert seen and all(labels == [3, 7, null, null] for labels in seen)
    assert null_class_label(denoiser_of(pipe)) == null


def test_null_class_needs_a_class_conditional_model():
    torch.manual_seed(0)
    unconditional = UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        layers_per_block=1,
        block_out_channels=(8, 16),
        norm_num_groups=4,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
    )
    with pytest.raises(TypeError, match="not a class-conditional"):
        null_class_label(unconditional)


@pytest.mark.parametrize("kind", ["dit", "unet"])
def test_schedule_depths_and_save_load_round_trip_without_vae(kind, tmp_path):
    pipe = make_pipe(kind)
    schedule = ExitSchedule.linear(num_exit_blocks(pipe), 1)
    pipe.exit_schedule = schedule
    units = list(pipe.transformer.transformer_blocks) if kind == "dit" else None
    recorder = DepthRecorder(pipe.transformer, units) if kind == "dit" else DepthRecorder.for_unet(pipe)
    images = run(pipe)
    assert_depths_follow_schedule(recorder, schedule, 1000, pipe.exit_stats)
    recorder.remove()

    pipe.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["vae"] == [None, None] and not (tmp_path / "vae").exists()
    for loaded in (type(pipe).from_pretrained(tmp_path), load_early_exit_pipeline(str(tmp_path))):
        assert type(loaded) is type(pipe) and loaded.vae is None and loaded.exit_schedule == schedule
        loaded.set_progress_bar_config(disable=True)
        assert_same_after_reload(run(loaded), images)


def test_loader_opens_diffusers_parent_folders_and_refuses_others(tmp_path):
    make_dit_pipe(pipeline_cls=DiTPipeline).save_pretrained(tmp_path / "dit")
    assert type(load_early_exit_pipeline(str(tmp_path / "dit"))) is EarlyExitDiTPipeline
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "model_index.json").write_text(json.dumps({"_class_name": "WanPipeline"}))
    with pytest.raises(ValueError, match="holds a WanPipeline; supported pipeline classes: .*EarlyExitDiTPipeline"):
        load_early_exit_pipeline(str(tmp_path / "other"))


def test_other_schedulers_drive_the_same_loop():
    pipe = make_pipe("unet")
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    assert torch.allclose(run(pipe), manual_loop(pipe, [1, 2]), atol=1e-5)


def test_shipped_names_resolve_offline_and_unknown_names_fail_at_once(tmp_path):
    from ee_diffusion import MaskedDiffusionLMPipeline, load_early_exit_pipeline
    from ee_diffusion.pipelines.loading import resolve_pretrained
    from ee_diffusion.shipped import SHIPPED_MODELS_DIR, shipped_models

    assert {"digits-dit", "digits-dit-ase", "digits-unet", "digits-unet-ase"} <= set(shipped_models())
    assert shipped_models("tokenizer.json") == ["tiny-mdlm", "tiny-mdlm-puzzles"]
    assert resolve_pretrained("facebook/DiT-XL-2-256") == "facebook/DiT-XL-2-256"  # a hub id is left to the hub
    assert resolve_pretrained(tmp_path) == str(tmp_path)
    for load, name, shipped in (
        (load_early_exit_pipeline, "digits-ditt", "digits-dit, digits-dit-ase"),
        (MaskedDiffusionLMPipeline.from_pretrained, "tiny-mlm", "tiny-mdlm"),
        (load_early_exit_pipeline, str(tmp_path / "nowhere"), "digits-unet"),
    ):
        with pytest.raises(
            ValueError, match=f"No model '{re.escape(name)}': it is not a shipped model \\(.*{shipped}"
        ):
            load(name)
    with pytest.raises(ValueError, match="not a diffusers pipeline folder"):
        load_early_exit_pipeline(str(SHIPPED_MODELS_DIR / "tiny-mdlm"))


@pytest.mark.parametrize("kind", ["dit", "unet"])
@pytest.mark.parametrize(
    "call, error, match",
    [
        (
            dict(class_labels=[10]),
            ValueError,
            r"in \[0, 9\] \(this model has 10 classes; 10 is its null class\), got \[10\]",
        ),
        (dict(class_labels=[1, -1]), ValueError, r"got \[-1\]"),
        (dict(class_labels=[]), ValueError, "`class_labels` is empty"),
        (dict(class_labels=[1.5]), TypeError, "integer class ids"),
        (dict(num_inference_steps=0), ValueError, "`num_inference_steps` must be an integer >= 1, got 0"),
        (dict(num_inference_steps=2.5), TypeError, "`num_inference_steps` must be an integer, got 2.5"),
        (dict(guidance_scale=float("nan")), ValueError, "`guidance_scale` must be a finite number, got nan"),
        (dict(output_type="tensor"), ValueError, "`output_type` must be"),
    ],
)
def test_bad_call_arguments_raise_before_sampling(kind, call, error, match):
    pipe = make_pipe(kind)
    calls = []
    denoiser_of(pipe).register_forward_pre_hook(lambda *_: calls.append(1))
    with pytest.raises(error, match=match):
        pipe(**{"class_labels": [1], "num_inference_steps": 2, **call})
    assert calls == []  # refused before any denoiser work
    assert run(pipe, labels=np.array([0, 9]), steps=np.int64(2)).shape[0] == 2  # numpy integers are accepted
