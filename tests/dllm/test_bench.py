"""`dllm-bench`: method specs, the sweep's fronts, untimed and timed runs, the plot."""

import json

import pytest

from ee_diffusion import MaskedDiffusionLMPipeline
from ee_diffusion.dllm.bench import BenchRow, best_rows, front, run_dllm_bench
from ee_diffusion.dllm.methods import SWEEP_VALUES, Method, method_settings, parse_method, sweep_methods
from ee_diffusion.dllm.rules import ProphetCommit, SchEDCommit, ThresholdCommit


def test_method_specs_parse_to_settings():
    assert parse_method("full") == Method("full")
    assert parse_method("prophet") == Method("prophet", 7.5) and parse_method("prophet").label == "prophet"
    assert parse_method("sched-exp:6+prefix") == Method("sched-exp", 6.0, "prefix")
    assert parse_method("sched-exp:6+prefix").label == "sched-exp:6+prefix"
    assert (
        parse_method("full+dual/3") == Method("full", None, "dual", 3)
        and parse_method("full+dual/3").label == "full+dual/3"
    )
    assert method_settings("full+prefix/2", 18) == {"steps": 18, "kv_cache": "prefix", "cache_refresh_every": 2}
    assert method_settings("halfsteps", 18) == {"steps": 9}
    assert method_settings("threshold:0.7+dual", 18) == {
        "steps": 18,
        "parallel": ThresholdCommit(0.7),
        "kv_cache": "dual",
    }
    assert method_settings("prophet:3", 18)["early_commit"] == ProphetCommit(thresholds=(3.0, 2.0, 1.0))
    assert method_settings("sched-cosine:6", 18)["early_commit"] == SchEDCommit(6.0, 2.0, "cosine", 4.0)
    assert method_settings("sched-exp", 18)["early_commit"] == SchEDCommit(7.5, 2.5, "exp", 4.0)
    swept = sweep_methods()
    assert len(swept) == sum(map(len, SWEEP_VALUES.values())) and len(set(swept)) == len(swept)
    assert all(parse_method(spec).value is not None for spec in swept)
    assert sweep_methods(("prophet",), cache="dual")[0] == "prophet:1+dual"


@pytest.mark.parametrize(
    "spec",
    [
        "fast",
        "full:2",
        "prophet:",
        "prophet:x",
        "threshold:0",
        "sched-exp:0",
        "full+",
        "full+triple",
        "sched-exp:inf",
        "full+prefix/0",
        "full+prefix/x",
        "full/2",
    ],
)
def test_bad_method_specs_are_refused(spec):
    with pytest.raises(ValueError, match=spec.replace("+", r"\+")):
        parse_method(spec)


@pytest.mark.parametrize(
    "spec, label",
    [
        ("prophet:1e6", "prophet:1e06"),  # no `+`: it would read as a cache
        ("sched-exp:1234567", "sched-exp:1234567"),
        ("threshold:0.9999999", "threshold:0.9999999"),  # not rounded to 1
        ("threshold:0.7+prefix/2", "threshold:0.7+prefix/2"),
        ("prophet:12.5", "prophet:12.5"),
        ("prophet:7.5", "prophet"),
    ],
)
def test_a_methods_label_reads_back_as_the_same_method(spec, label):
    method = parse_method(spec)
    assert method.label == label and parse_method(method.label) == method


def _row(name, value, nfe, accuracy, task="t"):
    return BenchRow(name, name, value, None, task, accuracy, accuracy, nfe, nfe, 1.0, None, None, None)


def test_front_keeps_only_unbeaten_settings():
    rows = [
        _row("r", 1, 2.0, 0.5),
        _row("r", 2, 3.0, 0.9),
        _row("r", 3, 3.0, 0.8),
        _row("r", 4, 5.0, 0.85),
        _row("r", 5, 6.0, 0.95),
    ]
    assert [r.value for r in front(rows)] == [1, 2, 5]
    retained = [_row("a", 1, 4.0, 0.99), _row("a", 2, 3.0, 0.995), _row("a", 3, 2.0, 0.9), _row("b", 1, 5.0, 0.98)]
    assert [(r.name, r.value) for r in best_rows(retained, 0.99)] == [("a", 2)]


def test_untimed_sweep_and_timed_bench_on_the_shipped_model(tmp_path, capsys):
    from ee_diffusion.cli import main

    pipe = MaskedDiffusionLMPipeline.from_pretrained("tiny-mdlm")
    rows = run_dllm_bench(
        pipe,
        ["addition"],
        ["sched-exp:3", "sched-exp:30", "prophet+prefix"],
        num_problems=12,
        batch_size=12,
        repeats=0,
    )
    by_method = {r.method: r for r in rows}
    assert list(by_method) == ["full", "sched-exp:3", "sched-exp:30", "prophet+prefix"]
    assert by_method["full"].nfe == 18 and by_method["full"].retention == 1.0 and by_method["full"].speedup is None
    assert by_method["sched-exp:3"].nfe < by_method["sched-exp:30"].nfe  # a lower threshold fires sooner
    assert by_method["prophet+prefix"].cache == "prefix"

    code = main(
        [
            "dllm-bench",
            "--tasks",
            "addition",
            "--methods",
            "full,halfsteps",
            "--num-problems",
            "6",
            "--batch-size",
            "6",
            "--repeats",
            "1",
            "--warmup",
            "0",
            "--sweep",
            "--json",
            str(tmp_path / "rows.json"),
            "--plot",
            str(tmp_path / "front.png"),
        ]
    )
    out = capsys.readouterr().out
    assert code == 0 and "accuracy-vs-NFE front" in out and "Fewest NFE at >= 99% retention" in out
    saved = json.loads((tmp_path / "rows.json").read_text())
    assert len(saved) == 2 + len(sweep_methods()) and all(r["speedup"] > 0 for r in saved)
    assert (tmp_path / "front.png").stat().st_size > 10_000


def test_bench_runs_the_models_own_tasks_or_asks_for_them(tmp_path, tiny_bert, tokenizer, capsys):
    from ee_diffusion.cli import main

    tiny_bert.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    code = main(["dllm-bench", "--model", str(tmp_path), "--num-problems", "1", "--repeats", "0"])
    assert code == 2 and "does not say which of the tasks" in capsys.readouterr().err
    code = main(["dllm-bench", "--methods", "full", "--num-problems", "2", "--repeats", "0"])  # tiny-mdlm's own two
    assert code == 0 and {
        line.split(" | ")[0]
        for line in capsys.readouterr().out.splitlines()
        if line.startswith("| ") and "---" not in line
    } == {"| task", "| addition", "| sorting"}


def test_where_full_decoding_solves_nothing_retention_is_undefined_not_zero(monkeypatch):
    from ee_diffusion.dllm import bench

    monkeypatch.setattr(bench, "accuracy", lambda problems, texts: 0.0)
    pipe = MaskedDiffusionLMPipeline.from_pretrained("tiny-mdlm")
    rows = run_dllm_bench(pipe, ["addition"], ["threshold"], num_problems=4, batch_size=4, repeats=0)
    assert [r.retention for r in rows] == [None, None] and [r.qps for r in rows] == [None, None]
    assert all(line.split(" | ")[3] == "-" for line in bench.format_rows(rows).splitlines()[2:])
    assert best_rows(rows) == []
