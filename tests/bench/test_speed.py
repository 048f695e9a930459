import json

import pytest
from diffusers import DPMSolverMultistepScheduler

from ee_diffusion import ExitSchedule
from ee_diffusion.cli import main
from ee_diffusion.metrics import Timing, round_speedups, time_interleaved

TINY = ["--num-layers", "4", "--heads", "2", "--head-dim", "8", "--sample-size", "8", "--steps", "5"]


def test_speed_command_reports_every_method_with_the_executed_fraction(tmp_path, capsys):
    out = tmp_path / "speed.json"
    args = ["speed", *TINY, "--repeats", "1", "--warmup", "0", "--schedule", "linear:1", "--schedule", "step:4,2"]
    assert main([*args, "--json", str(out)]) == 0
    rows = {row["method"]: row for row in json.loads(out.read_text())["rows"]}
    assert list(rows) == ["baseline", "full-depth hook", "ase linear:1", "ase step:4,2"]
    scheduler = DPMSolverMultistepScheduler(algorithm_type="dpmsolver++")
    scheduler.set_timesteps(5)
    for name, schedule in [
        ("ase linear:1", ExitSchedule.linear(4, 1)),
        ("ase step:4,2", ExitSchedule.step(4, [4, 2])),
    ]:
        assert rows[name]["block_fraction"] == pytest.approx(schedule.compute_fraction(scheduler.timesteps))
        assert rows[name]["predicted_speedup"] == pytest.approx(1 / rows[name]["block_fraction"])
    assert rows["full-depth hook"]["block_fraction"] == 1.0 and rows["baseline"]["speedup"] == 1.0
    assert "efficiency" in capsys.readouterr().out


def test_speed_command_rejects_a_bad_schedule(capsys):
    assert main(["speed", *TINY, "--repeats", "1", "--schedule", "linear:9"]) == 2
    assert "error: Bad exit schedule 'linear:9'" in capsys.readouterr().err


def test_time_interleaved_rotates_the_order_of_methods_each_round():
    calls = []
    runs = {name: (lambda name=name: calls.append(name)) for name in "abc"}
    timings = time_interleaved(runs, repeats=3, warmup=1)
    assert "".join(calls) == "abc" + "bca" + "cab" + "abc"  # one warm-up round, then 3 timed, order rotating
    assert len(timings["a"].seconds) == 3 and timings["b"].median >= 0
    with pytest.raises(ValueError, match="repeats=0"):
        time_interleaved({"a": lambda: None}, repeats=0)


def test_timing_spread_is_the_interquartile_range_over_the_median():
    steady, noisy = Timing((1.0, 1.0, 1.0, 1.0, 1.0)), Timing((1.0, 1.0, 1.2, 1.6, 2.0))
    assert steady.spread == 0.0 and Timing((3.0,)).spread == 0.0
    # inclusive quartiles of (1, 1, 1.2, 1.6, 2): 1.0 and 1.6; median 1.2
    assert noisy.median == 1.2 and noisy.spread == pytest.approx(0.6 / 1.2)


def test_speedups_pair_the_runs_of_each_round():
    # A slow spell in round 2 hits both methods of that round: every per-round ratio stays 2.
    baseline, method = Timing((2.0, 8.0, 2.0)), Timing((1.0, 4.0, 1.0))
    assert round_speedups(baseline, method) == [2.0, 2.0, 2.0]
    with pytest.raises(ValueError, match="same rounds"):
        round_speedups(baseline, Timing((1.0,)))
