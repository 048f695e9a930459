"""The demo (`app.py`), served on 127.0.0.1 and called through `gradio_client`, as a script would."""

import json
import os
import re
import shutil
import socket
import subprocess
import sys

import gradio as gr
import pytest
from PIL import Image

import app
from ee_diffusion.shipped import shipped_model_path


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


def _images(
    client,
    model="digits-dit",
    labels="3,7",
    scheduler="dpm-solver++",
    steps=6,
    acceleration=app.SHAPE,
    shape="linear",
    min_depth=0.5,
    folder="",
    threshold="",
    seed=0,
    guidance=2.0,
):
    return client.predict(
        model,
        labels,
        scheduler,
        steps,
        seed,
        guidance,
        acceleration,
        shape,
        min_depth,
        folder,
        threshold,
        api_name="/generate_images",
    )


def test_every_endpoint_is_named(client):
    assert {"/generate_images", "/decode_text", "/read_bench"} <= set(
        client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    )


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
    heads = _images(client, acceleration=app.DEEDIFF, threshold="1e-6")[3]
    assert heads["method"] == "deediff:1e-06"
    assert heads["block_fraction"] > 1  # so low a threshold: every block, and the heads' own work on top


@pytest.mark.parametrize(
    "change, message",
    [
        ({"model": "/nonexistent/folder"}, "neither a shipped model"),
        ({"labels": "3,x"}, "Class labels are whole numbers"),
        ({"labels": "12"}, "must lie in [0, 9]"),
        ({"steps": 0}, "Steps must be a whole number"),
        ({"steps": 2.5}, "Steps must be a whole number from 1 to 1000, got 2.5."),  # not rounded to 2 before the check
        ({"seed": 0.5}, "The seed must be a whole number from 0 to 9223372036854775807, got 0.5."),
        ({"seed": -1}, "The seed must be a whole number from 0 to 9223372036854775807, got -1."),
        ({"guidance": -1.0}, "The guidance scale must be a finite number >= 0, got -1.0."),
        ({"acceleration": app.FOLDER, "folder": "/tmp"}, "must hold an exit_schedule.json"),
        ({"acceleration": app.OWN}, "has no exit schedule of its own"),
        ({"model": "digits-unet", "acceleration": app.DEEDIFF}, "cannot run on digits-unet"),
        (
            {"acceleration": app.DEEDIFF, "threshold": "-1"},
            "The threshold must be a number > 0 (empty: the method's default), got '-1'.",
        ),
        # threshold 0 would make each method a no-op (never skip, never exit): refused, not run as a "speedup" of 1
        ({"acceleration": app.DEEDIFF, "threshold": "0"}, "The threshold must be a number > 0 .*, got '0'."),
        ({"acceleration": "FirstBlockCache (diffusers)", "threshold": "0"}, "must be a number > 0 .*, got '0'."),
        ({"acceleration": "MagCache (diffusers)", "threshold": " 0.0 "}, "must be a number > 0 .*, got '0.0'."),
        ({"acceleration": "MagCache (diffusers)", "threshold": "inf"}, "must be a number > 0 .*, got 'inf'."),
        ({"acceleration": "MagCache (diffusers)", "threshold": "fast"}, "must be a number > 0 .*, got 'fast'."),
    ],
)
def test_image_tab_bad_input_is_a_message_and_the_app_keeps_serving(client, change, message):
    from gradio_client.exceptions import AppError

    pattern = message.replace("[", r"\[").replace("]", r"\]").replace("(", r"\(").replace(")", r"\)")
    with pytest.raises(AppError, match=pattern):
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


@pytest.mark.parametrize(
    "model, prompt, steps, message",
    [
        ("tiny-mdlm", "12+é=", 18, "characters the tokenizer does not know"),
        ("tiny-mdlm", "", 18, "Write a prompt"),
        ("tiny-mdlm-puzzles", "", 18, "for example 'perm:3141592='"),
        ("tiny-mdlm", "1+1=", 0, "Steps must be"),
        ("tiny-mdlm", "1+1=", 2.5, r"Steps must be a whole number from 1 to 18 \(the answer's length\), got 2.5."),
        (
            "tiny-mdlm",
            "1" * 30,
            18,
            r"The prompt \(30 tokens\) and the answer \(`gen_length` 18\) make 48 positions, "
            r"more than the model takes",
        ),
        ("tiny-mlm", "1+1=", 18, "Value: tiny-mlm is not in the list of choices"),
    ],
)
def test_text_tab_bad_input(client, model, prompt, steps, message):
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError, match=message):
        client.predict(model, prompt, steps, api_name="/decode_text")
    answers = client.predict("tiny-mdlm", "sort:93120=", 18, api_name="/decode_text")[1]
    assert answers["full steps"]["answer"] == "01239"


def test_bench_tab_reads_a_bench_json(client, tmp_path):
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    from ee_diffusion.bench.report import BenchRow, write_json

    rows = [
        BenchRow("baseline", "digits-dit", "dpm-solver++", 10, 100, 8.0, 0.1, 0.95, 4.0, 0.02, 1.0, 1.0, None),
        BenchRow(
            "ase:linear:6",
            "digits-dit",
            "dpm-solver++",
            10,
            100,
            9.0,
            0.2,
            0.9,
            6.0,
            0.03,
            1.5,
            0.7,
            None,
            depth_per_step=[6.0] * 10,
        ),
    ]
    write_json(str(tmp_path / "bench.json"), {}, rows)
    table, image = client.predict(handle_file(str(tmp_path / "bench.json")), api_name="/read_bench")
    assert [row[0] for row in table["data"]] == ["baseline", "ase:linear:6"] and "fid" in table["headers"]
    assert Image.open(image).size[0] > 0
    (tmp_path / "other.json").write_text('{"steps": [1]}')
    with pytest.raises(AppError, match="not a bench JSON"):
        client.predict(handle_file(str(tmp_path / "other.json")), api_name="/read_bench")


def _broken_copy(tmp_path, name, path, content):
    """A copy of a shipped model folder with the file `path` inside it overwritten by `content`."""
    folder = tmp_path / name
    shutil.copytree(shipped_model_path("digits-dit"), folder)
    (folder / path).write_bytes(content)
    return folder, folder / path


def _broken_files(tmp_path):
    """(what to pass to the image endpoint, the file the message must name, what the message must say) for a model
    folder with a config that is not JSON, one with weights that are not safetensors, and a schedule folder whose
    exit_schedule.json is not JSON (diffusers raises OSError for these, safetensors its SafetensorError)."""
    config_model, config = _broken_copy(tmp_path, "config", "transformer/config.json", b"{bad")
    weights_model, weights = _broken_copy(
        tmp_path, "weights", "transformer/diffusion_pytorch_model.safetensors", b"garbage" * 10
    )
    schedule = tmp_path / "schedule"
    schedule.mkdir()
    (schedule / "exit_schedule.json").write_text("{bad")
    return [
        ({"model": str(config_model)}, config, "is not a valid JSON file"),
        ({"model": str(weights_model)}, weights, "Unable to load weights"),
        (
            {"acceleration": app.FOLDER, "folder": str(schedule)},
            schedule / "exit_schedule.json",
            "is not a valid JSON file",
        ),
    ]


# The image endpoint's arguments, for calling the function itself (no server).
IMAGE_CALL = dict(
    model="digits-dit",
    labels="3",
    scheduler="dpm-solver++",
    steps=2,
    seed=0,
    guidance=2.0,
    acceleration=app.SHAPE,
    shape="linear",
    min_depth=0.5,
    schedule_folder="",
    threshold="",
)


def test_broken_model_and_schedule_files_are_a_message_naming_the_file(tmp_path):
    for change, path, says in _broken_files(tmp_path):
        change = {("schedule_folder" if key == "folder" else key): value for key, value in change.items()}
        with pytest.raises(gr.Error) as error:
            app.generate_images(**{**IMAGE_CALL, **change})
        assert str(path) in error.value.message and says in error.value.message, error.value.message


def test_broken_files_reach_the_client_as_that_message_not_gradios_generic_one(client, tmp_path):
    from gradio_client.exceptions import AppError

    for change, path, says in _broken_files(tmp_path):
        with pytest.raises(AppError) as error:
            _images(client, steps=2, **change)
        message = str(error.value)
        assert str(path) in message and says in message and "upstream" not in message, message
    assert _images(client, steps=2)[3]["speedup"] > 0  # and the app keeps serving


def test_the_bench_tab_names_a_file_it_cannot_read(tmp_path):
    with pytest.raises(gr.Error) as error:
        app.read_bench(str(tmp_path / "missing.json"))
    assert error.value.message == f"{tmp_path / 'missing.json'}: No such file or directory"


@pytest.mark.parametrize(
    "call, message",
    [
        (dict(steps=2.5), "Steps must be a whole number from 1 to 1000, got 2.5."),
        (dict(steps=float("nan")), "Steps must be a whole number from 1 to 1000, got nan."),
        (dict(steps=None), "Steps must be a whole number from 1 to 1000, got None."),
        (dict(seed=1.5), "The seed must be a whole number from 0 to 9223372036854775807, got 1.5."),
        (
            dict(seed=2.0**64),
            "The seed must be a whole number from 0 to 9223372036854775807, got 1.8446744073709552e+19.",
        ),
        (dict(guidance=float("inf")), "The guidance scale must be a finite number >= 0, got inf."),
    ],
)
def test_number_fields_reach_the_function_as_typed_and_are_checked_there(call, message):
    # precision=None: Gradio passes the number unrounded (precision=0 would turn 2.5 into 2 before any check)
    demo = app.build_demo()
    numbers = [block for block in demo.blocks.values() if isinstance(block, gr.Number)]
    assert {block.label for block in numbers if block.precision is None} >= {"steps", "seed", "steps (full decoding)"}
    assert all(block.preprocess(2.5) == 2.5 for block in numbers)
    with pytest.raises(gr.Error) as error:
        app.generate_images(**{**IMAGE_CALL, **call})
    assert error.value.message == message
    with pytest.raises(gr.Error) as error:
        app.decode_text("tiny-mdlm", "1+1=", call.get("steps", 2.5))
    assert re.fullmatch(
        r"Steps must be a whole number from 1 to 18 \(the answer's length\), got .*\.", error.value.message
    )


@pytest.fixture
def no_server(monkeypatch):
    """`app.serve` replaced by a recorder: the arguments it was called with, and no server."""
    calls = []
    monkeypatch.setattr(app, "serve", lambda host, port: calls.append((host, port)))
    monkeypatch.delenv("GRADIO_SERVER_NAME", raising=False)
    monkeypatch.delenv("GRADIO_SERVER_PORT", raising=False)
    return calls


@pytest.mark.parametrize("argv", [["--port", "0"], ["--port", "-1"], ["--port", "x"], ["--port", "65536"]])
def test_a_bad_port_is_a_usage_error_before_anything_starts(argv, capsys, no_server):
    with pytest.raises(SystemExit) as exit_:
        app.main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and no_server == []
    assert f"error: argument --port: must be a whole number from 1 to 65535, got '{argv[1]}'" in err


@pytest.mark.parametrize(
    "env, argv, served",
    [
        ({}, [], ("127.0.0.1", 7860)),
        (
            {"GRADIO_SERVER_NAME": "0.0.0.0", "GRADIO_SERVER_PORT": "8080"},
            [],
            ("0.0.0.0", 8080),
        ),  # a Space, a container
        ({"GRADIO_SERVER_PORT": "8080"}, [], ("127.0.0.1", 8080)),
        (
            {"GRADIO_SERVER_NAME": "0.0.0.0"},
            ["--host", "localhost", "--port", "9000"],
            ("localhost", 9000),
        ),  # flags win
        ({"GRADIO_SERVER_PORT": "x"}, ["--port", "9000"], ("127.0.0.1", 9000)),  # a bad variable a flag overrides
        ({"GRADIO_SERVER_NAME": "", "GRADIO_SERVER_PORT": " "}, [], ("127.0.0.1", 7860)),  # set but empty: unset
    ],
)
def test_host_and_port_default_to_gradios_environment_variables(monkeypatch, no_server, env, argv, served):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    args = app.build_parser().parse_args(argv)
    assert (args.host, args.port) == served
    app.main(argv)
    assert no_server == [served]


@pytest.mark.parametrize("value", ["x", "0", "70000", "80.5"])
def test_a_bad_gradio_server_port_is_a_usage_error(monkeypatch, capsys, no_server, value):
    monkeypatch.setenv("GRADIO_SERVER_PORT", value)
    with pytest.raises(SystemExit) as exit_:
        app.main([])
    err = capsys.readouterr().err
    message = f"error: argument --port: $GRADIO_SERVER_PORT must be a whole number from 1 to 65535, got '{value}'"
    assert exit_.value.code == 2 and no_server == [] and message in err
    # As a script too: there the check comes before gradio's import, which would fail on the variable with a traceback.
    script = subprocess.run(
        [sys.executable, app.__file__],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "GRADIO_SERVER_PORT": value},
    )
    assert script.returncode == 2 and message in script.stderr and "Traceback" not in script.stderr


@pytest.mark.parametrize(
    "change",
    [
        {"notes": ["a list"]},
        {"rows": [{"method": "baseline", "images_per_s": "fast"}]},
        {"rows": [{"method": "baseline", "depth_per_step": "abc"}]},
    ],
)
def test_the_bench_tab_refuses_a_json_whose_rows_or_notes_are_not_the_benchs(tmp_path, change):
    from ee_diffusion.bench.report import BenchRow, write_json

    row = BenchRow("baseline", "digits-dit", "dpm-solver++", 10, 100, 8.0, 0.1, 0.95, 4.0, 0.02, 1.0, 1.0, None)
    write_json(str(tmp_path / "bench.json"), {}, [row])
    report = json.loads((tmp_path / "bench.json").read_text())
    if "rows" in change:
        report["rows"] = [{**report["rows"][0], **change["rows"][0]}]
    else:
        report.update(change)
    (tmp_path / "bench.json").write_text(json.dumps(report))
    with pytest.raises(gr.Error, match="bench.json is not a bench JSON"):
        app.read_bench(str(tmp_path / "bench.json"))
    report.pop("notes")
    report["rows"] = [json.loads(json.dumps(row.__dict__))]
    (tmp_path / "bench.json").write_text(json.dumps(report))  # without notes: a bench JSON still
    assert len(app.read_bench(str(tmp_path / "bench.json"))[0]) == 1


def test_a_port_that_cannot_be_served_is_a_usage_error(monkeypatch, capsys):
    def taken(host, port):
        raise OSError(f"Cannot find empty port in range: {port}-{port}.")

    monkeypatch.setattr(app, "serve", taken)
    with pytest.raises(SystemExit) as exit_:
        app.main(["--port", "7999"])
    assert exit_.value.code == 2
    assert "error: cannot serve on 127.0.0.1:7999: Cannot find empty port" in capsys.readouterr().err
