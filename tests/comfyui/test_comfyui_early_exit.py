"""The ComfyUI node's logic (`ee_diffusion.comfyui_exits`) against a stand-in of ComfyUI's ModelPatcher and tiny
models whose forward honours `patches_replace["dit"]`: which blocks run at each sigma is counted by forward hooks on
the blocks."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from comfy_standin import APPLY_MODEL, DIFFUSION_MODEL, make_patcher, predict

from ee_diffusion import ExitSchedule
from ee_diffusion.comfyui_exits import (
    WRAPPER_KEY,
    apply_comfyui_exit_schedule,
    comfy_blocks,
    early_exit_node,
    sigma_to_position,
)

SIGMAS = [1.0, 0.93, 0.81, 0.66, 0.5, 0.37, 0.21, 0.08, 0.02]
FLUX_ORDER = [f"double_blocks.{i}" for i in range(3)] + [f"single_blocks.{i}" for i in range(5)]


def _inputs(batch: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return torch.randn(batch, 4, 8, generator=generator), torch.randn(batch, 3, 8, generator=generator)


def _ran(patcher, sigma: float, model_options=None) -> list[str]:
    """Names of the blocks that ran in one model call, from forward hooks on the blocks themselves."""
    diffusion_model = patcher.get_model_object("diffusion_model")
    ran, handles = [], []
    for name, module in diffusion_model.named_modules():
        if name.count(".") == 1 and name.split(".")[0].endswith("blocks"):
            handles.append(module.register_forward_hook(lambda m, a, o, name=name: ran.append(name)))
    try:
        x, context = _inputs()
        predict(patcher, x, sigma, context, model_options)
    finally:
        for handle in handles:
            handle.remove()
    return ran


def _expected(order: list[str], depth: int, always: set[str]) -> list[str]:
    return [name for i, name in enumerate(order) if i < depth or name in always]


@pytest.mark.parametrize("shape", ["linear", "cosine", "constant"])
def test_flux_blocks_run_per_sigma_as_the_schedule_says(shape):
    patcher = make_patcher("flux", "flow")
    patched = early_exit_node(patcher, shape, 0.25)
    schedule = ExitSchedule(num_blocks=8, shape=shape, min_blocks=2)  # round(0.25 * 8)
    for sigma in SIGMAS:
        depth = schedule.depth_at_position(sigma)  # a flow model's position is its sigma
        assert _ran(patched, sigma) == _expected(FLUX_ORDER, depth, {"double_blocks.2", "single_blocks.4"}), sigma
    assert _ran(patched, 1.0) == ["double_blocks.0", "double_blocks.1", "double_blocks.2", "single_blocks.4"]


def test_depth_ending_in_the_double_stream_keeps_each_streams_last_block():
    patched = apply_comfyui_exit_schedule(make_patcher("flux", "flow"), ExitSchedule.constant(8, 1))
    assert _ran(patched, 0.5) == ["double_blocks.0", "double_blocks.2", "single_blocks.4"]


def test_single_stream_mmdit_keeps_its_last_block():
    patched = apply_comfyui_exit_schedule(make_patcher("mmdit", "flow"), ExitSchedule.step(6, [6, 4, 2]))
    assert _ran(patched, 0.1) == [f"joint_blocks.{i}" for i in range(6)]
    assert _ran(patched, 0.5) == [f"joint_blocks.{i}" for i in (0, 1, 2, 3, 5)]
    assert _ran(patched, 0.9) == ["joint_blocks.0", "joint_blocks.1", "joint_blocks.5"]


def test_position_follows_each_model_samplings_own_timestep():
    discrete = make_patcher("flux", "discrete").get_model_object("model_sampling")
    flux = make_patcher("flux", "flux").get_model_object("model_sampling")
    flow = make_patcher("flux", "flow").get_model_object("model_sampling")
    assert sigma_to_position(flow, 0.3) == pytest.approx(0.3)  # t = 1000 sigma, 1000 training steps
    assert sigma_to_position(flux, 0.3) == pytest.approx(0.3)  # t = sigma
    for index in (0, 250, 999):  # a discrete schedule's t is the index of the nearest training sigma
        assert sigma_to_position(discrete, float(discrete.sigmas[index])) == pytest.approx(index / 1000)


@pytest.mark.parametrize("sampling", ["flux", "discrete"])
def test_blocks_per_sigma_on_flux_and_discrete_samplings(sampling):
    patcher = make_patcher("flux", sampling)
    model_sampling = patcher.get_model_object("model_sampling")
    patched = early_exit_node(patcher, "linear", 0.25)
    schedule = ExitSchedule.linear(8, 2)
    sigmas = [float(model_sampling.sigmas[i]) for i in (999, 700, 400, 100, 0)]
    for sigma in sigmas:
        if sampling == "discrete":
            position = int((torch.tensor(sigma).log() - model_sampling.log_sigmas).abs().argmin()) / 1000
        else:
            position = sigma
        expected = _expected(FLUX_ORDER, schedule.depth_at_position(position), {"double_blocks.2", "single_blocks.4"})
        assert _ran(patched, sigma) == expected


def test_full_depth_gives_the_unpatched_output_bit_for_bit():
    patcher = make_patcher("flux", "flow")
    patched = early_exit_node(patcher, "constant", 1.0)
    x, context = _inputs()
    for sigma in SIGMAS:
        assert torch.equal(predict(patched, x, sigma, context), predict(patcher, x, sigma, context))
        assert _ran(patched, sigma) == FLUX_ORDER


def test_skipping_changes_the_output_and_only_at_noisy_steps():
    patcher = make_patcher("flux", "flow")
    patched = early_exit_node(patcher, "linear", 0.25)
    x, context = _inputs()
    assert not torch.equal(predict(patched, x, 1.0, context), predict(patcher, x, 1.0, context))
    assert torch.equal(predict(patched, x, 0.0, context), predict(patcher, x, 0.0, context))  # s = 0: all blocks


def test_the_input_model_is_untouched():
    patcher = make_patcher("flux", "flow")
    patcher.set_model_patch_replace(lambda args, extra: extra["original_block"](args), "dit", "double_block", 1)
    options, wrappers = copy.deepcopy(patcher.model_options), copy.deepcopy(patcher.wrappers)
    patched = early_exit_node(patcher, "linear", 0.25)
    assert patched is not patcher and patched.model is patcher.model
    assert patcher.model_options == options and patcher.wrappers == wrappers
    assert patched.model_options == options  # the node adds a keyed wrapper, no model option
    assert list(patched.wrappers) == [APPLY_MODEL] and list(patched.wrappers[APPLY_MODEL]) == [WRAPPER_KEY]
    assert _ran(patcher, 1.0) == FLUX_ORDER


def test_applying_again_replaces_the_wrapper_instead_of_stacking():
    twice = early_exit_node(early_exit_node(make_patcher("flux", "flow"), "constant", 0.25), "constant", 1.0)
    assert len(twice.get_wrappers(APPLY_MODEL, WRAPPER_KEY)) == 1
    assert _ran(twice, 1.0) == FLUX_ORDER


def test_start_and_end_percent_bound_where_blocks_are_skipped():
    patcher = make_patcher("flux", "flow")
    model_sampling = patcher.get_model_object("model_sampling")
    patched = early_exit_node(patcher, "constant", 0.25, start_percent=0.2, end_percent=0.6)
    sigma_start, sigma_end = model_sampling.percent_to_sigma(0.2), model_sampling.percent_to_sigma(0.6)
    for sigma in SIGMAS:
        ran = _ran(patched, sigma)
        assert (ran == FLUX_ORDER) == (not sigma_end <= sigma <= sigma_start), sigma


def test_a_second_patch_on_the_same_model_still_applies():
    calls = {"replacement": 0, "wrapper": 0}

    def skip(args, extra):  # SkipLayerGuidance's replacement
        return args

    def around(args, extra):  # another node's replacement of a block the schedule skips: kept, the block skipped
        calls["replacement"] += 1
        return extra["original_block"](args)

    def counting_wrapper(executor, *args, **kwargs):  # EasyCache-like keyed wrapper
        calls["wrapper"] += 1
        return executor(*args, **kwargs)

    for order in ("before", "after"):
        calls.update(replacement=0, wrapper=0)
        patcher = make_patcher("flux", "flow")
        if order == "after":
            patcher = early_exit_node(patcher, "constant", 0.5)
        patcher = patcher.clone()
        patcher.set_model_patch_replace(skip, "dit", "double_block", 0)
        patcher.set_model_patch_replace(around, "dit", "single_block", 3)
        patcher.add_wrapper_with_key(DIFFUSION_MODEL, "easycache", counting_wrapper)
        if order == "before":
            patcher = early_exit_node(patcher, "constant", 0.5)
        # depth 4 of 8: double 0-2 and single 0 run, then single 4 (last of its stream); SLG skips double 0
        assert _ran(patcher, 0.5) == ["double_blocks.1", "double_blocks.2", "single_blocks.0", "single_blocks.4"]
        assert calls == {"replacement": 1, "wrapper": 1}, order


def test_slg_style_extra_pass_with_its_own_model_options_keeps_the_schedule():
    patched = early_exit_node(make_patcher("flux", "flow"), "constant", 0.5)
    options = copy.deepcopy(patched.model_options)  # SLG copies args["model_options"] and adds its skips
    options["transformer_options"]["patches_replace"] = {"dit": {("double_block", 1): lambda args, extra: args}}
    assert _ran(patched, 0.5, options) == ["double_blocks.0", "double_blocks.2", "single_blocks.0", "single_blocks.4"]


def test_a_saved_schedule_folder_is_used(tmp_path):
    ExitSchedule.step(8, [8, 6, 4, 2]).save_pretrained(tmp_path)
    patched = early_exit_node(make_patcher("flux", "flow"), "linear", 1.0, schedule_folder=str(tmp_path))
    assert _ran(patched, 0.9) == ["double_blocks.0", "double_blocks.1", "double_blocks.2", "single_blocks.4"]
    assert _ran(patched, 0.1) == FLUX_ORDER


def test_comfy_blocks_of_each_stream():
    blocks = comfy_blocks(make_patcher("flux").get_model_object("diffusion_model"))
    assert blocks.num_blocks == 8 and blocks.stream_sizes == (3, 5)
    assert blocks.always_run == {("double_block", 2), ("single_block", 4)}
    assert blocks.describe() == "Flux, 8 blocks (3 double_block + 5 single_block)"


def test_an_unsupported_model_is_refused_naming_the_supported_ones():
    with pytest.raises(ValueError, match=r"UNetModel.*Supported families: Flux, Chroma.*SD3.*Wan.*Qwen-Image.*LTXV"):
        early_exit_node(make_patcher("unet"), "linear", 0.5)


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"min_depth_fraction": 0.0}, ValueError, r"min_depth_fraction.*\(0, 1\].*0\.0"),
        ({"min_depth_fraction": 1.5}, ValueError, r"min_depth_fraction.*\(0, 1\].*1\.5"),
        ({"min_depth_fraction": math.nan}, ValueError, r"min_depth_fraction"),
        ({"min_depth_fraction": "half"}, TypeError, r"min_depth_fraction.*'half'"),
        ({"start_percent": -0.1}, ValueError, r"start_percent.*\[0, 1\].*-0\.1"),
        ({"end_percent": 1.2}, ValueError, r"end_percent.*\[0, 1\].*1\.2"),
        ({"start_percent": 0.7, "end_percent": 0.3}, ValueError, r"start_percent.*0\.7.*end_percent.*0\.3"),
        ({"shape": "step"}, ValueError, r"shape.*linear.*cosine.*constant.*'step'"),
        ({"schedule_folder": "/no/such/folder"}, ValueError, r"/no/such/folder.*not a folder"),
    ],
)
def test_bad_inputs_are_refused_clearly(kwargs, error, message):
    patcher = make_patcher("flux", "flow")
    with pytest.raises(error, match=message):
        early_exit_node(patcher, **{"shape": "linear", "min_depth_fraction": 0.5, **kwargs})


def test_bad_schedules_are_refused_clearly(tmp_path):
    patcher = make_patcher("flux", "flow")
    with pytest.raises(ValueError, match=r"holds no exit_schedule\.json"):
        early_exit_node(patcher, schedule_folder=str(tmp_path))
    ExitSchedule.linear(28, 14).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"made for 28 blocks.*Flux, 8 blocks \(3 double_block \+ 5 single_block\)"):
        early_exit_node(patcher, schedule_folder=str(tmp_path))
    for actions in ([8, 0, 4], [8, 6, 4]):  # a plan, with reuse steps or without, is made for a diffusers run
        with pytest.raises(ValueError, match=r"The exit schedule is a plan: one action per step"):
            apply_comfyui_exit_schedule(patcher, ExitSchedule.plan(8, [999, 500, 1], actions))
    with pytest.raises(TypeError, match=r"ModelPatcher.*got BaseModel"):
        apply_comfyui_exit_schedule(patcher.model, "linear:0.5")
