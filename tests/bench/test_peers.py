"""The peers the bench runs beside ours (the `peers` extra): cache-dit's DBCache kinds and DeepCache, on tiny models.

Each is counted by the bench's own counters beneath its patches (a block it skips does not count), and taken off after
every session with the model left as it was: the same images, and the same modules, attributes and children. Their
tests skip, saying why, where the package is not installed (`make test-lower-bounds`).
"""

from __future__ import annotations

import contextlib
import sys

import pytest
import torch
from diffusers import DDPMScheduler, UNet2DModel

from ee_diffusion.bench.harness import BenchConfig, run_bench
from ee_diffusion.bench.methods import BUILDERS, Target, build_method
from ee_diffusion.pipelines import EarlyExitUNet2DPipeline
from tests.bench.test_methods import make_test_pipe, sample
from tests.pipelines.conftest import make_sd_pipe, sd_inputs


@pytest.fixture(scope="module")
def cache_dit():
    return pytest.importorskip("cache_dit", reason="cache-dit is not installed (the peers extra)")


@pytest.fixture(scope="module")
def deepcache():
    return pytest.importorskip("DeepCache", reason="DeepCache is not installed (the peers extra)")


def _target(name: str, pipe, steps: int = 8) -> Target:
    return Target(name, lambda model: pipe, steps)


def _modules(model: torch.nn.Module) -> list:
    """Per module: its instance attributes (diffusers' hook registry aside), whether its `forward` is its class's own,
    and its children in order; then the model's weights by name, in order."""
    state = []
    for name, module in model.named_modules():
        forward = vars(module).get("forward")
        own = forward is None or getattr(forward, "__func__", None) is type(module).forward
        state.append((name, sorted(set(vars(module)) - {"_diffusers_hook", "forward"}), own, list(module._modules)))
    return [state, list(model.state_dict())]


@pytest.mark.parametrize("model", ["dit", "pixart", "sd3", "flux"])
def test_dbcache_counts_the_blocks_it_runs_and_comes_off_bit_for_bit(cache_dit, model):
    pipe = make_test_pipe(model)
    denoiser = pipe.transformer
    before, _ = sample(pipe, steps=6)
    modules = _modules(denoiser)
    never, never_work = sample(pipe, build_method("dbcache:1e-9:1:0:0", _target(model, pipe, 6)), steps=6)
    cached, work = sample(pipe, build_method("dbcache:1000:1:0:0", _target(model, pipe, 6)), steps=6)
    after, _ = sample(pipe, steps=6)
    assert torch.equal(never, before) and never_work() == 1.0
    # From the second step on, only the first block of each block list runs (Fn=1): the rest come from the cache.
    depths = work.depths()
    assert depths[0] == max(depths) and all(depth < depths[0] for depth in depths[1:]) and work() < 0.6
    assert not torch.equal(cached, before)
    assert torch.equal(after, before) and _modules(denoiser) == modules


def test_dbcache_counts_exactly_the_blocks_cache_dit_runs(cache_dit):
    """On the 4-block DiT, Fn=2 and Bn=1: a cached step runs 3 blocks, the 2 warmup steps all 4."""
    pipe = make_test_pipe("dit")
    images, work = sample(pipe, build_method("dbcache:1000:2:1:2", _target("dit", pipe)), guidance=1.0)
    assert work.depths() == [4, 4, 3, 3, 3, 3, 3, 3]


def test_dbcache_taylorseer_forecasts_what_dbcache_reuses(cache_dit):
    pipe = make_test_pipe("dit")
    plain, plain_work = sample(pipe, build_method("dbcache:1000", _target("dit", pipe)))
    forecast, work = sample(pipe, build_method("dbcache-taylorseer:1:1000", _target("dit", pipe)))
    assert work.depths() == plain_work.depths() and work() < 1.0  # the same steps cached ...
    assert not torch.equal(forecast, plain)  # ... but a first-order forecast of the cached residual


def test_dbcache_scm_runs_the_steps_of_cache_dits_mask(cache_dit):
    pipe = make_test_pipe("dit")
    images, work = sample(pipe, build_method("dbcache-scm:fast-static", _target("dit", pipe)))
    mask = cache_dit.steps_mask(mask_policy="fast", total_steps=8)
    assert 0 in mask and work.depths() == [4 if compute else 1 for compute in mask]


def test_cache_dit_leaves_the_pipeline_class_alone(cache_dit):
    """cache-dit wraps a pipeline class's `__call__` when given the pipeline; the bench gives it the denoiser alone."""
    pipe = make_test_pipe("dit")
    call = type(pipe).__dict__["__call__"]
    method = build_method("dbcache", _target("dit", pipe))
    with method.session(pipe):
        assert type(pipe).__dict__["__call__"] is call and not hasattr(type(pipe), "_is_cached")


def _unet_pipe() -> EarlyExitUNet2DPipeline:
    """A tiny class-conditional U-Net (10 classes and the null one), attention at the lower level."""
    torch.manual_seed(0)
    unet = UNet2DModel(
        sample_size=8,
        in_channels=3,
        out_channels=3,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        num_class_embeds=11,
        norm_num_groups=4,
        attention_head_dim=4,
    ).eval()
    pipe = EarlyExitUNet2DPipeline(unet=unet, scheduler=DDPMScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_cache_dit_rows_say_where_it_does_not_apply(cache_dit):
    unet = _unet_pipe()
    for spec in ["dbcache", "dbcache-taylorseer", "dbcache-scm"]:
        assert (
            "cache-dit has no block adapter for UNet2DModel" in build_method(spec, _target("unet", unet)).unsupported
        )
    dit = make_test_pipe("dit")
    assert "at 4 it caches none" in build_method("dbcache", _target("dit", dit, 4)).unsupported  # 4 warmup steps
    assert "not 5" in build_method("dbcache-scm", _target("dit", dit, 5)).unsupported
    with pytest.raises(ValueError, match=r"has 4 blocks, so Fn \+ Bn must be at most 3 .* got 3 \+ 1"):
        build_method("dbcache:0.1:3:1", _target("dit", dit))


def test_dbcache_rows_in_the_bench(cache_dit):
    config = BenchConfig(
        model="random:dit-tiny",
        methods=["baseline", "dbcache:1000:1:0:0", "dbcache-taylorseer:1:1000:1:0:2"],
        num_samples=2,
        batch_size=2,
        steps=4,
        repeats=1,
    )
    baseline, dbcache, taylorseer = run_bench(config, progress=False)
    assert baseline.block_fraction == 1.0 and dbcache.note is None is taylorseer.note
    assert dbcache.block_fraction == pytest.approx((4 + 3 * 1) / (4 * 4))  # all 4 blocks once, then the first
    assert taylorseer.block_fraction == pytest.approx((4 + 4 + 2 * 1) / (4 * 4))  # 2 warmup steps


def test_deepcache_on_a_stable_diffusion_unet(deepcache):
    """DeepCache's own case, a text-conditioned UNet2DConditionModel in diffusers' Stable Diffusion pipeline: it runs
    on diffusers 0.42. Its work is counted on the U-Net's exit units (the decoder's resnets and attentions)."""
    pipe = make_sd_pipe()

    def run(method=None):
        with method.session(pipe) if method is not None else contextlib.nullcontext() as work:
            images = pipe(
                **sd_inputs(batch=2),
                guidance_scale=3.0,
                num_inference_steps=6,
                output_type="latent",
                generator=torch.Generator().manual_seed(0),
            ).images
        return images, work

    before, _ = run()
    modules = _modules(pipe.unet)
    never, never_work = run(BUILDERS["deepcache"]((1, 0), "deepcache:1", _target("sd", pipe, 6)))  # every step
    cached, work = run(build_method("deepcache", _target("sd", pipe, 6)))
    after, _ = run()
    assert torch.equal(never, before) and never_work() == 1.0
    depths = work.depths()  # every 3rd step in full; in between, the decoder units above branch 0 only
    assert depths[0] == depths[3] == 6 and depths[1] == depths[2] == depths[4] == depths[5] < 6
    assert not torch.equal(cached, before) and torch.equal(after, before) and _modules(pipe.unet) == modules


def test_deepcache_on_the_class_conditional_unet_passes_it_one_timestep(deepcache):
    """Our class-conditional pipelines hand the U-Net one timestep per sample, and DeepCache's helper reads it as one
    number: by itself it fails there. The method hands it the batch's one timestep as a 0-d tensor, which UNet2DModel
    broadcasts to the same values."""
    pipe = _unet_pipe()
    helper = deepcache.DeepCacheSDHelper(pipe=pipe)
    helper.set_params(cache_interval=3, cache_branch_id=0)
    helper.enable()
    try:
        with pytest.raises(RuntimeError, match="a Tensor with 3 elements cannot be converted to Scalar"):
            sample(pipe, steps=2, guidance=1.0)
    finally:
        helper.disable()
    before, _ = sample(pipe, steps=6)
    never, never_work = sample(pipe, BUILDERS["deepcache"]((1, 0), "deepcache:1", _target("unet", pipe, 6)), 6)
    cached, work = sample(pipe, build_method("deepcache", _target("unet", pipe, 6)), steps=6)
    assert torch.equal(never, before) and never_work() == 1.0
    assert work() < 1.0 and not torch.equal(cached, before)


def test_deepcache_rows(deepcache, tmp_path):
    _unet_pipe().save_pretrained(tmp_path / "unet")
    config = BenchConfig(
        model=str(tmp_path / "unet"),
        methods=["baseline", "deepcache"],
        num_samples=2,
        batch_size=2,
        steps=4,
        repeats=1,
    )
    baseline, cached = run_bench(config, progress=False)
    assert cached.note is None and baseline.block_fraction == 1.0 > cached.block_fraction
    dit = make_test_pipe("dit")
    reason = build_method("deepcache", _target("dit", dit)).unsupported
    assert "DeepCache caches the deep branches of a U-Net" in reason and "DiTTransformer2DModel" in reason
    with pytest.raises(ValueError, match="has skip branches 0 to 5, got 6"):
        build_method("deepcache:3:6", _target("unet", _unet_pipe()))


@pytest.mark.parametrize("package, spec", [("cache_dit", "dbcache"), ("DeepCache", "deepcache")])
def test_a_peer_that_is_not_installed_gives_a_row_with_the_reason(monkeypatch, package, spec):
    monkeypatch.setitem(sys.modules, package, None)  # importing it raises ImportError
    pipe = make_test_pipe("dit")
    reason = build_method(spec, _target("dit", pipe)).unsupported
    assert reason == f"{package.replace('_', '-')} is not installed (pip install 'ee-diffusion[peers]')"
