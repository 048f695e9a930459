import csv
import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from ee_diffusion.bench import harness
from ee_diffusion.bench.harness import BenchConfig
from ee_diffusion.bench.report import ROW_KEYS, pareto_front
from ee_diffusion.cli import main
from ee_diffusion.metrics import Timing

TINY = ["bench", "--model", "random:dit-tiny", "--num-samples", "6", "--batch-size", "2", "--steps", "3"]


def test_json_csv_plot_and_images(tmp_path, capsys):
    out = {name: tmp_path / name for name in ("out.json", "out.csv", "pareto.png", "images")}
    assert (
        main(
            [
                *TINY,
                "--methods",
                "baseline,ase:linear:0.5,fbcache:0.1,taylorseer:2",
                "--json",
                str(out["out.json"]),
                "--csv",
                str(out["out.csv"]),
                "--plot",
                str(out["pareto.png"]),
                "--save-images",
                str(out["images"]),
            ]
        )
        == 0
    )
    report = json.loads(out["out.json"].read_text())
    assert set(report) == {"config", "rows", "notes"} and report["notes"] == {}
    assert report["config"]["steps"] == [3] and report["config"]["scheduler"] == ["dpm-solver++"]
    assert [list(row) for row in report["rows"]] == [list(ROW_KEYS)] * 4
    assert [row["method"] for row in report["rows"]] == ["baseline", "ase:linear:0.5", "fbcache:0.1", "taylorseer:2"]
    with open(out["out.csv"]) as file:
        rows = list(csv.DictReader(file))
    assert list(rows[0]) == [*ROW_KEYS, "note"] and len(rows) == 4 and rows[0]["speedup"] == "1.0"
    png = out["pareto.png"].read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 1000
    names = sorted(path.relative_to(out["images"]).as_posix() for path in out["images"].rglob("*.png"))
    assert names[:6] == [f"ase_linear_0.5/{i:05d}_class{i}.png" for i in range(6)]
    assert len(names) == 24 and "fbcache_0.1/00005_class5.png" in names
    assert "speedup" in capsys.readouterr().out


def test_timed_rounds_that_disagree_are_reported_with_a_warning(monkeypatch, tmp_path, capsys):
    def busy_machine(runs, repeats, warmup, device):  # every call made; the baseline's rounds made to disagree
        for _ in range(warmup + repeats):
            for run in runs.values():
                run()
        return {name: Timing((1.0, 1.0, 1.5, 2.0, 2.0) if name == "baseline" else (0.5,) * 5) for name in runs}

    monkeypatch.setattr(harness, "time_interleaved", busy_machine)
    out = tmp_path / "out.json"
    assert main([*TINY, "--methods", "baseline,ase:linear:0.5", "--repeats", "5", "--json", str(out)]) == 0
    printed = capsys.readouterr()
    assert "warning: the 5 timed rounds of baseline (dpm-solver++, 3 steps) disagree by 67%" in printed.err
    assert "--threads" in printed.err and "ase:linear:0.5" not in printed.err
    baseline, ase = json.loads(out.read_text())["rows"]
    assert baseline["timing_spread"] == pytest.approx(1.0 / 1.5) and ase["timing_spread"] == 0.0
    assert ase["speedup"] == 3.0  # the median of the per-round ratios 2, 2, 3, 4, 4
    assert baseline["images_per_s"] == pytest.approx(2 / 1.5) and ase["images_per_s"] == 4.0  # batches of 2


def test_pareto_front():
    # x: images/s (higher is better), y: FID (lower is better)
    assert pareto_front([(1, 5), (2, 6), (3, 4), (0.5, 7)]) == [2]
    assert pareto_front([(1, 1), (2, 2), (3, 3)]) == [0, 1, 2]


def test_default_methods_on_a_model_without_a_shipped_sibling(capsys):
    assert main(TINY) == 0
    printed = capsys.readouterr().out
    assert "baseline" in printed and "ase:linear:0.5" in printed


def test_xformers_off_cuda_or_missing_stops_with_what_to_do(capsys):
    assert main([*TINY, "--xformers"]) == 2  # the default device is the CPU
    assert "CUDA devices only" in capsys.readouterr().err
    if importlib.util.find_spec("xformers") is not None:
        pytest.skip("xformers is installed here")
    with pytest.raises(ImportError, match=r"pip install 'ee-diffusion\[xformers\]'"):  # before anything is loaded
        BenchConfig(model="random:dit-tiny", device="cuda", xformers=True)


def test_a_bad_method_stops_the_parser_with_a_message(capsys):  # the other bad options: tests/test_cli_errors.py
    with pytest.raises(SystemExit) as stop:
        main([*TINY, "--methods", "baseline,warp:9"])
    assert stop.value.code == 2 and "error: argument --methods: Unknown method 'warp:9'" in capsys.readouterr().err


def _pixels(folder):
    return {path.relative_to(folder).as_posix(): np.asarray(Image.open(path)) for path in folder.rglob("*.png")}


def test_two_processes_make_the_same_images_as_one(tmp_path):
    args = [*TINY, "--num-samples", "5", "--methods", "baseline,fbcache:0.2"]
    assert main([*args, "--save-images", str(tmp_path / "one")]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # What the README says: `accelerate launch --multi_gpu` starts the processes through torchrun, CPUs or not (its
    # `--cpu` launcher starts one process unless MPI is set up); the bench joins them with gloo on the CPU.
    launch = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "-m",
        "ee_diffusion.cli",
    ]
    done = subprocess.run(
        [*launch, *args, "--save-images", str(tmp_path / "two")], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "2 process(es)" in done.stdout
    one, two = _pixels(tmp_path / "one"), _pixels(tmp_path / "two")
    assert len(one) == 10 and one.keys() == two.keys()
    assert all(np.array_equal(one[name], two[name]) for name in one)
