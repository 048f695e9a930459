"""The drop-in early-exit pipelines: per-call depth, guidance batches, save/load, removal and errors.

Executed depth is measured with plain torch hooks (`DepthRecorder`), never read from the package's own counters; the
package's `pipe.exit_stats` is then checked against that measurement.
"""

from __future__ import annotations

import inspect
import json
import re

import pytest
import torch
from diffusers import DDIMScheduler, DDPMPipeline, DiTPipeline

import ee_diffusion
from ee_diffusion import (
    EarlyExitDDPMPipeline,
    EarlyExitDiTPipeline,
    ExitSchedule,
    apply_exit_schedule,
    exit_units,
    get_exit_schedule,
    load_early_exit_pipeline,
    num_exit_blocks,
    remove_exit_schedule,
)
from ee_diffusion.schedules import REUSE
from tests.conftest import assert_same_after_reload

from .conftest import (
    CASES,
    NUM_DIT_BLOCKS,
    NUM_UNET2D_UNITS,
    DepthRecorder,
    assert_depths_follow_schedule,
    decoder_units,
    images_of,
    make_ddpm_pipe,
    make_dit_pipe,
)

pytestmark = pytest.mark.timeout(60)

ALL = sorted(CASES)
GUIDED = sorted(name for name, case in CASES.items() if case.guided)


def run(pipe, case, **overrides) -> torch.Tensor:
    kwargs = case.inputs(**{k: overrides.pop(k) for k in ("batch", "guidance", "steps", "seed") if k in overrides})
    kwargs.update(overrides)
    return images_of(pipe(**kwargs))


# ---------------------------------------------------------------------------------------------- 1. depth per call
@pytest.mark.parametrize("name", ALL)
def test_exit_units_are_the_denoiser_blocks(name):
    """The units a schedule counts are the transformer blocks, or the U-Net decoder's resnets and attentions in
    execution order (derived here from the model structure)."""
    case = CASES[name]
    pipe = case.make()
    denoiser = pipe.unet if case.is_unet else pipe.transformer
    expected = decoder_units(denoiser) if case.is_unet else list(denoiser.transformer_blocks)
    units = exit_units(pipe)
    assert len(units) == case.num_units == num_exit_blocks(pipe)
    assert all(a is b for a, b in zip(units, expected))


@pytest.mark.parametrize("name", ALL)
def test_depth_per_call_follows_schedule(name):
    case = CASES[name]
    schedule = ExitSchedule.linear(num_blocks=case.num_units, min_blocks=1)
    pipe = case.make(exit_schedule=schedule)
    recorder = case.recorder(pipe)
    num_train_timesteps = pipe.scheduler.config.num_train_timesteps

    for _ in range(2):  # a second call starts a fresh record in `exit_stats`
        recorder.reset()
        images = run(pipe, case, steps=4)
        depths = assert_depths_follow_schedule(recorder, schedule, num_train_timesteps, pipe.exit_stats)
        timesteps = [call.timesteps[0] for call in recorder.calls]
        assert timesteps == pytest.approx(pipe.scheduler.timesteps.float().tolist(), abs=1e-4)
        assert len(set(depths)) >= 2, f"schedule did not vary over the run: {depths}"
        assert min(depths) < case.num_units
        assert torch.isfinite(images).all()

    # Without a schedule, the same instrument sees every unit run, in order, at every call.
    pipe.exit_schedule = None
    recorder.reset()
    run(pipe, case, steps=4)
    assert recorder.depths and all(call.ran == list(range(case.num_units)) for call in recorder.calls)
    assert pipe.exit_stats is None


@pytest.mark.parametrize("name", ALL)
def test_shallower_schedule_changes_the_output(name):
    case = CASES[name]
    pipe = case.make()
    reference = run(pipe, case, steps=3)
    pipe.exit_schedule = ExitSchedule.constant(case.num_units, 1)
    shallow = run(pipe, case, steps=3)
    assert shallow.shape == reference.shape
    assert not torch.equal(shallow, reference)


# ---------------------------------------------------------------------------------------------- 3. guidance batches
@pytest.mark.parametrize("name", GUIDED)
def test_guidance_batch_gets_one_depth_per_call(name):
    """Two prompts/classes with classifier-free guidance: the denoiser sees a batch of 4 in one call, which runs one
    depth (each unit exactly once), the depth of that call's timestep."""
    case = CASES[name]
    schedule = ExitSchedule.linear(num_blocks=case.num_units, min_blocks=1)
    pipe = case.make(exit_schedule=schedule)
    recorder = case.recorder(pipe)
    images = run(pipe, case, batch=2, guidance=True, steps=4)
    assert images.shape[0] == 2
    assert [call.batch for call in recorder.calls] == [4] * len(pipe.scheduler.timesteps)
    depths = assert_depths_follow_schedule(
        recorder, schedule, pipe.scheduler.config.num_train_timesteps, pipe.exit_stats
    )
    assert len(set(depths)) >= 2
    for call in pipe.exit_stats.calls:
        assert len(set(call.depths)) == 1


@pytest.mark.parametrize("name", GUIDED)
def test_guidance_batch_full_depth_is_bit_identical_and_shallower_differs(name):
    case = CASES[name]
    pipe = case.make()
    reference = run(pipe, case, batch=2, guidance=True, steps=3)

    pipe.exit_schedule = ExitSchedule.constant(case.num_units, case.num_units)
    recorder = case.recorder(pipe)
    full = run(pipe, case, batch=2, guidance=True, steps=3)
    assert all(call.ran == list(range(case.num_units)) for call in recorder.calls)
    assert torch.equal(full, reference)

    pipe.exit_schedule = ExitSchedule.constant(case.num_units, case.num_units - 1)
    shallower = run(pipe, case, batch=2, guidance=True, steps=3)
    assert not torch.equal(shallower, reference)
    assert (shallower - reference).abs().max() > 1e-6

    pipe.exit_schedule = None  # and back, on the same pipeline object
    assert torch.equal(run(pipe, case, batch=2, guidance=True, steps=3), reference)


# ---------------------------------------------------------------------------------------------- 4. save / load
def dit_kwargs(seed: int = 0) -> dict:
    return CASES["dit"].inputs(batch=1, steps=4, seed=seed)


def test_dit_save_load_round_trip(tmp_path):
    schedule = ExitSchedule.step(NUM_DIT_BLOCKS, [4, 3, 2, 1])
    pipe = make_dit_pipe(exit_schedule=schedule)
    original = images_of(pipe(**dit_kwargs()))
    pipe.save_pretrained(tmp_path)

    saved = tmp_path / "exit_schedule" / "exit_schedule.json"
    assert saved.is_file()
    assert json.loads(saved.read_text())["table"] == [4, 3, 2, 1]
    assert ExitSchedule.from_pretrained(tmp_path / "exit_schedule") == schedule
    assert json.loads((tmp_path / "model_index.json").read_text())["exit_schedule"][1] == "ExitSchedule"

    loaded = EarlyExitDiTPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert isinstance(loaded.exit_schedule, ExitSchedule)
    assert loaded.exit_schedule == schedule
    assert get_exit_schedule(loaded) == schedule  # applied at load time, not only stored
    recorder = DepthRecorder.for_transformer(loaded)
    assert_same_after_reload(images_of(loaded(**dit_kwargs())), original)
    depths = assert_depths_follow_schedule(recorder, schedule, 1000, loaded.exit_stats)
    assert len(set(depths)) >= 2


def test_dit_save_without_schedule_loads_none(tmp_path):
    pipe = make_dit_pipe()
    reference = images_of(pipe(**dit_kwargs()))
    pipe.save_pretrained(tmp_path)
    assert not (tmp_path / "exit_schedule" / "exit_schedule.json").exists()
    loaded = EarlyExitDiTPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert loaded.exit_schedule is None and get_exit_schedule(loaded) is None
    assert_same_after_reload(images_of(loaded(**dit_kwargs())), reference)


def test_schedule_assigned_after_construction_is_saved(tmp_path):
    pipe = make_dit_pipe()
    schedule = ExitSchedule.linear(NUM_DIT_BLOCKS, 2)
    pipe.exit_schedule = schedule  # where None stood: diffusers alone would record (None, None) and not save it
    pipe.save_pretrained(tmp_path)
    assert EarlyExitDiTPipeline.from_pretrained(tmp_path).exit_schedule == schedule
    recorder = DepthRecorder.for_transformer(pipe)
    pipe(**dit_kwargs())  # and it is applied at the next call
    assert_depths_follow_schedule(recorder, schedule, 1000, pipe.exit_stats)
    with pytest.raises(TypeError, match="must be an ExitSchedule or None, got str"):
        pipe.exit_schedule = "linear:2"


def test_load_folder_saved_by_plain_diffusers_pipeline(tmp_path):
    plain = make_dit_pipe(pipeline_cls=DiTPipeline)
    reference = images_of(plain(**dit_kwargs()))
    plain.save_pretrained(tmp_path)
    assert "exit_schedule" not in json.loads((tmp_path / "model_index.json").read_text())

    loaded = EarlyExitDiTPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert loaded.exit_schedule is None
    assert loaded.exit_stats is None
    recorder = DepthRecorder.for_transformer(loaded)
    assert_same_after_reload(images_of(loaded(**dit_kwargs())), reference)
    assert recorder.depths == [NUM_DIT_BLOCKS] * 4

    # ... and a schedule can be given at load time.
    schedule = ExitSchedule.linear(NUM_DIT_BLOCKS, 1)
    scheduled = EarlyExitDiTPipeline.from_pretrained(tmp_path, exit_schedule=schedule)
    scheduled.set_progress_bar_config(disable=True)
    recorder = DepthRecorder.for_transformer(scheduled)
    scheduled(**dit_kwargs())
    assert len(set(assert_depths_follow_schedule(recorder, schedule, 1000, scheduled.exit_stats))) >= 2


def test_from_pretrained_exit_schedule_overrides_saved_one(tmp_path):
    saved = ExitSchedule.linear(NUM_DIT_BLOCKS, 1)
    make_dit_pipe(exit_schedule=saved).save_pretrained(tmp_path)
    reference = images_of(make_dit_pipe()(**dit_kwargs()))

    override = ExitSchedule.constant(NUM_DIT_BLOCKS, 2)
    loaded = EarlyExitDiTPipeline.from_pretrained(tmp_path, exit_schedule=override)
    loaded.set_progress_bar_config(disable=True)
    assert loaded.exit_schedule == override and loaded.exit_schedule != saved
    recorder = DepthRecorder.for_transformer(loaded)
    loaded(**dit_kwargs())
    assert recorder.depths == [2] * 4
    assert_depths_follow_schedule(recorder, override, 1000, loaded.exit_stats)

    unscheduled = EarlyExitDiTPipeline.from_pretrained(tmp_path, exit_schedule=None)
    unscheduled.set_progress_bar_config(disable=True)
    assert unscheduled.exit_schedule is None and get_exit_schedule(unscheduled) is None
    assert_same_after_reload(images_of(unscheduled(**dit_kwargs())), reference)


@pytest.mark.parametrize("name", ALL)
def test_every_drop_in_saves_and_loads_its_schedule(name, tmp_path):
    case = CASES[name]
    schedule = ExitSchedule.linear(case.num_units, 1)
    pipe = case.make(exit_schedule=schedule)
    original = run(pipe, case, steps=3)
    pipe.save_pretrained(tmp_path)
    assert (tmp_path / "exit_schedule" / "exit_schedule.json").is_file()
    absent = {name: None for name, component in pipe.components.items() if component is None}  # as for stock
    loaded = type(pipe).from_pretrained(tmp_path, **absent)
    loaded.set_progress_bar_config(disable=True)
    assert loaded.exit_schedule == schedule
    recorder = case.recorder(loaded)
    assert_same_after_reload(run(loaded, case, steps=3), original)
    assert len(set(assert_depths_follow_schedule(recorder, schedule, 1000, loaded.exit_stats))) >= 2


def test_ddpm_save_load_round_trip(tmp_path):
    schedule = ExitSchedule.step(NUM_UNET2D_UNITS, [6, 4, 2])
    pipe = make_ddpm_pipe(exit_schedule=schedule)
    kwargs = dict(num_inference_steps=4, output_type="np")
    original = images_of(pipe(generator=torch.Generator().manual_seed(0), **kwargs))
    pipe.save_pretrained(tmp_path)
    assert (tmp_path / "exit_schedule" / "exit_schedule.json").is_file()

    loaded = EarlyExitDDPMPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert loaded.exit_schedule == schedule
    recorder = DepthRecorder.for_unet(loaded)
    assert_same_after_reload(images_of(loaded(generator=torch.Generator().manual_seed(0), **kwargs)), original)
    assert len(set(assert_depths_follow_schedule(recorder, schedule, 1000, loaded.exit_stats))) >= 2

    # A folder from plain diffusers loads without a schedule, and an explicit one overrides.
    plain_dir = tmp_path / "plain"
    make_ddpm_pipe(pipeline_cls=DDPMPipeline).save_pretrained(plain_dir)
    assert EarlyExitDDPMPipeline.from_pretrained(plain_dir).exit_schedule is None
    override = ExitSchedule.constant(NUM_UNET2D_UNITS, 3)
    assert EarlyExitDDPMPipeline.from_pretrained(tmp_path, exit_schedule=override).exit_schedule == override


def test_from_pipe_of_plain_diffusers_pipeline():
    plain = make_dit_pipe(pipeline_cls=DiTPipeline)
    schedule = ExitSchedule.linear(NUM_DIT_BLOCKS, 1)
    pipe = EarlyExitDiTPipeline.from_pipe(plain, exit_schedule=schedule)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.transformer is plain.transformer and pipe.exit_schedule == schedule
    recorder = DepthRecorder.for_transformer(pipe)
    pipe(**dit_kwargs())
    assert len(set(assert_depths_follow_schedule(recorder, schedule, 1000, pipe.exit_stats))) >= 2


# ---------------------------------------------------------------------------------------------- 5. removal
@pytest.mark.parametrize("name", ["dit", "ddpm", "sd"])
def test_exit_schedule_none_is_bit_identical_to_never_scheduled(name):
    case = CASES[name]
    never = run(case.make(), case, steps=3)

    pipe = case.make(exit_schedule=ExitSchedule.linear(case.num_units, 1))
    scheduled = run(pipe, case, steps=3)
    assert not torch.equal(scheduled, never)

    pipe.exit_schedule = None
    assert torch.equal(run(pipe, case, steps=3), never)
    assert get_exit_schedule(pipe) is None

    pipe.set_exit_schedule(ExitSchedule.linear(case.num_units, 1))
    assert torch.equal(run(pipe, case, steps=3), scheduled)
    pipe.set_exit_schedule(None)
    assert torch.equal(run(pipe, case, steps=3), never)


def test_remove_exit_schedule_on_plain_diffusers_pipeline_is_bit_identical():
    case = CASES["dit"]
    pipe = make_dit_pipe(pipeline_cls=DiTPipeline)
    never = run(pipe, case, steps=3)
    apply_exit_schedule(pipe, ExitSchedule.linear(NUM_DIT_BLOCKS, 1))
    assert not torch.equal(run(pipe, case, steps=3), never)
    remove_exit_schedule(pipe)
    assert get_exit_schedule(pipe) is None
    assert torch.equal(run(pipe, case, steps=3), never)


@pytest.mark.parametrize("name", ["dit", "ddpm"])
def test_remove_exit_schedule_on_dropin_pipeline_is_bit_identical(name):
    case = CASES[name]
    never = run(case.make(), case, steps=3)
    pipe = case.make(exit_schedule=ExitSchedule.linear(case.num_units, 1))
    assert not torch.equal(run(pipe, case, steps=3), never)
    remove_exit_schedule(pipe)
    assert torch.equal(run(pipe, case, steps=3), never)


def test_apply_exit_schedule_on_dropin_pipeline_is_honoured():
    schedule = ExitSchedule.constant(NUM_DIT_BLOCKS, 2)
    pipe = make_dit_pipe()
    apply_exit_schedule(pipe, schedule)
    recorder = DepthRecorder.for_transformer(pipe)
    pipe(**dit_kwargs())
    assert recorder.depths == [2] * 4


# ---------------------------------------------------------------------------------------------- 6. errors
def _names_both(message: str, a: int, b: int) -> bool:
    return re.search(rf"\b{a}\b", message) is not None and re.search(rf"\b{b}\b", message) is not None


@pytest.mark.parametrize("name", ALL)
def test_mismatched_num_blocks_raises_in_constructor(name):
    case = CASES[name]
    wrong = case.num_units + 3
    with pytest.raises(ValueError) as info:
        case.make(exit_schedule=ExitSchedule.constant(wrong, 1))
    assert _names_both(str(info.value), wrong, case.num_units), str(info.value)


def test_mismatched_num_blocks_raises_in_apply_and_set():
    pipe = make_dit_pipe()
    wrong = ExitSchedule.constant(7, 3)
    for apply in (lambda: apply_exit_schedule(pipe, wrong), lambda: pipe.set_exit_schedule(wrong)):
        with pytest.raises(ValueError) as info:
            apply()
        assert _names_both(str(info.value), 7, NUM_DIT_BLOCKS), str(info.value)
    with pytest.raises(ValueError) as info:
        apply_exit_schedule(make_ddpm_pipe(), ExitSchedule.constant(NUM_DIT_BLOCKS, 1))
    assert _names_both(str(info.value), NUM_DIT_BLOCKS, NUM_UNET2D_UNITS), str(info.value)


def test_mismatched_num_blocks_raises_in_from_pretrained(tmp_path):
    make_dit_pipe().save_pretrained(tmp_path)
    with pytest.raises(ValueError) as info:
        EarlyExitDiTPipeline.from_pretrained(tmp_path, exit_schedule=ExitSchedule.constant(9, 3))
    assert _names_both(str(info.value), 9, NUM_DIT_BLOCKS), str(info.value)


@pytest.mark.parametrize("bad", ["linear", 3, DDIMScheduler()], ids=["str", "int", "scheduler"])
def test_non_schedule_raises_type_error(bad):
    with pytest.raises(TypeError):
        make_dit_pipe(exit_schedule=bad)
    with pytest.raises(TypeError):
        make_ddpm_pipe(exit_schedule=bad)
    pipe = make_dit_pipe()
    with pytest.raises(TypeError):
        pipe.set_exit_schedule(bad)
    with pytest.raises(TypeError):
        apply_exit_schedule(pipe, bad)
    with pytest.raises(TypeError):
        ee_diffusion.apply_exit_schedule(pipe.transformer, bad)


def test_non_schedule_assigned_or_loaded_raises_type_error(tmp_path):
    pipe = make_dit_pipe()
    with pytest.raises(TypeError, match="got DDIMScheduler"):
        pipe.exit_schedule = DDIMScheduler()  # a SchedulerMixin, so diffusers' own setattr would accept it
    make_dit_pipe().save_pretrained(tmp_path)
    with pytest.raises(TypeError):
        EarlyExitDiTPipeline.from_pretrained(tmp_path, exit_schedule=DDIMScheduler())


@pytest.mark.parametrize(
    "drop_in, parent",
    [
        (ee_diffusion.EarlyExitPixArtAlphaPipeline, "PixArtAlphaPipeline"),
        (ee_diffusion.EarlyExitStableDiffusion3Pipeline, "StableDiffusion3Pipeline"),
        (ee_diffusion.EarlyExitDDPMPipeline, "DDPMPipeline"),
        (ee_diffusion.EarlyExitDDIMPipeline, "DDIMPipeline"),
        (ee_diffusion.EarlyExitStableDiffusionPipeline, "StableDiffusionPipeline"),
        (ee_diffusion.EarlyExitFluxPipeline, "FluxPipeline"),
    ],
)
def test_drop_in_call_shows_the_parent_signature(drop_in, parent):
    import diffusers

    stock = getattr(diffusers, parent).__call__
    assert (
        inspect.signature(drop_in.__call__) == inspect.signature(stock) and drop_in.__call__.__doc__ == stock.__doc__
    )


def test_dit_drop_in_call_shows_its_own_loop_signature():
    parameters = inspect.signature(EarlyExitDiTPipeline.__call__).parameters
    assert list(parameters)[1:4] == ["class_labels", "guidance_scale", "generator"]


# ---------------------------------------------------------------------------------------------- 7. drop-in
@pytest.mark.parametrize("name", ALL)
def test_components_build_the_parent_without_a_schedule_and_carry_a_set_one(name):
    """diffusers' way to share components: `Parent(**pipe.components)`. Without a schedule the drop-in's components
    are the parent's; with one they carry it to another drop-in, and the stock parent refuses it by name."""
    case = CASES[name]
    pipe = case.make()
    parent = next(base for base in type(pipe).__mro__ if base.__module__.startswith("diffusers."))
    stock = parent(**pipe.components)
    denoiser = "unet" if case.is_unet else "transformer"
    assert getattr(stock, denoiser) is getattr(pipe, denoiser) and "exit_schedule" not in pipe.components

    schedule = ExitSchedule.linear(case.num_units, 1)
    scheduled = case.make(exit_schedule=schedule)
    assert type(scheduled)(**scheduled.components).exit_schedule == schedule
    with pytest.raises(TypeError, match="exit_schedule"):
        parent(**scheduled.components)
    assert type(parent.from_pipe(scheduled)) is parent


@pytest.mark.parametrize("name", ALL)
def test_drop_in_builds_without_its_denoiser_but_refuses_a_schedule_then(name):
    case = CASES[name]
    denoiser = "unet" if case.is_unet else "transformer"
    components = {**case.make().components, denoiser: None}
    pipe = type(case.make())(**components)
    assert getattr(pipe, denoiser) is None and pipe.exit_schedule is None
    with pytest.raises(ValueError, match="has no denoiser to run `exit_schedule` or `exit_heads` on"):
        type(pipe)(**components, exit_schedule=ExitSchedule.linear(case.num_units, 1))


@pytest.mark.parametrize("scheduler", ["ddim", "dpm-solver++"])
@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_dit_drop_in_with_a_vae_is_bit_identical_to_stock_dit_pipeline(scheduler, guidance):
    from ee_diffusion.bench.noise_schedulers import build_scheduler

    stock, drop_in = make_dit_pipe(pipeline_cls=DiTPipeline), make_dit_pipe(exit_schedule=ExitSchedule.linear(4, 4))
    for pipe in (stock, drop_in):
        pipe.scheduler = build_scheduler(scheduler, pipe.scheduler.config)
    kwargs = dict(class_labels=[3, 999], guidance_scale=guidance, num_inference_steps=4, output_type="np")
    expected = stock(**kwargs, generator=torch.Generator().manual_seed(0)).images
    assert (drop_in(**kwargs, generator=torch.Generator().manual_seed(0)).images == expected).all()


def test_dit_drop_in_latent_output_is_what_it_decodes():
    pipe = make_dit_pipe()
    kwargs = dict(class_labels=[3, 7], num_inference_steps=3)
    latents = pipe(**kwargs, generator=torch.Generator().manual_seed(0), output_type="latent").images
    images = pipe(**kwargs, generator=torch.Generator().manual_seed(0), output_type="pt").images
    assert latents.shape == (2, 4, 8, 8)
    with torch.no_grad():
        decoded = pipe.vae.decode(1 / pipe.vae.config.scaling_factor * latents).sample
    assert torch.equal((decoded / 2 + 0.5).clamp(0, 1), images)


def test_dit_drop_in_stochastic_steps_follow_the_generator():
    """Where `DiTPipeline` draws DDPM's noise from torch's global random state, the drop-in draws it from
    `generator`: the same generator gives the same images whatever the global state."""
    from diffusers import DDPMScheduler

    pipe = make_dit_pipe()
    pipe.scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    images = []
    for global_seed in (1, 2):
        torch.manual_seed(global_seed)
        images.append(
            pipe(
                class_labels=[3], num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="pt"
            ).images
        )
    assert torch.equal(*images)


# ---------------------------------------------------------------------------------------------- 8. Flux
FLUX_WORDS = ["<pad>", "<unk>", "</s>", "<s>", "a", "cat", "on", "the", "mat", "blurry"]


def word_tokenizer(max_length: int):
    """A word-level tokenizer over `FLUX_WORDS`, built in code (diffusers' own tests download tiny ones)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.WordLevel({word: i for i, word in enumerate(FLUX_WORDS)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token="<pad>",
        unk_token="<unk>",
        eos_token="</s>",
        bos_token="<s>",
        model_max_length=max_length,
    )


def make_flux_pipe(pipeline_cls=None, **kwargs):
    """A `FluxPipeline` of tiny parts: CLIP and T5 text encoders and a one-level VAE from configs, word tokenizers, and
    the two-double, two-single-block transformer of `tests/exits/families.py`."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from tests.exits.families import make_flux

    vocab = dict(vocab_size=len(FLUX_WORDS), pad_token_id=0, eos_token_id=2)
    torch.manual_seed(0)
    clip = CLIPTextModel(
        CLIPTextConfig(
            **vocab,
            bos_token_id=3,
            hidden_size=16,
            intermediate_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=8,
            projection_dim=16,
        )
    ).eval()
    torch.manual_seed(0)
    t5 = T5EncoderModel(
        T5Config(**vocab, d_model=16, d_ff=16, d_kv=8, num_layers=1, num_heads=2, relative_attention_num_buckets=8)
    ).eval()
    torch.manual_seed(0)
    vae = AutoencoderKL(
        sample_size=32,
        in_channels=3,
        out_channels=3,
        block_out_channels=(4,),
        layers_per_block=1,
        latent_channels=1,
        norm_num_groups=1,
        use_quant_conv=False,
        use_post_quant_conv=False,
        shift_factor=0.0609,
        scaling_factor=1.5035,
    ).eval()
    pipe = (pipeline_cls or FluxPipeline)(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=vae,
        text_encoder=clip,
        tokenizer=word_tokenizer(8),
        text_encoder_2=t5,
        tokenizer_2=word_tokenizer(8),
        transformer=make_flux(),
        **kwargs,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def flux_kwargs(steps: int = 3, true_cfg: bool = False) -> dict:
    kwargs = dict(
        prompt="a cat on the mat",
        height=8,
        width=8,
        num_inference_steps=steps,
        max_sequence_length=8,
        generator=torch.Generator().manual_seed(0),
        output_type="pt",
    )
    if true_cfg:  # two transformer calls per step, under `cache_context("cond")` and `("uncond")`
        kwargs.update(negative_prompt="blurry", true_cfg_scale=2.0)
    return kwargs


def flux_recorder(pipe) -> DepthRecorder:
    return DepthRecorder(
        pipe.transformer, [*pipe.transformer.transformer_blocks, *pipe.transformer.single_transformer_blocks]
    )


def test_a_flux_pipeline_folder_loads_as_the_flux_drop_in_and_samples_with_a_plan(tmp_path):
    """A stock `FluxPipeline` folder opens as `EarlyExitFluxPipeline`; a plan made from the scheduler's timesteps (the
    transformer receives them divided by 1000) runs as planned with true CFG, each branch reusing its own work, and
    travels in the folder."""
    stock = make_flux_pipe()
    reference = stock(**flux_kwargs()).images
    guided = stock(**flux_kwargs(true_cfg=True)).images
    steps = stock.scheduler.timesteps.tolist()
    assert steps[0] == 1000 and len(steps) == 3
    stock.save_pretrained(tmp_path / "stock")

    pipe = load_early_exit_pipeline(str(tmp_path / "stock"))
    assert type(pipe) is ee_diffusion.EarlyExitFluxPipeline and pipe.exit_schedule is None
    pipe.set_progress_bar_config(disable=True)
    assert_same_after_reload(pipe(**flux_kwargs()).images, reference)
    num_blocks = num_exit_blocks(pipe)
    assert num_blocks == 4
    plan = ExitSchedule.plan(num_blocks, steps, [num_blocks, REUSE, 2], scheduler_class=type(pipe.scheduler).__name__)
    pipe.exit_schedule = plan
    recorder = flux_recorder(pipe)
    planned = pipe(**flux_kwargs(true_cfg=True)).images
    assert recorder.depths == [4, 4, 0, 0, 2, 2]
    assert [call.timesteps[0] * 1000 for call in recorder.calls] == pytest.approx([t for t in steps for _ in "cu"])
    stats = pipe.exit_stats
    assert [call.branch for call in stats.calls] == ["cond", "uncond"] * 3
    assert [call.timesteps[0] for call in stats.calls] == pytest.approx([t for t in steps for _ in "cu"], abs=1e-3)
    assert not torch.equal(planned, guided)
    with pytest.raises(ValueError, match="made for 3 steps of FlowMatchEulerDiscreteScheduler; the run asks for 4"):
        pipe(**flux_kwargs(steps=4))

    pipe.save_pretrained(tmp_path / "planned")
    loaded = load_early_exit_pipeline(str(tmp_path / "planned"))
    loaded.set_progress_bar_config(disable=True)
    assert type(loaded) is ee_diffusion.EarlyExitFluxPipeline and loaded.exit_schedule == plan
    assert_same_after_reload(loaded(**flux_kwargs(true_cfg=True)).images, planned)


def test_apply_exit_schedule_on_a_stock_flux_pipeline_then_removal_is_bit_identical():
    pipe = make_flux_pipe()
    never = pipe(**flux_kwargs(true_cfg=True)).images
    apply_exit_schedule(pipe, ExitSchedule.linear(4, 1))
    recorder = flux_recorder(pipe)
    assert not torch.equal(pipe(**flux_kwargs(true_cfg=True)).images, never)
    assert recorder.depths == [1, 1, 2, 2, 3, 3]  # t = 1000, 667, 333: linear from 1 block at noise to 4 when clean
    remove_exit_schedule(pipe)
    assert get_exit_schedule(pipe) is None
    assert torch.equal(pipe(**flux_kwargs(true_cfg=True)).images, never)


def test_calibrating_a_plan_through_flux_with_true_cfg():
    """The calibrator records the plan's steps as the scheduler's timesteps whatever the transformer receives (Flux:
    t / 1000), and counts the two calls of a true-CFG step as one step; the plan it returns runs at its steps."""
    from ee_diffusion import calibrate_plan

    pipe = make_flux_pipe()
    kwargs = flux_kwargs(steps=3, true_cfg=True)
    for key in ("num_inference_steps", "generator", "output_type"):
        kwargs.pop(key)
    result = calibrate_plan(pipe, kwargs, 3, target_compute=0.5, progress=False, candidates=1)
    pipe(**flux_kwargs(steps=3, true_cfg=True))  # the scheduler's own timesteps of a 3-step run, not t / 1000
    assert list(result.timesteps) == pytest.approx(pipe.scheduler.timesteps.tolist()) and result.timesteps[0] > 1
    assert result.compute_fraction <= 0.5
    apply_exit_schedule(pipe, result.plan)
    recorder = flux_recorder(pipe)
    pipe(**flux_kwargs(steps=3, true_cfg=True))
    blocks = num_exit_blocks(pipe)
    assert sum(recorder.depths) / (2 * 3 * blocks) == pytest.approx(result.compute_fraction)  # two calls a step
