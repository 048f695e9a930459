"""Exit depth and reuse on the families beyond DiT, PixArt and the U-Nets: Flux, Chroma, Flux2, Wan (2.1 and 2.2's two
experts), Qwen-Image, HunyuanVideo, LTX-Video, CogVideoX, Sana, Z-Image and SD3.5.

Tiny models built from configs (`tests/exits/families.py`); what really ran is counted with plain torch hooks on each
block's attention, and the hidden states entering the first block and reaching the output layer are read with torch
pre-hooks, never from the package's own counters. Timesteps are given as each pipeline hands them to its model (Flux's
`t / 1000`, Z-Image's `(1000 - t) / 1000`), written in `families.py` from the pipelines' source.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline, WanPipeline

from ee_diffusion import (
    ExitSchedule,
    apply_exit_schedule,
    calibrate_plan,
    exit_units,
    get_exit_schedule,
    get_exit_stats,
    num_exit_blocks,
    remove_exit_schedule,
)
from ee_diffusion.schedules import REUSE, cached_tail
from tests.exits.families import BATCH, FAMILIES, Recorder, make_wan
from tests.host_reads import HostReads

pytestmark = pytest.mark.timeout(120)

NAMES = sorted(FAMILIES)
HALF = sorted(name for name, family in FAMILIES.items() if family.half_timestep)


# ---------------------------------------------------------------------------------------------- units and depth
@pytest.mark.parametrize("name", NAMES)
def test_units_and_executed_depth_follow_the_schedule_at_the_schedulers_timestep(name):
    """The units are the model's blocks in the order its forward runs them (double-stream first), and each call runs
    the first `schedule.blocks_at(t)` of them, `t` the scheduler's timestep whatever the model receives: read on a
    0-1000 scale, Flux's `t / 1000` would look clean at every step and never exit, and Z-Image's reversed time would
    exit at the clean end."""
    family = FAMILIES[name]
    model = family.make()
    units = family.units(model)
    num_units = len(units)
    assert exit_units(model) == units and num_exit_blocks(model) == num_units >= 3
    schedule = ExitSchedule.linear(num_units, 1)
    apply_exit_schedule(model, schedule)
    recorder = Recorder(family, model)
    timesteps = (1000.0, 500.0, 0.0)
    for step, t in enumerate(timesteps):
        family.call(model, t, latents_seed=step)
    expected = [schedule.blocks_at(t) for t in timesteps]
    assert expected[0] == 1 and expected[-1] == num_units
    assert [call.ran for call in recorder.calls] == [list(range(depth)) for depth in expected]
    stats = get_exit_stats(model)
    assert stats.blocks_per_call == expected
    for call, t in zip(stats.calls, timesteps):
        assert call.timesteps == pytest.approx((t,) * BATCH, abs=1e-3)


@pytest.mark.parametrize("name", NAMES)
def test_full_depth_and_removal_are_bit_identical(name):
    family = FAMILIES[name]
    model = family.make()
    num_units = len(family.units(model))
    reference = family.call(model, 600.0)
    assert torch.equal(family.call(model, 600.0), reference)  # the plain model is bit-stable
    apply_exit_schedule(model, ExitSchedule.constant(num_units, num_units))
    assert torch.equal(family.call(model, 600.0), reference)
    apply_exit_schedule(model, ExitSchedule.constant(num_units, 1))
    assert not torch.equal(family.call(model, 600.0), reference)
    remove_exit_schedule(model)
    assert get_exit_schedule(model) is None
    assert torch.equal(family.call(model, 600.0), reference)


def test_modules_that_are_not_units_always_run():
    """HunyuanVideo's token refiner and Z-Image's noise and context refiners are not exit units: at depth 1 they
    still run."""
    counts = {}
    for name, refiners in (
        ("hunyuan-video", ["context_embedder.token_refiner.refiner_blocks.0.attn"]),
        ("z-image", ["noise_refiner.0.attention", "context_refiner.0.attention"]),
    ):
        family = FAMILIES[name]
        model = family.make()
        apply_exit_schedule(model, ExitSchedule.constant(len(family.units(model)), 1))
        for path in refiners:
            model.get_submodule(path).register_forward_hook(lambda *_, path=path: counts.__setitem__(path, 1))
        recorder = Recorder(family, model)
        family.call(model, 500.0)
        assert recorder.depths == [1]
    assert sorted(counts) == sorted(
        [
            "context_embedder.token_refiner.refiner_blocks.0.attn",
            "noise_refiner.0.attention",
            "context_refiner.0.attention",
        ]
    )


def test_per_token_timesteps_take_each_samples_noisiest_token():
    """Wan 2.2 TI2V (`expand_timesteps`) hands the model a timestep per token, 0 on a conditioning frame."""
    family = FAMILIES["wan"]
    model = family.make()
    schedule = ExitSchedule.step(3, [3, 2, 1])
    apply_exit_schedule(model, schedule)
    recorder = Recorder(family, model)
    per_token = torch.full((BATCH, 8), 900.0)
    per_token[:, :4] = 0.0  # the first latent frame: the clean conditioning image
    per_token[1] = 400.0
    with torch.no_grad():
        model(**{**family.inputs(per_token, 0, 1), "timestep": per_token})
    assert get_exit_stats(model).calls[0].depths == (1, 2)
    assert recorder.calls[0].ran == [0, 1]  # to the deepest sample


# ---------------------------------------------------------------------------------------------- reuse, per branch
@pytest.mark.parametrize("name", NAMES)
def test_a_reuse_step_runs_no_block_and_adds_its_own_branchs_residual(name):
    """Two calls per step, as true CFG makes them: conditional and unconditional, the same latents, their own
    conditioning. At the reuse step each adds the change its own branch's last computed call made across the blocks
    -- keyed by diffusers' `cache_context` name where the model has one (the reuse step calls `uncond` first, so call
    order would pick the wrong one), by the call's place in its step otherwise."""
    family = FAMILIES[name]
    model = family.make()
    num_units = len(family.units(model))
    steps = (1000.0, 800.0, 600.0)
    apply_exit_schedule(model, ExitSchedule.plan(num_units, steps, [num_units, REUSE, 1]))
    recorder = Recorder(family, model)
    seeds = {"cond": 1, "uncond": 2}
    orders = [("cond", "uncond"), ("uncond", "cond"), ("cond", "uncond")] if family.cache_context else None
    made = {}
    for step, t in enumerate(steps):
        for branch in orders[step] if orders else ("cond", "uncond"):
            context = model.cache_context(branch) if orders else contextlib.nullcontext()
            with context:
                family.call(model, t, latents_seed=10 + step, condition_seed=seeds[branch])
            made[step, branch] = recorder.calls[-1]

    assert recorder.depths == [num_units, num_units, 0, 0, 1, 1]
    for branch, other in (("cond", "uncond"), ("uncond", "cond")):
        computed, reused = made[0, branch], made[1, branch]
        assert torch.equal(reused.end, reused.start + (computed.end - computed.start))
        wrong = made[0, other]
        assert not torch.equal(reused.end, reused.start + (wrong.end - wrong.start))
    branches = [call.branch for call in get_exit_stats(model).calls]
    assert branches == (["cond", "uncond", "uncond", "cond", "cond", "uncond"] if orders else [0, 1] * 3)


@pytest.mark.parametrize("name", NAMES)
def test_a_cached_tail_step_runs_its_first_blocks_and_adds_its_own_branchs_tail_change(name):
    """DBCache's shape: at the tail step each branch runs its first `k` units (the first stream of a double-stream
    model, one unit otherwise), and what reaches the output layer is what entered unit `k` plus the change its own
    branch's last computed call made from unit `k` on (the image tokens, where the model slices them out of a joined
    sequence)."""
    family = FAMILIES[name]
    model = family.make()
    units = family.units(model)
    first_stream = len(getattr(model, family.streams[0]))
    k = first_stream if len(family.streams) == 2 and first_stream < len(units) else 1
    steps = (1000.0, 800.0)
    apply_exit_schedule(model, ExitSchedule.plan(len(units), steps, [len(units), cached_tail(k)]))
    recorder = Recorder(family, model)
    key = "x" if family.sample_key == "x" else "hidden_states"
    entering = []
    units[k].register_forward_pre_hook(
        lambda module, args, kwargs: entering.append(kwargs[key] if key in kwargs else args[0]), with_kwargs=True
    )
    made = {}
    for step, t in enumerate(steps):
        reverse = step and family.cache_context  # by name the order does not matter; by place it is the branch
        for branch, seed in (("uncond", 2), ("cond", 1)) if reverse else (("cond", 1), ("uncond", 2)):
            context = model.cache_context(branch) if family.cache_context else contextlib.nullcontext()
            with context:
                family.call(model, t, latents_seed=10 + step, condition_seed=seed)
            made[step, branch] = (recorder.calls[-1].end, entering[-1])

    assert recorder.depths == [len(units)] * 2 + [k] * 2
    for branch in ("cond", "uncond"):
        (computed_end, computed_in), (tail_end, tail_in) = made[0, branch], made[1, branch]
        image = slice(computed_in.shape[1] - computed_end.shape[1], None)  # the image tokens of a joined sequence
        assert torch.equal(tail_end, tail_in[:, image] + (computed_end - computed_in[:, image]))


# ---------------------------------------------------------------------------------------------- plans and timesteps
def _flow_timesteps(steps: int) -> list[float]:
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(steps)
    return scheduler.timesteps.tolist()


@pytest.mark.parametrize("name", NAMES)
def test_a_plan_refuses_the_timesteps_of_another_step_count(name):
    family = FAMILIES[name]
    model = family.make()
    num_units = len(family.units(model))
    steps = _flow_timesteps(4)
    plan = ExitSchedule.plan(num_units, steps, [num_units, REUSE, 1, num_units])
    apply_exit_schedule(model, plan)
    recorder = Recorder(family, model)
    family.call(model, steps[1])  # the plan's own step, in the model's convention: matched (nothing cached: full)
    assert recorder.depths == [num_units]
    other = _flow_timesteps(5)[1]
    with pytest.raises(ValueError, match=rf"Timestep {other:g} is not a step of this plan, made for the 4 timesteps"):
        family.call(model, other)
    with pytest.raises(ValueError, match="made for 4 steps of its scheduler; the run asks for 5 steps"):
        plan.check_run("FlowMatchEulerDiscreteScheduler", 5)


@pytest.mark.parametrize("name", HALF)
def test_a_half_precision_timestep_is_taken_as_the_plan_step_it_was_rounded_from(name):
    """Flux's, Chroma's, Flux2's, Qwen-Image's and HunyuanVideo's pipelines cast the timestep to the latents' dtype
    (bf16 on a GPU) before dividing it: a plan made from `scheduler.timesteps` still matches its steps."""
    family = FAMILIES[name]
    model = family.make()
    num_units = len(family.units(model))
    steps = _flow_timesteps(4)
    actions = [num_units, 1, 2, 1]
    apply_exit_schedule(model, ExitSchedule.plan(num_units, steps, actions))
    recorder = Recorder(family, model)
    per_unit = abs(family.to_model(1000.0) - family.to_model(0.0)) / 1000  # model units per scheduler unit
    rounding = []
    for step, t in enumerate(steps):
        timestep = family.to_model(torch.full((BATCH,), t).to(torch.bfloat16))  # the pipeline's arithmetic
        rounding.append(abs(float(timestep[0]) - family.to_model(t)) / per_unit)
        with torch.no_grad():
            model(**family.inputs(timestep, step, 1))
    assert max(rounding) > 0.5  # far beyond the plan's tolerance for float noise (0.1 of 1000)
    assert recorder.depths == actions
    assert [call.timesteps[0] for call in get_exit_stats(model).calls] == pytest.approx(steps, abs=1e-3)


def test_host_reads_per_call_are_the_one_timestep_read():
    """The depth decision reads the timestep on the host once per denoiser call; the exit hooks add no other read
    (counted against the same calls without them), under a plan with reuse steps too."""
    for name in ("flux", "wan", "z-image"):
        family = FAMILIES[name]
        model = family.make()
        num_units = len(family.units(model))
        steps = (1000.0, 500.0)
        with HostReads(model) as plain:
            for t in steps:
                family.call(model, t)
        apply_exit_schedule(model, ExitSchedule.plan(num_units, steps, [num_units, REUSE]))
        with HostReads(model) as hooked:
            for t in steps:
                family.call(model, t)
        assert get_exit_stats(model).blocks_per_call == [num_units, 0]
        assert [h - p for h, p in zip(hooked.per_call, plain.per_call)] == [1, 1], (name, hooked.kinds, plain.kinds)


# ---------------------------------------------------------------------------------------------- Wan 2.2, two experts
def make_wan_pipe() -> WanPipeline:
    pipe = WanPipeline(
        tokenizer=None,
        text_encoder=None,
        vae=None,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=1.0),
        transformer=make_wan(0),
        transformer_2=make_wan(1),
        boundary_ratio=0.5,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def wan_call_kwargs(steps: int = 5) -> dict:
    generator = torch.Generator().manual_seed(3)
    return dict(
        guidance_scale_2=3.0,
        prompt_embeds=torch.randn(1, 5, 16, generator=generator),
        negative_prompt_embeds=torch.randn(1, 5, 16, generator=generator),
        height=32,
        width=32,
        num_frames=5,
        guidance_scale=4.0,
        num_inference_steps=steps,
        generator=torch.Generator().manual_seed(0),
        output_type="latent",
    )


def test_wan_2_2_experts_follow_one_plan_across_the_boundary_each_reusing_its_own_work():
    """5 steps at t = 1000, 750, 500, 251, 1 with the boundary at 500: the high-noise `transformer` takes the first
    three, `transformer_2` the last two, with CFG (two calls per step). One plan covers all five steps; the first
    low-noise step's reuse has nothing of `transformer_2` to reuse and runs at full depth, the next reuses
    `transformer_2`'s own residual."""
    pipe = make_wan_pipe()
    never = pipe(**wan_call_kwargs()).frames
    steps = pipe.scheduler.timesteps.tolist()
    assert [t >= 500 for t in steps] == [True] * 3 + [False] * 2
    family = FAMILIES["wan"]
    plan = ExitSchedule.plan(3, steps, [3, REUSE, 2, REUSE, REUSE])
    apply_exit_schedule(pipe, plan)
    high, low = Recorder(family, pipe.transformer), Recorder(family, pipe.transformer_2)
    planned = pipe(**wan_call_kwargs()).frames

    assert high.depths == [3, 3, 0, 0, 2, 2] and low.depths == [3, 3, 0, 0]
    stats = get_exit_stats(pipe)
    assert [call.denoiser for call in stats.calls] == ["transformer"] * 6 + ["transformer_2"] * 4
    assert [call.branch for call in stats.calls] == ["cond", "uncond"] * 5
    assert stats.blocks_per_call == high.depths + low.depths
    for branch in (0, 1):  # cond, uncond
        computed, reused = low.calls[branch], low.calls[2 + branch]
        assert torch.equal(reused.end, reused.start + (computed.end - computed.start))
    assert not torch.equal(planned, never)

    with pytest.raises(ValueError, match="is not a step of this plan, made for the 5 timesteps"):
        pipe(**wan_call_kwargs(steps=4))
    remove_exit_schedule(pipe)
    assert get_exit_schedule(pipe) is None and get_exit_schedule(pipe.transformer_2) is None
    assert torch.equal(pipe(**wan_call_kwargs()).frames, never)


def test_calibrating_a_plan_through_a_stock_sd35_pipeline():
    """The calibrator drives any pipeline's own call: here a stock `StableDiffusion3Pipeline` with SD3.5's transformer
    (dual attention, qk norm), guided in one batched call per step."""
    torch.manual_seed(0)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(4, 8),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=2,
        sample_size=16,
        shift_factor=0.0609,
        scaling_factor=1.5035,
        use_quant_conv=False,
        use_post_quant_conv=False,
    ).eval()
    components = dict.fromkeys(("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"), None)
    components.update(text_encoder_3=None, tokenizer_3=None)
    pipe = StableDiffusion3Pipeline(
        transformer=FAMILIES["sd3.5"].make(),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=vae,
        **components,
    )
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(1)
    kwargs = dict(
        prompt_embeds=torch.randn(2, 5, 16, generator=generator),
        negative_prompt_embeds=torch.randn(2, 5, 16, generator=generator),
        pooled_prompt_embeds=torch.randn(2, 16, generator=generator),
        negative_pooled_prompt_embeds=torch.randn(2, 16, generator=generator),
        guidance_scale=5.0,
    )
    result = calibrate_plan(pipe, kwargs, 2, target_compute=0.5, progress=False)
    assert result.compute_fraction <= 0.5 and list(result.timesteps) == pytest.approx(_flow_timesteps(2))
    assert get_exit_schedule(pipe) is None  # left as it was found
    apply_exit_schedule(pipe, result.plan)
    recorder = Recorder(FAMILIES["sd3.5"], pipe.transformer)
    pipe(**kwargs, num_inference_steps=2, generator=torch.Generator().manual_seed(0))
    assert sum(recorder.depths) / (2 * 3) == pytest.approx(result.compute_fraction)


def test_a_schedule_for_another_depth_names_the_expert():
    pipe = make_wan_pipe()
    with pytest.raises(ValueError, match=r"num_blocks=4, but this WanTransformer3DModel \(`transformer`\) has 3"):
        apply_exit_schedule(pipe, ExitSchedule.linear(4, 1))
    assert get_exit_schedule(pipe) is None and get_exit_schedule(pipe.transformer_2) is None
