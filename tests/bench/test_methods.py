import contextlib
import importlib.util
import re

import pytest
import torch
from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel, UNet2DModel

from ee_diffusion.bench import harness
from ee_diffusion.bench.harness import BenchConfig, load_pipe, run_bench
from ee_diffusion.bench.method_specs import METHOD_KINDS, parse_methods
from ee_diffusion.bench.methods import BUILDERS, Target, build_method, denoiser_of
from ee_diffusion.pipelines import EarlyExitDiTPipeline, EarlyExitUNet2DPipeline
from tests.conftest import make_tiny_dit
from tests.pipelines.conftest import make_pixart_pipe, make_sd3_pipe, pixart_inputs, sd3_inputs

ACCELERATORS = [
    "fbcache:10",
    "layerskip:1,2",
    "taylorseer:2",
    "magcache:0.5",
    "pab:2:0-1000",
    "seacache:5",
    "fastercache:2:-1-1000",
]


@pytest.fixture(scope="module")
def tiny_dit():
    return load_pipe("random:dit-tiny", BenchConfig(model="random:dit-tiny"), torch.device("cpu"))


def _target(pipe, steps=6):
    return Target("random:dit-tiny", lambda model: pipe, steps)


def _images(pipe, method, steps=6, depths=None):
    with method.session(pipe) as work:
        images = pipe(
            class_labels=[1, 2, 3],
            guidance_scale=1.0,
            num_inference_steps=steps,
            output_type="pt",
            generator=torch.Generator().manual_seed(0),
        ).images
        if depths is not None:
            depths.append(work.depths())
        return images, work()


def test_every_kind_is_registered_with_its_syntax():
    assert (
        set(METHOD_KINDS)
        == set(BUILDERS)
        == {
            *("baseline", "ase", "finetuned", "deediff", "fbcache", "layerskip", "taylorseer", "magcache", "pab"),
            *("seacache", "fastercache", "dbcache", "dbcache-taylorseer", "dbcache-scm", "deepcache"),
        }
    )


def test_fbcache_with_a_high_threshold_runs_fewer_blocks(tiny_dit):
    blocks = tiny_dit.transformer.transformer_blocks
    calls = [0] * len(blocks)
    handles = [
        block.attn1.register_forward_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
        for i, block in enumerate(blocks)
    ]
    try:
        _, full = _images(tiny_dit, build_method("baseline", _target(tiny_dit)))
        baseline_calls, calls[:] = list(calls), [0] * len(blocks)
        depths = []
        _, fraction = _images(tiny_dit, build_method("fbcache:10", _target(tiny_dit)), depths=depths)
    finally:
        for handle in handles:
            handle.remove()
    assert baseline_calls == [6] * len(blocks) and full == 1.0
    # The first block runs at every step; the others only at the first (no cached residual yet).
    assert calls == [6] + [1] * (len(blocks) - 1)
    assert fraction == pytest.approx(sum(calls) / sum(baseline_calls))
    # per step, the blocks' worth of work: all of them at the first step, the first block's after
    assert depths[0] == pytest.approx([len(blocks)] + [1] * 5)


@pytest.mark.parametrize("spec", ACCELERATORS)
def test_removing_an_accelerator_restores_the_model_bit_for_bit(tiny_dit, spec):
    baseline = build_method("baseline", _target(tiny_dit))
    before, _ = _images(tiny_dit, baseline)
    method = build_method(spec, _target(tiny_dit))
    assert method.unsupported is None
    accelerated, fraction = _images(tiny_dit, method)
    after, _ = _images(tiny_dit, baseline)
    assert torch.equal(before, after)
    assert fraction < 1.0 and not torch.equal(before, accelerated)


def test_accelerators_that_do_not_apply_give_a_row_with_the_reason(tmp_path):
    torch.manual_seed(0)
    unet = UNet2DModel(
        sample_size=8,
        in_channels=3,
        out_channels=3,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        num_class_embeds=11,
        norm_num_groups=4,
    )
    EarlyExitUNet2DPipeline(unet=unet, scheduler=DDPMScheduler()).save_pretrained(tmp_path / "unet")
    methods = [
        "baseline",
        "fbcache",
        "layerskip",
        "magcache",
        "taylorseer",
        "pab",
        "deediff",
        "seacache",
        "fastercache",
    ]
    rows = run_bench(
        BenchConfig(model=str(tmp_path / "unet"), methods=methods, num_samples=2, batch_size=2, steps=2),
        progress=False,
    )
    assert rows[0].note is None and rows[0].images_per_s > 0
    for row in rows[1:]:
        assert "UNet2DModel" in row.note and row.method in methods
        assert row.images_per_s is row.speedup is row.block_fraction is None
        assert not row.note.endswith(": pop from empty list"), row.note  # why, not an internal error alone
    (fbcache,) = [row for row in rows if row.method == "fbcache"]
    assert "hooks a transformer's stack of blocks, which UNet2DModel does not have in a form it knows" in fbcache.note


def _count_denoiser_calls(monkeypatch) -> list[tuple[str, int]]:
    """(scheduler class, batch size) of every denoiser call of the bench's pipelines, by a plain torch pre-hook."""
    calls = []

    def load(model, config, device):
        pipe = load_pipe(model, config, device)  # the bench's own loader, imported before the patch

        def record(module, args, kwargs):
            calls.append((type(pipe.scheduler).__name__, (args[0] if args else kwargs["hidden_states"]).shape[0]))

        denoiser_of(pipe).register_forward_pre_hook(record, with_kwargs=True)
        return pipe

    monkeypatch.setattr(harness, "load_pipe", load)
    return calls


def test_grid_speedup_is_against_the_baseline_of_the_same_cell(monkeypatch):
    calls = _count_denoiser_calls(monkeypatch)
    config = BenchConfig(
        model="random:dit-tiny",
        methods=["baseline", "layerskip:0,1,2"],
        num_samples=4,
        batch_size=2,
        scheduler=["ddim", "dpm-solver++"],
        steps=[2, 8],
        repeats=3,
    )
    rows = run_bench(config, progress=False)
    assert [(row.method, row.scheduler, row.steps) for row in rows] == [
        ("baseline", "ddim", 2),
        ("layerskip:0,1,2", "ddim", 2),
        ("baseline", "dpm-solver++", 8),
        ("layerskip:0,1,2", "dpm-solver++", 8),
    ]
    assert [row.block_fraction for row in rows] == [1.0, 0.25, 1.0, 0.25]
    assert all(row.images_per_s > 0 and row.timing_spread >= 0 for row in rows)
    assert rows[0].speedup == rows[2].speedup == 1.0  # the median of round-by-round ratios to itself
    # What the timings come from: in each cell every method makes 2 quality batches, a warm-up round and 3 timed rounds
    # of one batch of 2 images, each call one denoiser pass per step (no guidance): the cells ran their own steps.
    assert calls.count(("DDIMScheduler", 2)) == 2 * (2 + 1 + 3) * 2
    assert calls.count(("DPMSolverMultistepScheduler", 2)) == 2 * (2 + 1 + 3) * 8
    assert len(calls) == 2 * (2 + 1 + 3) * (2 + 8)
    product = BenchConfig(model="random:dit-tiny", scheduler=["ddim", "ddpm"], steps=[2, 3], grid="product")
    assert product.cells() == [("ddim", 2), ("ddim", 3), ("ddpm", 2), ("ddpm", 3)]
    with pytest.raises(ValueError, match="lists of the same length"):
        BenchConfig(scheduler=["ddim", "ddpm"], steps=[2, 3, 4])


def test_a_method_at_its_own_step_count_samples_those_steps_inside_the_cell(monkeypatch):
    calls = _count_denoiser_calls(monkeypatch)
    config = BenchConfig(
        model="random:dit-tiny",
        methods=["baseline", "baseline@3", "layerskip:0,1,2@4"],
        num_samples=2,
        batch_size=2,
        steps=[6],
        repeats=2,
    )
    rows = run_bench(config, progress=False)
    assert [(row.method, row.steps) for row in rows] == [("baseline", 6), ("baseline@3", 6), ("layerskip:0,1,2@4", 6)]
    # block compute against the full model at the cell's 6 steps: 3 of 6 steps; 4 of 6 steps at a quarter of the blocks
    assert [row.block_fraction for row in rows] == [1.0, 0.5, pytest.approx(0.25 * 4 / 6)]
    # one quality batch, a warm-up round and two timed rounds per method, a call per step
    assert len(calls) == (1 + 1 + 2) * (6 + 3 + 4)
    assert rows[1].speedup > 0 and rows[0].speedup == 1.0  # timed in the same rounds as the cell's baseline


@pytest.mark.parametrize(
    "spec, match",
    [
        ("baseline@0", "`@N` needs N >= 1 scheduler steps, got 0"),
        ("warp@4", "Unknown method 'warp@4'; accepted kinds: .*each optionally with @N"),
    ],
)
def test_bad_step_suffix(tiny_dit, spec, match):
    with pytest.raises(ValueError, match=match):
        build_method(spec, _target(tiny_dit))


def test_compile_keeps_images_and_block_counts_and_the_hooks_never_recompile(tiny_dit):
    torch._dynamo.reset()
    compiled = load_pipe("random:dit-tiny", BenchConfig(model="random:dit-tiny", compile=True), torch.device("cpu"))
    specs = ["baseline", "ase:linear:0.5", "fbcache:0.1", "taylorseer:2"]
    for spec in specs:  # each method's first calls make its graphs (TaylorSeer's: the attention modules' own)
        _images(compiled, build_method(spec, _target(compiled)))
    fractions = []
    # Skipping blocks, caching attention, adding and removing hooks: all of it stays outside the compiled graphs.
    with torch._dynamo.config.patch(error_on_recompile=True):
        for spec in specs:
            images, fraction = _images(compiled, build_method(spec, _target(compiled)))
            expected, expected_fraction = _images(tiny_dit, build_method(spec, _target(tiny_dit)))
            torch.testing.assert_close(images, expected, atol=1e-4, rtol=0)
            assert fraction == expected_fraction
            fractions.append(fraction)
    assert fractions[0] == 1.0 and fractions[1] < 1.0 and fractions[3] < 1.0


@pytest.mark.skipif(
    not torch.cuda.is_available() or importlib.util.find_spec("xformers") is None,
    reason="xformers' attention needs a CUDA device and the xformers package",
)
def test_xformers_attention_makes_the_same_images_on_cuda():
    cuda = torch.device("cuda")
    plain, xformers = (
        load_pipe("random:dit-tiny", BenchConfig(model="random:dit-tiny", device="cuda", xformers=flag), cuda)
        for flag in (False, True)
    )
    processors = {type(p).__name__ for p in xformers.transformer.attn_processors.values()}
    assert processors == {"XFormersAttnProcessor"}
    for spec in ["baseline", "ase:linear:0.5"]:
        expected, _ = _images(plain, build_method(spec, _target(plain)))
        images, _ = _images(xformers, build_method(spec, _target(xformers)))
        torch.testing.assert_close(images, expected, atol=1e-3, rtol=0)


def test_deediff_uses_the_heads_in_the_model_folder_at_each_threshold_and_records_the_depth_profile(tmp_path):
    from ee_diffusion.exits import ExitHeads
    from tests.conftest import save_digits_shaped_dit

    save_digits_shaped_dit(tmp_path / "model")
    torch.manual_seed(0)
    heads = ExitHeads(num_blocks=2, hidden_size=16, threshold=0.0)
    for parameter in heads.parameters():
        torch.nn.init.normal_(parameter, std=0.2)
    heads.save_pretrained(tmp_path / "model" / "exit_heads")
    methods = [
        "baseline",
        "deediff",
        "deediff:1",
        "deediff:1:per_sample",
        "ase:constant:1",
        "deediff:1:per_batch:per_block",
    ]
    rows = run_bench(
        BenchConfig(
            model=str(tmp_path / "model"), methods=methods, num_samples=4, batch_size=2, steps=3, guidance_scale=2.0
        ),
        progress=False,
    )
    baseline, default, everyone, per_sample, schedule, per_block = rows
    uem, adapter = heads.cost_in_blocks(
        load_pipe(str(tmp_path / "model"), BenchConfig(), torch.device("cpu")).transformer.transformer_blocks[0]
    )
    assert default.block_fraction == pytest.approx(1 + uem / 2) and default.depth_per_step == [2.0] * 3
    assert default.fid == baseline.fid  # threshold 0 (the heads' own): the full model's images
    # a run's first step runs every block (the default `previous_step` decision knows nothing yet), the others leave
    # at the first head
    assert everyone.block_fraction == pytest.approx(((2 + uem) + 2 * (1 + uem + adapter)) / (3 * 2))
    assert everyone.depth_per_step == per_sample.depth_per_step == [2.0, 1.0, 1.0]
    assert per_block.depth_per_step == [1.0] * 3  # DeeDiff's released rule decides inside each call
    assert schedule.depth_per_step == [1.0] * 3 and baseline.depth_per_step is None
    assert ExitHeads.from_pretrained(tmp_path / "model" / "exit_heads").config.threshold == 0.0  # rule restored


@pytest.mark.parametrize(
    "spec, match",
    [
        ("deediff:x", "Bad method 'deediff:x'"),
        ("deediff:-1", "threshold must be a finite number > 0 and <= 1, got '-1'"),
        ("deediff:0", "threshold must be a finite number > 0 and <= 1, got '0'"),
        ("deediff:0.1:per_token", "the policy must be one of per_batch, per_sample, got 'per_token'"),
        ("deediff:0.1:per_batch:soon", "the decision must be one of previous_step, per_block, got 'soon'"),
    ],
)
def test_bad_deediff_specs(tiny_dit, spec, match):
    with pytest.raises(ValueError, match=match):
        build_method(spec, _target(tiny_dit))


def test_deediff_without_heads_gives_a_row_with_the_reason(tiny_dit):
    assert "has no exit heads" in build_method("deediff", _target(tiny_dit)).unsupported


class TinyFluxPipe:
    """A tiny `FluxTransformer2DModel` in a minimal flow-matching sampling loop, called as Flux's pipeline calls it:
    packed latent tokens laid out by `img_ids`, the timestep as `t / 1000`."""

    def __init__(self) -> None:
        torch.manual_seed(0)
        self.transformer = FluxTransformer2DModel(
            patch_size=1,
            in_channels=4,
            out_channels=4,
            num_layers=2,
            num_single_layers=2,
            attention_head_dim=8,
            num_attention_heads=2,
            joint_attention_dim=8,
            pooled_projection_dim=8,
            axes_dims_rope=(2, 2, 4),
        ).eval()
        self.scheduler = FlowMatchEulerDiscreteScheduler()

    @torch.no_grad()
    def __call__(self, num_inference_steps: int, batch: int = 2) -> torch.Tensor:
        g = torch.Generator().manual_seed(0)
        rows, cols = torch.meshgrid(torch.arange(4.0), torch.arange(4.0), indexing="ij")
        inputs = dict(
            encoder_hidden_states=torch.randn(batch, 3, 8, generator=g),
            pooled_projections=torch.randn(batch, 8, generator=g),
            img_ids=torch.stack([torch.zeros(16), rows.flatten(), cols.flatten()], dim=-1),
            txt_ids=torch.zeros(3, 3),
        )
        latents = torch.randn(batch, 16, 4, generator=g)
        self.scheduler.set_timesteps(num_inference_steps)
        for t in self.scheduler.timesteps:
            velocity = self.transformer(latents, timestep=t.expand(batch) / 1000, **inputs).sample
            latents = self.scheduler.step(velocity, t, latents).prev_sample
        return latents


def make_test_pipe(model: str):
    """A tiny pipeline of each denoiser family the peers are tested on (see `sample`)."""
    if model == "dit":
        return load_pipe("random:dit-tiny", BenchConfig(model="random:dit-tiny"), torch.device("cpu"))
    return {"pixart": make_pixart_pipe, "sd3": make_sd3_pipe, "flux": TinyFluxPipe}[model]()


def sample(pipe, method=None, steps: int = 8, guidance: float = 4.0):
    """What `pipe` makes under `method` (`None`: as it is), and the `Work` of the method's session: class labels 1-3
    for a class-conditional pipeline, 2 prompts' embeddings for PixArt and SD3, the loop for Flux; guided above 1."""
    session = method.session(pipe) if method is not None else contextlib.nullcontext()
    with session as work:
        generator = torch.Generator().manual_seed(0)
        if isinstance(pipe, TinyFluxPipe):
            images = pipe(steps)
        elif isinstance(pipe, EarlyExitDiTPipeline | EarlyExitUNet2DPipeline):
            images = pipe(
                class_labels=[1, 2, 3],
                guidance_scale=guidance,
                num_inference_steps=steps,
                output_type="pt",
                generator=generator,
            ).images
        else:
            inputs = (pixart_inputs if "PixArt" in type(pipe).__name__ else sd3_inputs)(batch=2)
            images = pipe(
                **inputs, guidance_scale=guidance, num_inference_steps=steps, output_type="latent", generator=generator
            ).images
    return images, work


@pytest.mark.parametrize("model", ["dit", "pixart", "flux"])
def test_seacache_counts_the_steps_it_reuses_and_at_a_threshold_that_never_reuses_is_the_baseline(model):
    pipe = make_test_pipe(model)
    target = Target(model, lambda name: pipe, 8)
    before, _ = sample(pipe)
    never, never_work = sample(pipe, build_method("seacache:1e-9", target))
    reused, work = sample(pipe, build_method("seacache:1000", target))
    after, _ = sample(pipe)
    assert torch.equal(never, before) and never_work() == 1.0
    # The first step and the last run in full, and at most 2 steps in a row reuse (SeaCache's defaults): no block of
    # the stack runs on a reused step.
    depths = work.depths()
    assert [depth / depths[0] for depth in depths] == [1, 0, 0, 1, 0, 0, 1, 1] and work() == 0.5
    assert not torch.equal(reused, before) and torch.equal(after, before)


def test_an_accelerator_with_two_hooks_on_one_block_comes_off_cleanly():
    """SeaCache puts its leader hook and its tail hook on the single block of a one-block model; taken off the other
    way round, diffusers would leave the leader's forward on the block (idle outside a cache context, so the images
    alone would not show it)."""
    pipe = EarlyExitDiTPipeline(transformer=make_tiny_dit(num_layers=1), vae=None, scheduler=DDPMScheduler())
    pipe.set_progress_bar_config(disable=True)
    block = pipe.transformer.transformer_blocks[0]
    before, _ = sample(pipe, steps=6, guidance=1.0)
    cached, work = sample(pipe, build_method("seacache:1000", Target("one-block", lambda name: pipe, 6)), 6, 1.0)
    after, _ = sample(pipe, steps=6, guidance=1.0)
    assert work() < 1.0 and not torch.equal(cached, before) and torch.equal(after, before)
    assert block.forward.__func__ is type(block).forward and not block._diffusers_hook.hooks


def test_fastercache_at_a_window_that_never_caches_is_the_baseline(tiny_dit):
    before, _ = sample(tiny_dit, guidance=1.0)
    images, work = sample(tiny_dit, build_method("fastercache:2:0-1", _target(tiny_dit, 8)), guidance=1.0)
    assert torch.equal(images, before) and work() == 1.0


def test_fastercache_computes_the_conditional_half_of_a_guided_batch_and_counts_half_the_work(tiny_dit):
    before, _ = sample(tiny_dit, guidance=3.0)
    seen = []
    record = tiny_dit.transformer.transformer_blocks[0].register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["class_labels"].tolist()), with_kwargs=True
    )
    try:
        images, work = sample(tiny_dit, build_method("fastercache:2:0-1", _target(tiny_dit, 8)), guidance=3.0)
    finally:
        record.remove()
    after, _ = sample(tiny_dit, guidance=3.0)
    # diffusers' defaults: the unconditional half is estimated on the calls after the first whose timestep lies in
    # (-1, 641), but every 5th; then the blocks run on the conditional half alone, and count half.
    null = tiny_dit.transformer.config.num_embeds_ada_norm
    skipped = [i > 0 and -1 < t < 641 and i % 5 != 0 for i, t in enumerate(tiny_dit.scheduler.timesteps.tolist())]
    assert seen == [[1, 2, 3] if skip else [null] * 3 + [1, 2, 3] for skip in skipped] and any(skipped)
    assert work() == pytest.approx(sum(0.5 if skip else 1.0 for skip in skipped) / len(skipped))
    assert not torch.equal(images, before) and torch.equal(after, before)


def test_seacache_and_fbcache_give_sd3_a_row_with_the_reason():
    pipe = make_sd3_pipe()
    for spec in ["seacache", "fbcache"]:
        reason = build_method(spec, Target("sd3", lambda name: pipe, 8)).unsupported
        assert "SD3Transformer2DModel" in reason and "context_pre_only" in reason


@pytest.mark.parametrize(
    "spec, message",
    [
        ("seacache:0", "Bad method 'seacache:0': the threshold must be a finite number > 0, got '0'."),
        ("seacache:0.2:0", "the most consecutive cached steps must be an integer >= 1, got '0'"),
        ("seacache:0.2:2:2", "the residual order must be an integer >= 0 and <= 1, got '2'"),
        ("seacache:0.2:2:1:4", "at most 3 ':'-separated arguments"),
        ("fastercache:1", "the range (1 recomputes every call) must be an integer >= 2, got '1'"),
        ("fastercache:2:681-100", "the timestep window <lo>-<hi> needs lo < hi, got 681-100"),
        ("fastercache:2:-2-681", "the window's low end must be an integer >= -1, got '-2'"),
        ("fastercache:2:681", "expected fastercache[:<range>[:<lo>-<hi>[:<cfg>]]], e.g. fastercache:2:-1-681"),
        ("fastercache:2:-1-681:1", "the unconditional range (1 computes it every call) must be an integer >= 2"),
        ("dbcache:0", "Bad method 'dbcache:0': the threshold must be a finite number > 0, got '0'."),
        ("dbcache:inf", "the threshold must be a finite number > 0, got 'inf'"),
        ("dbcache:0.1:0", "Fn (the first blocks always computed) must be an integer >= 1, got '0'"),
        ("dbcache:0.1:1:-1", "Bn (the last blocks always computed) must be an integer >= 0, got '-1'"),
        ("dbcache:0.1:1:0:x", "the warmup steps must be an integer >= 0, got 'x'"),
        ("dbcache:0.1:1:0:4:9", "at most 4 ':'-separated arguments"),
        ("dbcache-taylorseer:0", "the TaylorSeer order must be an integer >= 1, got '0'"),
        ("dbcache-taylorseer:1:0", "the threshold must be a finite number > 0, got '0'"),
        ("dbcache-taylorseer:1:0.1:1:0:4:9", "at most 5 ':'-separated arguments"),
        ("dbcache-scm:turbo", "the mask must be one of slow[-static], medium[-static], fast[-static], ultra[-static]"),
        ("dbcache-scm:fast-static:0.1", "a -static mask reuses the cache on every masked step and has no threshold"),
        ("dbcache-scm:fast:0.1:0", "Fn (the first blocks always computed) must be an integer >= 1"),
        ("deepcache:1", "the interval (1 computes every step) must be an integer >= 2, got '1'"),
        ("deepcache:3:-1", "the branch must be an integer >= 0, got '-1'"),
        ("deepcache:3:0:1", "at most 2 ':'-separated arguments"),
        ("pab:2:100-", "expected pab[:<range>[:<lo>-<hi>]], e.g. pab:2:100-800, got the window '100-'"),
    ],
)
def test_bad_arguments_of_the_peers_and_caches_are_refused_before_any_model_loads(spec, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        parse_methods(f"baseline,{spec}")


def test_the_peers_and_caches_parse_at_their_defaults_and_with_every_argument():
    specs = "seacache,seacache:0.1:3:0,fastercache,fastercache:3:-1-500:4,dbcache,dbcache:0.1:2:1:0"
    specs += ",dbcache-taylorseer,dbcache-taylorseer:2:0.1:2:1:3,dbcache-scm,dbcache-scm:fast-static::2,deepcache:2:4"
    assert parse_methods(specs) == specs.split(",")


def test_pab_reads_the_schedulers_timestep_where_the_denoiser_is_handed_t_over_1000():
    """Flux's pipeline hands its denoiser `t / 1000`; PAB's window is in the scheduler's `t`."""
    pipe = TinyFluxPipe()
    _, work = sample(pipe, build_method("pab:2:0-1000", Target("flux", lambda name: pipe, 6)), steps=6)
    assert work() < 1.0


def test_an_accelerator_on_flux_counts_each_block_as_one_whatever_its_stream_kind():
    """A block is one unit, as our exit units count it: a single-stream block's MLP (plain `nn.Linear`s) is counted,
    and a double-stream block's per-stream weights do not make it weigh twice a single-stream one."""
    from ee_diffusion.bench.methods import BlockWork

    pipe = TinyFluxPipe()
    transformer = pipe.transformer
    work = BlockWork(transformer)
    blocks = [*transformer.transformer_blocks, *transformer.single_transformer_blocks]
    assert work.total == pytest.approx(len(blocks))
    single = transformer.single_transformer_blocks[0]
    assert {single.proj_mlp, single.proj_out, single.attn} <= set(work.layers)
    ran = []  # the blocks FirstBlockCache really runs, call by call (it calls a block it skips, not its attention)
    for index, block in enumerate(blocks):
        block.attn.register_forward_pre_hook(lambda module, args, index=index: ran[-1].add(index))
    transformer.register_forward_pre_hook(lambda module, args: ran.append(set()))
    work.remove()
    _, counted = sample(pipe, build_method("fbcache:0.3", Target("flux", lambda name: pipe, 8)), steps=8)
    assert counted() < 1.0  # it skipped some blocks
    assert counted() == pytest.approx(sum(len(call) for call in ran) / (len(ran) * len(blocks)))


def test_a_plans_dropped_steps_count_as_steps_that_ran_no_block(monkeypatch, tmp_path):
    """Block compute is a share of the full run at the cell's steps: a plan that drops two of six steps and runs the
    others at full depth spends two thirds, with four denoiser calls per image batch."""
    from ee_diffusion import ExitSchedule, num_exit_blocks
    from ee_diffusion.bench.noise_schedulers import build_scheduler
    from ee_diffusion.schedules import DROP

    pipe = load_pipe("random:dit-tiny", BenchConfig(model="random:dit-tiny"), torch.device("cpu"))
    scheduler = build_scheduler("dpm-solver++", pipe.scheduler.config)
    scheduler.set_timesteps(6)
    blocks = num_exit_blocks(pipe)
    plan = ExitSchedule.plan(blocks, scheduler.timesteps, [blocks, DROP, blocks, DROP, blocks, blocks])
    plan.save_pretrained(tmp_path / "plan")
    calls = _count_denoiser_calls(monkeypatch)
    config = BenchConfig(
        model="random:dit-tiny",
        methods=["baseline", f"ase:{tmp_path / 'plan'}"],
        num_samples=2,
        batch_size=2,
        steps=[6],
        scheduler=["dpm-solver++"],
        repeats=1,
    )
    rows = run_bench(config, progress=False)
    assert [row.block_fraction for row in rows] == [1.0, pytest.approx(4 / 6)]
    assert len(calls) == (1 + 1 + 1) * (6 + 4)  # a quality batch, a warm-up round and a timed round


def test_a_plan_that_drops_steps_is_refused_before_any_image_under_a_scheduler_that_cannot_step_over_them(tmp_path):
    from ee_diffusion import ExitSchedule, num_exit_blocks
    from ee_diffusion.bench.noise_schedulers import build_scheduler
    from ee_diffusion.schedules import DROP

    pipe = load_pipe("random:dit-tiny", BenchConfig(model="random:dit-tiny"), torch.device("cpu"))
    pipe.scheduler = build_scheduler("ddim", pipe.scheduler.config)
    pipe.scheduler.set_timesteps(4)
    blocks = num_exit_blocks(pipe)
    ExitSchedule.plan(
        blocks, pipe.scheduler.timesteps, [blocks, DROP, blocks, blocks], scheduler_class="DDIMScheduler"
    ).save_pretrained(tmp_path / "plan")
    with pytest.raises(ValueError, match="DDIMScheduler steps from each timestep to one a fixed stride below"):
        build_method(f"ase:{tmp_path / 'plan'}", _target(pipe, steps=4))
