"""The demo (`app.py`), served on 127.0.0.1 and called through `gradio_client`, as a script would."""

import json
import socket

import pytest
from PIL import Image

import app
from ee_diffusion.pipelines.loading import shipped_model_path


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def client():
    from gradio_client import Client

    demo = app.serve(port=_free_port(), prevent_thread_lock=True, quiet=True)
    try:
        yield Client(demo.local_url, verbose=False)
    finally:
        demo.close()


def _images(client, model="digits-dit", labels="3,7", scheduler="dpm-solver++", steps=6, acceleration=app.SHAPE,
            shape="linear", min_depth=0.5, folder="", threshold=""):  # fmt: skip
    return client.predict(model, labels, scheduler, steps, 0, 2.0, acceleration, shape, min_depth, folder, threshold,
                          api_name="/generate_images")  # fmt: skip


def test_every_endpoint_is_named(client):
    assert {"/generate_images", "/decode_text", "/read_bench"} <= set(client.view_api(print_info=False,
                                                                                       return_format="dict")[
        "named_endpoints"])


def test_image_tab_runs_both_and_reports_the_work(client):
    full, fast, summary, numbers, plot = _images(client)
    for path in (full, fast):
        with Image.open(path) as image:
            assert image.size == (2 * 128, 128)  # two 32x32 digits side by side, scaled to 128 pixels high
    assert "Speedup" in summary and numbers["speedup"] > 0
    # linear to half depth (6 of 12 blocks) at the noisiest step, deeper step by step as the noise goes
    assert numbers["method"] == "ase:linear:0.500" and 0.5 < numbers["block_fraction"] < 1
    depths = numbers["depth_per_step"]
    assert len(depths) == 6 and depths[0] == 6 and depths == sorted(depths) and depths[-1] > 10
    assert plot is not None


def test_image_tab_other_accelerators(client):
    own = _images(client, model="digits-dit-ase", acceleration=app.OWN)[3]
    assert own["method"] == "finetuned:digits-dit-ase" and own["block_fraction"] < 1
    plan = shipped_model_path("digits-dit-ase") / "plans" / "dpm-solver++-10"
    planned = _images(client, model="digits-dit-ase", steps=10, acceleration=app.FOLDER, folder=str(plan))[3]
    calibrated = json.loads((plan / "calibration.json").read_text())["compute_fraction"]
    assert planned["block_fraction"] == pytest.approx(calibrated, abs=1e-4)  # the app rounds to 4 places
    cache = _images(client, acceleration="FirstBlockCache (diffusers)", threshold="0.5")[3]
    assert cache["method"] == "fbcache:0.5" and len(cache["depth_per_step"]) == 6 and cache["block_fraction"] < 1
    heads = _images(client, acceleration=app.DEEDIFF, threshold="0")[3]
    assert heads["block_fraction"] > 1  # threshold 0: every block, and the heads' own work on top


@pytest.mark.parametrize(
    "change, message",
    [
        ({"model": "/nonexistent/folder"}, "neither a shipped model"),
        ({"labels": "3,x"}, "Class labels are whole numbers"),
        ({"labels": "12"}, "must lie in [0, 9]"),
        ({"steps": 0}, "Steps must be a whole number"),
        ({"acceleration": app.FOLDER, "folder": "/tmp"}, "must hold an exit_schedule.json"),
        ({"acceleration": app.OWN}, "has no exit schedule of its own"),
        ({"model": "digits-unet", "acceleration": app.DEEDIFF}, "cannot run on digits-unet"),
        ({"acceleration": app.DEEDIFF, "threshold": "-1"}, "threshold must be a number >= 0"),
    ],
)
def test_image_tab_bad_input_is_a_message_and_the_app_keeps_serving(client, change, message):
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError, match=message.replace("[", r"\[").replace("]", r"\]")):
        _images(client, **change)
    assert _images(client, steps=2)[3]["speedup"] > 0


def test_a_schedule_for_another_model_is_refused(client, tmp_path):
    from gradio_client.exceptions import AppError

    from ee_diffusion import ExitSchedule

    ExitSchedule.linear(20, 10).save_pretrained(tmp_path)  # digits-dit has 12 blocks
    with pytest.raises(AppError, match="12"):
        _images(client, acceleration=app.FOLDER, folder=str(tmp_path))


def test_text_tab_decodes_with_every_method(client):
    summary, numbers, fill = client.predict("tiny-mdlm", "123+4567=", 18, api_name="/decode_text")
    assert set(numbers) == set(app.TEXT_METHODS)
    assert all(result["answer"] == "4690" for result in numbers.values())
    assert numbers["full steps"]["passes"] == 18 and numbers["Prophet"]["passes"] < 18
    headers, rows = fill["headers"], fill["data"]
    assert headers == ["pass", *app.TEXT_METHODS] and rows[-1][0] == "final"
    assert rows[0][1] == app.MASK * 18  # the first pass sees the answer all masked
    assert rows[-1][1].startswith("4690" + app.END)
    cached = headers.index("Fast-dLLM threshold 0.7 + prefix KV cache")
    assert rows[0][cached] == app.MASK * 18 and rows[-1][cached].startswith("4690" + app.END)


def test_text_tab_serves_the_puzzles_model(client):
    summary, numbers, fill = client.predict("tiny-mdlm-puzzles", "perm:3141592=", 18, api_name="/decode_text")
    assert sorted(numbers["full steps"]["answer"]) == sorted("3141592") and numbers["full steps"]["passes"] == 18
    assert all(1 <= result["passes"] <= 18 for result in numbers.values())
    fast = numbers["Fast-dLLM threshold 0.7"]  # on this model the per-token rule is the one that wins
    assert sorted(fast["answer"]) == sorted("3141592") and fast["passes"] < 18


@pytest.mark.parametrize("model, prompt, steps, message", [
    ("tiny-mdlm", "12+é=", 18, "characters the tokenizer does not know"), ("tiny-mdlm", "", 18, "Write a prompt"),
    ("tiny-mdlm-puzzles", "", 18, "for example 'perm:3141592='"), ("tiny-mdlm", "1+1=", 0, "Steps must be"),
    ("tiny-mlm", "1+1=", 18, "Value: tiny-mlm is not in the list of choices")])  # fmt: skip
def test_text_tab_bad_input(client, model, prompt, steps, message):
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError, match=message):
        client.predict(model, prompt, steps, api_name="/decode_text")
    assert client.predict("tiny-mdlm", "sort:93120=", 18, api_name="/decode_text")[1]["full steps"]["answer"] == "01239"


def test_bench_tab_reads_a_bench_json(client, tmp_path):
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    from ee_diffusion.bench.report import BenchRow, write_json

    rows = [BenchRow("baseline", "digits-dit", "dpm-solver++", 10, 100, 8.0, 0.1, 0.95, 4.0, 0.02, 1.0, 1.0, None),
            BenchRow("ase:linear:6", "digits-dit", "dpm-solver++", 10, 100, 9.0, 0.2, 0.9, 6.0, 0.03, 1.5, 0.7, None,
                     depth_per_step=[6.0] * 10)]  # fmt: skip
    write_json(str(tmp_path / "bench.json"), {}, rows)
    table, image = client.predict(handle_file(str(tmp_path / "bench.json")), api_name="/read_bench")
    assert [row[0] for row in table["data"]] == ["baseline", "ase:linear:6"] and "fid" in table["headers"]
    assert Image.open(image).size[0] > 0
    (tmp_path / "other.json").write_text('{"steps": [1]}')
    with pytest.raises(AppError, match="not a bench JSON"):
        client.predict(handle_file(str(tmp_path / "other.json")), api_name="/read_bench")


@pytest.mark.parametrize("argv", [["--port", "0"], ["--port", "-1"], ["--port", "x"]])
def test_a_bad_port_is_a_usage_error_before_anything_starts(argv, capsys):
    with pytest.raises(SystemExit) as exit_:
        app.main(argv)
    assert exit_.value.code == 2 and "error: argument --port" in capsys.readouterr().err
