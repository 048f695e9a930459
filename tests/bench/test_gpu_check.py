"""`make gpu-check`'s per-call measurements (`ee_diffusion.bench.gpu_check`), on the CPU: every form measured, the JSON
the check writes, and its refusal without a CUDA device."""

import json

import pytest
import torch

from ee_diffusion.bench import gpu_check
from ee_diffusion.bench.gpu_check import FORMS, main, measure_calls, report


@pytest.mark.timeout(60)
def test_every_form_of_the_call_is_timed():
    torch._dynamo.reset()
    calls = measure_calls(
        "random:dit-tiny", device="cpu", dtype="float32", batch_size=2, repeats=2, warmup=1, backend="aot_eager"
    )
    torch._dynamo.reset()
    assert set(calls) == {"model", "dtype", "batch_size", "repeats", "warmup", "backend", "seconds", "forms"}
    assert calls["model"] == "random:dit-tiny" and calls["backend"] == "aot_eager" and calls["seconds"] > 0
    assert (
        tuple(calls["forms"])
        == FORMS
        == (
            "eager",
            "deediff_previous_step",
            "deediff_per_block",
            "compiled_blocks",
            "compiled_transformer",
        )
    )
    for row in calls["forms"].values():
        assert set(row) == {"median_ms", "spread", "host_syncs"}
        assert row["median_ms"] > 0 and row["spread"] >= 0 and row["host_syncs"] is None  # nothing waits on the CPU
    rows = report(calls, [])
    assert set(rows) == {"device", "torch", "cuda", "diffusers", "date", "calls", "bench"}
    assert json.loads(json.dumps(rows))["calls"] == calls


def test_the_report_holds_the_rows_of_each_bench_run(tmp_path):
    bench = tmp_path / "xl-compiled.json"
    bench.write_text(json.dumps({"config": {"compile": True}, "rows": [{"method": "baseline"}], "notes": {}}))
    rows = report({"forms": {}}, [str(bench)])
    assert rows["bench"] == {
        "xl-compiled": {"config": {"compile": True}, "rows": [{"method": "baseline"}], "notes": {}}
    }


def test_without_cuda_it_says_so_and_writes_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(gpu_check, "measure_calls", lambda: pytest.fail("measured without a CUDA device"))
    out = tmp_path / "gpu-check.json"
    assert main([str(out)]) == 2
    assert "CUDA device" in capsys.readouterr().err and not out.exists()


def test_only_the_random_models_are_measured():
    with pytest.raises(ValueError, match="`model` must be one of .*random:dit-xl-2.*got 'digits-dit'"):
        measure_calls("digits-dit", device="cpu")
