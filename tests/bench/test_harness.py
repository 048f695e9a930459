import json
import time

import pytest
import torch

from ee_diffusion import ExitSchedule
from ee_diffusion.bench import harness
from ee_diffusion.bench.harness import BenchConfig, load_pipe, run_bench
from ee_diffusion.bench.method_specs import default_methods, parse_methods
from ee_diffusion.bench.report import format_table
from ee_diffusion.cli import main
from ee_diffusion.pipelines import load_early_exit_pipeline
from tests.conftest import save_digits_shaped_dit

ROW_KEYS = {
    "method",
    "model",
    "scheduler",
    "steps",
    "num_samples",
    "fid",
    "kid",
    "class_accuracy",
    "images_per_s",
    "timing_spread",
    "speedup",
    "block_fraction",
    "peak_memory_mb",
    "depth_per_step",
    "psnr",
    "ssim",
    "quality_reference",
    "gflop_per_image",
    "flop_fraction",
}


@pytest.fixture(scope="module")
def digits_shaped_models(tmp_path_factory):
    """Two tiny randomly initialised pixel-space DiTs shaped like the digits models; the second carries a schedule."""
    root = tmp_path_factory.mktemp("models")
    for name, schedule in (("base", None), ("tuned", ExitSchedule.step(2, [2, 1]))):
        save_digits_shaped_dit(root / name, exit_schedule=schedule)
    return root


def test_bench_rows(digits_shaped_models):
    config = BenchConfig(
        model=str(digits_shaped_models / "base"),
        num_samples=12,
        batch_size=5,
        steps=2,
        methods=["baseline", "ase:constant:1", f"finetuned:{digits_shaped_models / 'tuned'}"],
    )
    rows = run_bench(config, progress=False)
    assert [row.method for row in rows] == config.methods
    baseline, ase, tuned = rows
    assert baseline.speedup == 1.0 and baseline.block_fraction == 1.0
    assert ase.block_fraction == 0.5 and tuned.model.endswith("tuned")
    # The DPM-Solver++ timesteps of 2 steps from 1000: 999 (depth 1) and 500 (depth 1 or 2: the table's boundary).
    assert 0.5 <= tuned.block_fraction < 1.0
    for row in rows:
        assert row.num_samples == 12 and row.steps == 2 and row.scheduler == "dpm-solver++"
        assert row.fid > 0 and row.kid is not None and 0 <= row.class_accuracy <= 1 and row.images_per_s > 0
        assert row.quality_reference == "the held-out digits" and row.psnr is None and row.ssim is None
    # The same seeds and labels: the baseline and a full-depth schedule produce the same images, hence the same FID.
    again = run_bench(BenchConfig(**{**vars(config), "methods": ["baseline", "ase:constant:2"]}), progress=False)
    assert again[0].fid == again[1].fid == baseline.fid
    assert "speedup" in format_table(rows)


def test_bench_counts_each_methods_flops_per_image(digits_shaped_models):
    methods = ["baseline", "baseline@1", "ase:constant:1"]
    config = BenchConfig(str(digits_shaped_models / "base"), methods, num_samples=4, batch_size=2, repeats=1, steps=2)
    baseline, one_step, half_depth = run_bench(config, progress=False)
    assert baseline.flop_fraction == 1.0 and baseline.gflop_per_image > 0
    assert one_step.flop_fraction == 0.5  # the same call, once instead of twice
    # one of the two blocks: the patch embedding, timestep embedding and final layer still run at every step
    assert 0.5 < half_depth.flop_fraction < 0.75 and half_depth.block_fraction == 0.5


def test_methods_leave_every_pipeline_as_they_found_it_across_a_grid(digits_shaped_models, monkeypatch):
    """The bench model itself carries a schedule: `baseline` runs it at full depth, `finetuned:` under its own
    schedule, in every cell (the second cell reads the schedule again), and the folder's schedule is in force
    afterwards."""
    tuned = str(digits_shaped_models / "tuned")
    config = BenchConfig(
        model=tuned,
        methods=["baseline", f"finetuned:{tuned}", "ase:constant:1", "fbcache:10"],
        num_samples=2,
        batch_size=2,
        steps=[2, 3],
        repeats=1,
    )
    pipes, load = {}, harness.load_pipe
    monkeypatch.setattr(harness, "load_pipe", lambda model, *args: pipes.setdefault(model, load(model, *args)))
    rows = run_bench(config, progress=False)
    assert [(row.method.partition(":")[0], row.steps) for row in rows] == [
        (kind, steps) for steps in (2, 3) for kind in ("baseline", "finetuned", "ase", "fbcache")
    ]
    assert [row.block_fraction for row in rows if row.method == "baseline"] == [1.0, 1.0]
    assert all(0.5 <= row.block_fraction < 1.0 for row in rows if row.method.startswith("finetuned"))
    assert [row.block_fraction for row in rows if row.method == "ase:constant:1"] == [0.5, 0.5]
    assert pipes[tuned].exit_schedule == ExitSchedule.step(2, [2, 1])


def test_bench_cli_json(digits_shaped_models, tmp_path, capsys):
    out = tmp_path / "out.json"
    assert (
        main(
            [
                "bench",
                "--model",
                str(digits_shaped_models / "base"),
                "--methods",
                "baseline,ase:linear:1",
                "--num-samples",
                "4",
                "--batch-size",
                "2",
                "--steps",
                "2",
                "--json",
                str(out),
            ]
        )
        == 0
    )
    report = json.loads(out.read_text())
    assert report["config"]["num_samples"] == 4
    assert [set(row) for row in report["rows"]] == [ROW_KEYS, ROW_KEYS]
    assert "ase:linear:1" in capsys.readouterr().out


@pytest.mark.parametrize(
    "overrides, error, match",
    [
        (
            dict(methods=["nosuch:1"]),
            ValueError,
            r"Unknown method 'nosuch:1'; accepted kinds: baseline, ase:<schedule>, .*fbcache",
        ),
        (dict(methods=["baseline:1"]), ValueError, "Unknown method 'baseline:1'"),
        (dict(methods=["fbcache:x"]), ValueError, "Bad method 'fbcache:x'"),
        (dict(methods=["baseline", "baseline"]), ValueError, "must be distinct"),
        (dict(scheduler="plms"), ValueError, "`scheduler` must be one of"),
        (dict(methods=[]), ValueError, "at least one method"),
    ],
)
def test_bad_bench_config(digits_shaped_models, overrides, error, match):
    with pytest.raises(error, match=match):
        run_bench(
            BenchConfig(**{"model": str(digits_shaped_models / "base"), "num_samples": 2, "steps": 1, **overrides}),
            progress=False,
        )


def test_bench_refuses_what_it_cannot_score_before_generating(digits_shaped_models, tmp_path, monkeypatch):
    monkeypatch.setattr(harness, "_call", lambda *args: pytest.fail("generated before refusing"))
    base = dict(model=str(digits_shaped_models / "base"), methods=["baseline"], steps=1)
    with pytest.raises(ValueError, match="need at least 2 samples per method, got num_samples=1"):
        run_bench(BenchConfig(**base, num_samples=1), progress=False)
    (tmp_path / "real.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="real.png is not a readable image"):
        BenchConfig(**base, num_samples=2, reference=str(tmp_path))
    assert main(["bench", "--model", base["model"], "--reference", str(tmp_path)]) == 2


def test_parse_methods_keeps_step_tables_whole():
    text = (
        "baseline,ase:step:12,10,8,ase:linear:0.5,finetuned:digits-dit-ase,layerskip:1,3,fbcache:0.08,pab,"
        "magcache,baseline@8,ase:step:12,8@8"
    )
    assert parse_methods(text) == [
        "baseline",
        "ase:step:12,10,8",
        "ase:linear:0.5",
        "finetuned:digits-dit-ase",
        "layerskip:1,3",
        "fbcache:0.08",
        "pab",
        "magcache",
        "baseline@8",
        "ase:step:12,8@8",
    ]


def test_default_methods_put_fewer_steps_and_a_diffusers_cache_beside_ours():
    assert default_methods("digits-dit", [10], ["dpm-solver++"]) == [
        "baseline",
        "baseline@8",
        "fbcache:0.15",
        "finetuned:digits-dit-ase",
        "finetuned:digits-dit-ase@8",
        "finetuned:digits-dit-ase:plans/dpm-solver++-10",  # the plan shipped for this scheduler and step count
    ]
    assert default_methods("digits-dit", [10], ["ddim"])[-1] == "finetuned:digits-dit-ase@8"  # no plan for DDIM
    assert default_methods("digits-dit", [10, 20], ["dpm-solver++"]) == [
        "baseline",
        "fbcache:0.15",
        "finetuned:digits-dit-ase",
    ]
    assert default_methods("no-such-model", [1], ["euler"]) == ["baseline", "fbcache:0.15", "ase:linear:0.5"]


def test_bench_scores_against_a_saved_reference(digits_shaped_models, tmp_path):
    """--reference with an .npz of the held-out digits' statistics gives the default digits scoring's FID."""
    from ee_diffusion.data import load_digits_split
    from ee_diffusion.metrics import FeatureExtractor, save_reference_statistics

    features = FeatureExtractor("digits").features((load_digits_split("heldout").images + 1) / 2)
    save_reference_statistics(tmp_path / "ref.npz", features, backend="digits")
    common = dict(model=str(digits_shaped_models / "base"), num_samples=6, batch_size=6, steps=2)
    default = run_bench(BenchConfig(**common), progress=False)[0]
    saved = run_bench(BenchConfig(**common, reference=str(tmp_path / "ref.npz")), progress=False)[0]
    assert saved.fid == pytest.approx(default.fid, rel=1e-5) and saved.kid is not None
    assert saved.class_accuracy == default.class_accuracy


def test_bench_schedulers_keep_the_models_prediction_type_and_range_control_and_never_clip():
    from diffusers import DPMSolverMultistepScheduler

    from ee_diffusion.bench.noise_schedulers import SCHEDULERS, build_scheduler

    unet = load_early_exit_pipeline("digits-unet").scheduler.config
    thresholded = DPMSolverMultistepScheduler.from_config(unet, thresholding=True).config
    dit = load_early_exit_pipeline("digits-dit").scheduler.config
    for config, prediction, thresholding in (
        (dit, "epsilon", False),
        (unet, "v_prediction", False),
        (thresholded, "v_prediction", True),
    ):
        for kind in SCHEDULERS:
            scheduler = build_scheduler(kind, config)
            assert scheduler.config.prediction_type == prediction, kind
            assert not scheduler.config.get("clip_sample", False), kind
            assert scheduler.config.get("thresholding", thresholding) == thresholding, kind


def test_an_accelerator_counts_the_same_work_after_an_exit_schedule_ran_on_the_model():
    """An exit schedule assigned away is taken off the denoiser at once: a diffusers hook removed from beneath a later
    one takes that one's forward with it (diffusers' HookRegistry), so stale exit hooks under the bench's work
    counters made PAB on the U-Net read 28% instead of 70% after an `ase:` row ran."""

    def fraction(methods):
        config = BenchConfig(
            model="digits-unet", methods=methods, num_samples=2, batch_size=2, repeats=1, steps=4, guidance_scale=1.0
        )
        return {row.method: row.block_fraction for row in run_bench(config, progress=False)}["pab:2:0-1000"]

    alone = fraction(["baseline", "pab:2:0-1000"])
    assert alone < 1.0
    assert fraction(["baseline", "ase:linear:6", "pab:2:0-1000"]) == alone


def test_every_method_makes_an_untimed_warm_up_call_of_the_timed_batch_before_the_timed_rounds(monkeypatch):
    """Each method's first call of the timed batch (its compilation, its kernels' first-call set-up) is made before the
    timed rounds and left out of them: here that call sleeps a second, and no round records it."""
    model = "random:dit-tiny"
    pipe = load_pipe(model, BenchConfig(model=model), torch.device("cpu"))
    timing, timed_batches, recorded = [], [], {}

    def batch_size(module, args, kwargs):
        if timing:
            timed_batches.append((args[0] if args else kwargs["hidden_states"]).shape[0])

    pipe.transformer.register_forward_pre_hook(batch_size, with_kwargs=True)
    real = harness.time_interleaved

    def first_call_slow(runs, repeats, warmup, device):
        made = set()

        def slowed(name):
            def run():
                if name not in made:
                    made.add(name)
                    time.sleep(1.0)
                runs[name]()

            return run

        timing.append(True)
        recorded.update(real({name: slowed(name) for name in runs}, repeats=repeats, warmup=warmup, device=device))
        return recorded

    monkeypatch.setattr(harness, "time_interleaved", first_call_slow)
    methods = ["baseline", "ase:linear:0.5", "fbcache:0.1"]
    config = BenchConfig(model=model, methods=methods, num_samples=3, batch_size=2, steps=2, repeats=3)
    rows = run_bench(config, progress=False, pipes={model: pipe})
    assert [row.method for row in rows] == methods and all(row.images_per_s > 2 for row in rows)
    # one warm-up and 3 timed calls per method, of the first batch (2 images; the last quality batch had 1), 2 steps
    assert timed_batches == [2] * len(methods) * (1 + 3) * 2
    assert sorted(recorded) == sorted(methods)
    assert all(len(timing.seconds) == 3 and max(timing.seconds) < 1.0 for timing in recorded.values())
