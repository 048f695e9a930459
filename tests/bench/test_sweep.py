"""`ee-diffusion sweep`: plans, shapes, fewer steps and accelerators on one axis, the front and the best plans."""

import dataclasses
import json

import pytest

from ee_diffusion.bench.report import BenchRow
from ee_diffusion.bench.sweep import SweepConfig, _front, best_per_quality, format_sweep
from ee_diffusion.cli import main
from ee_diffusion.schedules import ExitSchedule
from tests.conftest import save_digits_shaped_dit


def row(method, steps, fid, fraction):
    return BenchRow(
        method=method,
        model="m",
        scheduler="s",
        steps=steps,
        num_samples=2,
        fid=fid,
        kid=None,
        class_accuracy=None,
        images_per_s=1.0,
        timing_spread=0.0,
        speedup=1.0,
        block_fraction=fraction,
        peak_memory_mb=None,
    )


def test_front_and_best_rows_are_on_one_compute_axis():
    rows = [
        row("baseline", 10, 8.0, 1.0),
        row("ase:p", 10, 8.4, 0.7),
        row("baseline", 5, 9.0, 1.0),
        row("fbcache:0.1", 10, 9.5, 0.6),
    ]
    swept = _front([(r, None) for r in rows], max_steps=10)
    assert [s.compute for s in swept] == [1.0, 0.7, 0.5, 0.6]
    assert [s.on_front for s in swept] == [True, True, True, False]  # fbcache: more compute and worse than 5 steps
    best = best_per_quality(swept, 10)
    assert best[0.05].row.method == "ase:p" and best[0.20].row.steps == 5


def test_without_fid_the_front_is_on_psnr_where_higher_is_better():
    def psnr_row(method, steps, psnr, fraction):
        return dataclasses.replace(row(method, steps, None, fraction), psnr=psnr, ssim=0.9)

    rows = [
        psnr_row("baseline", 10, 100.0, 1.0),  # the reference itself: the cap
        psnr_row("ase:p", 10, 40.0, 0.7),
        psnr_row("baseline", 5, 25.0, 1.0),
        psnr_row("fbcache:0.1", 10, 20.0, 0.6),  # more compute than 5 steps and further from the full model
        psnr_row("ase:q", 10, 30.0, 0.4),
    ]
    swept = _front([(r, None) for r in rows], max_steps=10)
    assert [s.on_front for s in swept] == [True, True, False, False, True]
    assert best_per_quality(swept, 10) == {}  # PSNR has no share of the baseline's quality to be within
    assert "PSNR vs full" in format_sweep(swept, 10) and "FID" not in format_sweep(swept, 10).splitlines()[0]


@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(steps=[1, 4]), "distinct step counts of at least 2"),
        (dict(budgets=[1.0]), r"`budgets` must lie in \(0, 1\)"),
        (dict(accelerators=["ase:linear:1"]), "must be other accelerators' methods"),
        (dict(finetuned="digits-dit"), "must be another model than `model`"),
        (dict(finetuned="no-such-model"), "No model 'no-such-model'"),
    ],
)
def test_bad_sweeps_are_refused(overrides, match, tmp_path):
    with pytest.raises(ValueError, match=match):
        SweepConfig(out=str(tmp_path), **overrides)


def test_sweep_command_end_to_end(tmp_path, capsys, monkeypatch):
    from ee_diffusion.bench import harness

    save_digits_shaped_dit(tmp_path / "model")
    out = tmp_path / "sweep"
    loads = []
    monkeypatch.setattr(
        harness, "load_pipe", lambda *args, load=harness.load_pipe: loads.append(args[0]) or load(*args)
    )
    assert (
        main(
            [
                "sweep",
                "--model",
                str(tmp_path / "model"),
                "--steps",
                "2,3",
                "--budgets",
                "0.5",
                "--accelerators",
                "fbcache:0.5",
                "--num-samples",
                "2",
                "--batch-size",
                "2",
                "--repeats",
                "1",
                "--num-probes",
                "2",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    report = json.loads((out / "sweep.json").read_text())
    methods = {(r["method"].split("/")[-1], r["steps"]) for r in report["rows"]}
    assert {("baseline", 2), ("baseline", 3), ("fbcache:0.5", 2), ("dpm-solver++-3-0.5", 3)} <= methods
    full = next(r for r in report["rows"] if r["method"] == "baseline" and r["steps"] == 3)
    for r in report["rows"]:
        assert r["compute"] == pytest.approx(r["block_fraction"] * r["steps"] / 3)
        assert r["flops"] == pytest.approx(r["gflop_per_image"] / full["gflop_per_image"])
        if r["method"] == "baseline":  # the same call, 2 steps of 3
            assert r["flops"] == pytest.approx(r["steps"] / 3)
        if r["method"].startswith("ase:") and "plans" in r["method"]:
            assert r["block_fraction"] <= 0.5
    assert ExitSchedule.from_pretrained(out / "plans" / "dpm-solver++-3-0.5").config.shape == "plan"
    assert (out / "sweep.png").stat().st_size > 0 and "on the front" in capsys.readouterr().out
    assert loads == [str(tmp_path / "model")]  # loaded once, for calibration and every step count's bench


def test_sweep_with_a_finetuned_model_benches_it_under_its_schedule_and_plans_cut_from_it(tmp_path, capsys):
    save_digits_shaped_dit(tmp_path / "model")
    # 62.5% at 4 steps (1, 1, 1 and 2 blocks)
    save_digits_shaped_dit(tmp_path / "tuned", exit_schedule=ExitSchedule.step(2, [2, 1]))
    out = tmp_path / "sweep"
    assert (
        main(
            [
                "sweep",
                "--model",
                str(tmp_path / "model"),
                "--finetuned",
                str(tmp_path / "tuned"),
                "--steps",
                "4",
                "--budgets",
                "0.8,0.5",
                "--accelerators",
                "",
                "--num-samples",
                "2",
                "--batch-size",
                "2",
                "--repeats",
                "1",
                "--num-probes",
                "2",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    rows = {r["method"]: r for r in json.loads((out / "sweep.json").read_text())["rows"]}
    tuned = str(tmp_path / "tuned")
    assert rows[f"finetuned:{tuned}"]["block_fraction"] == 0.625 and rows[f"finetuned:{tuned}"]["model"] == tuned
    plans = [m for m in rows if m.startswith(f"finetuned:{tuned}:")]  # 0.8 is above its schedule's 0.625: no plan
    assert plans == [f"finetuned:{tuned}:{out}/plans/tuned/dpm-solver++-4-0.5"]
    assert rows[plans[0]]["block_fraction"] <= 0.5 and rows[plans[0]]["model"] == tuned
    assert {m for m in rows if m.startswith("ase:")} >= {f"ase:{out}/plans/dpm-solver++-4-0.8"}
    assert "finetuned:tuned:dpm-solver++-4-0.5" in capsys.readouterr().out  # the table names the plan's folder
