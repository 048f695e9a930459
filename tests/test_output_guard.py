"""Nothing shipped is overwritten, and no output is left half-written: the guard (`ee_diffusion.outputs`) and every
command that writes."""

from __future__ import annotations

import json

import pytest

from ee_diffusion.cli import main
from ee_diffusion.outputs import (
    OutputKind,
    check_output_file,
    check_output_folder,
    refuse_shipped,
    rows_csv,
    rows_json,
    staged_file,
    staged_folder,
)
from tests.conftest import SHIPPED_ASSETS, asset_hashes

KIND = OutputKind("ee-diffusion thing", ("model.json", "weights/*"), resumable=True)


def _exit(argv, capsys):
    try:
        code = main(argv)
    except SystemExit as stop:
        code = stop.code
    return code, capsys.readouterr().err


@pytest.mark.parametrize(
    "path",
    [
        SHIPPED_ASSETS,
        SHIPPED_ASSETS / "digits-dit",
        SHIPPED_ASSETS / "new-model",
        SHIPPED_ASSETS / "digits-dit-ase" / "plans" / "dpm-solver++-10",
    ],
)
def test_the_shipped_models_are_refused(path):
    with pytest.raises(ValueError, match="inside the models shipped with ee-diffusion"):
        refuse_shipped(path)
    with pytest.raises(ValueError, match="inside the models shipped"):
        check_output_folder(path, KIND, overwrite=True)
    with pytest.raises(ValueError, match="inside the models shipped"):
        check_output_file(path / "rows.json", overwrite=True)


def test_a_relative_path_into_the_assets_is_refused_too(monkeypatch):
    monkeypatch.chdir(SHIPPED_ASSETS / "digits-dit")
    with pytest.raises(ValueError, match="inside the models shipped"):
        refuse_shipped("../digits-dit-ase/plans/x")


def _earlier_output(folder):
    (folder / "weights").mkdir(parents=True)
    (folder / "model.json").write_text("{}")
    (folder / "weights" / "a.bin").write_bytes(b"1")


@pytest.mark.parametrize(
    "overwrite, resume, message",
    [
        (False, False, "holds an earlier output of ee-diffusion thing; pass --overwrite to replace it or --resume"),
        (True, False, None),
        (False, True, None),
    ],
)
def test_an_earlier_output_needs_overwrite_or_resume(tmp_path, overwrite, resume, message):
    _earlier_output(tmp_path / "out")
    if message is None:
        check_output_folder(tmp_path / "out", KIND, overwrite=overwrite, resume=resume)
    else:
        with pytest.raises(ValueError, match=message):
            check_output_folder(tmp_path / "out", KIND, overwrite=overwrite, resume=resume)


@pytest.mark.parametrize("stray", ["notes.txt", "weights2/a.bin", "sub/model.json"])
def test_a_folder_holding_anything_else_is_refused_even_with_overwrite(tmp_path, stray):
    _earlier_output(tmp_path / "out")
    (tmp_path / "out" / stray).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / "out" / stray).write_text("mine")
    with pytest.raises(ValueError, match=f"holds {stray}, which ee-diffusion thing does not write"):
        check_output_folder(tmp_path / "out", KIND, overwrite=True)


def test_new_and_empty_folders_are_fine_and_a_file_or_nothing_to_resume_is_not(tmp_path):
    check_output_folder(tmp_path / "new", KIND)
    (tmp_path / "empty").mkdir()
    check_output_folder(tmp_path / "empty", KIND)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file, not a folder"):
        check_output_folder(tmp_path / "file", KIND)
    with pytest.raises(ValueError, match="Nothing to resume"):
        check_output_folder(tmp_path / "new", KIND, resume=True)
    with pytest.raises(ValueError, match="cannot resume"):
        check_output_folder(tmp_path / "new", OutputKind("ee-diffusion once", ("x",)), resume=True)


def test_an_existing_file_needs_overwrite(tmp_path):
    check_output_file(tmp_path / "a" / "rows.json")
    (tmp_path / "rows.json").write_text("[]")
    with pytest.raises(ValueError, match="exists; pass --overwrite"):
        check_output_file(tmp_path / "rows.json")
    check_output_file(tmp_path / "rows.json", overwrite=True)
    with pytest.raises(ValueError, match="is a folder"):
        check_output_file(tmp_path, overwrite=True)


@pytest.mark.parametrize(
    "written_by, earlier, other",
    [
        (rows_json, '{"config": {}, "rows": [{"method": "baseline"}]}', '{"name": "my settings"}'),
        (rows_json, '[{"method": "full", "task": "addition"}]', "[1, 2]"),
        (rows_csv, "method,model,scheduler\nbaseline,m,s\n", "a,b\n1,2\n"),
    ],
)
def test_overwrite_replaces_only_a_file_of_the_kind_the_command_writes(tmp_path, written_by, earlier, other):
    (tmp_path / "earlier").write_text(earlier)
    check_output_file(tmp_path / "earlier", overwrite=True, earlier_output=written_by)
    (tmp_path / "other").write_text(other)
    with pytest.raises(ValueError, match="is not an earlier output of this command, and is never overwritten"):
        check_output_file(tmp_path / "other", overwrite=True, earlier_output=written_by)


def test_an_interrupted_write_leaves_the_earlier_output_as_it_was(tmp_path):
    _earlier_output(tmp_path / "out")
    with pytest.raises(KeyboardInterrupt):
        with staged_folder(tmp_path / "out") as folder:
            (folder / "model.json").write_text('{"new": true}')
            raise KeyboardInterrupt
    assert (tmp_path / "out" / "model.json").read_text() == "{}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # the half-written sibling is gone
    with staged_folder(tmp_path / "out") as folder:
        (folder / "model.json").write_text('{"new": true}')
        assert not (tmp_path / "out" / "weights").exists() or (tmp_path / "out" / "model.json").read_text() == "{}"
    assert (tmp_path / "out" / "model.json").read_text() == '{"new": true}'
    assert not (tmp_path / "out" / "weights").exists()  # replaced whole, not merged
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_resumable_run_keeps_its_sibling_and_continues_from_it(tmp_path):
    with pytest.raises(RuntimeError):
        with staged_folder(tmp_path / "out", keep_on_failure=True) as folder:
            (folder / "checkpoint").write_text("step 5")
            raise RuntimeError("power cut")
    assert not (tmp_path / "out").exists()
    with staged_folder(tmp_path / "out", resume=True, keep_on_failure=True) as folder:
        assert (folder / "checkpoint").read_text() == "step 5"
        (folder / "checkpoint").write_text("step 10")
    assert (tmp_path / "out" / "checkpoint").read_text() == "step 10"
    with staged_folder(tmp_path / "out", resume=True) as folder:  # a finished run continues from a copy of it
        assert (folder / "checkpoint").read_text() == "step 10"


def test_a_staged_file_appears_whole_and_creates_its_folder(tmp_path):
    target = tmp_path / "new" / "deeper" / "plot.png"
    with pytest.raises(RuntimeError):
        with staged_file(target) as path:
            assert path.suffix == ".png" and path.parent == target.parent
            path.write_text("half")
            raise RuntimeError
    assert list(target.parent.iterdir()) == []
    with staged_file(target) as path:
        path.write_text("whole")
    assert target.read_text() == "whole" and [p.name for p in target.parent.iterdir()] == ["plot.png"]


def test_the_python_savers_refuse_the_shipped_models():
    from ee_diffusion import ExitSchedule, load_early_exit_pipeline
    from ee_diffusion.exits import ExitHeads

    folder = SHIPPED_ASSETS / "digits-dit"
    with pytest.raises(ValueError, match="inside the models shipped"):
        ExitSchedule.linear(12, 6).save_pretrained(folder / "exit_schedule")
    with pytest.raises(ValueError, match="inside the models shipped"):
        ExitHeads.from_pretrained(folder / "exit_heads").save_pretrained(folder / "exit_heads")
    with pytest.raises(ValueError, match="inside the models shipped"):
        load_early_exit_pipeline("digits-dit").save_pretrained(folder)


# Every command that writes, aimed at the shipped models: refused with exit status 2 before anything is loaded.
ASSET_CASES = [
    ["train", "--arch", "dit", "--out", "ee_diffusion/assets/digits-dit"],
    ["train", "--arch", "classifier", "--out", "ee_diffusion/assets/digits-classifier", "--overwrite"],
    [
        "finetune-ase",
        "--model",
        "digits-dit",
        "--schedule",
        "linear:6",
        "--out",
        "ee_diffusion/assets/digits-dit-ase",
        "--overwrite",
    ],
    ["train-uem", "--out", "ee_diffusion/assets/digits-dit/exit_heads", "--overwrite"],
    ["train-mdlm", "--out", "ee_diffusion/assets/tiny-mdlm", "--resume"],
    [
        "calibrate",
        "--model",
        "digits-dit-ase",
        "--steps",
        "4",
        "--tolerance",
        "0.1",
        "--out",
        "ee_diffusion/assets/digits-dit-ase/plans/dpm-solver++-10",
        "--overwrite",
    ],
    ["sweep", "--out", "ee_diffusion/assets/sweep"],
    ["bench", "--json", "ee_diffusion/assets/rows.json"],
    ["bench", "--csv", "ee_diffusion/assets/digits-dit/rows.csv"],
    ["bench", "--plot", "ee_diffusion/assets/front.png", "--overwrite"],
    ["bench", "--save-images", "ee_diffusion/assets/digits-dit"],
    ["speed", "--json", "ee_diffusion/assets/speed.json"],
    ["dllm-bench", "--json", "ee_diffusion/assets/tiny-mdlm/rows.json"],
    ["dllm-bench", "--plot", "ee_diffusion/assets/fronts.png"],
]


@pytest.mark.parametrize("argv", ASSET_CASES, ids=[" ".join(argv[:2]) + " " + argv[-1] for argv in ASSET_CASES])
def test_every_command_refuses_the_shipped_models_and_leaves_them_byte_identical(argv, capsys, monkeypatch):
    monkeypatch.chdir(SHIPPED_ASSETS.parents[1])
    before = asset_hashes()
    code, err = _exit(argv, capsys)
    assert code == 2 and "inside the models shipped with ee-diffusion" in err and "Traceback" not in err
    assert asset_hashes() == before


# Every command that writes a folder, aimed at a folder of someone else's files, or at its own earlier output.
FOLDER_CASES = [
    ["train", "--arch", "dit", "--steps", "1"],
    ["finetune-ase", "--model", "digits-dit", "--schedule", "linear:6", "--steps", "1"],
    ["train-uem", "--steps", "1"],
    ["train-mdlm", "--steps", "1"],
    ["calibrate", "--tolerance", "0.1"],
    ["sweep"],
]


@pytest.mark.parametrize("argv", FOLDER_CASES, ids=[argv[0] for argv in FOLDER_CASES])
def test_every_command_refuses_a_folder_of_other_files(argv, tmp_path, capsys):
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "holiday.jpg").write_bytes(b"\xff\xd8")
    code, err = _exit([*argv, "--out", str(tmp_path / "photos"), "--overwrite"], capsys)
    assert code == 2 and "holds holiday.jpg, which ee-diffusion" in err and "Give an empty or new folder" in err
    assert [p.name for p in (tmp_path / "photos").iterdir()] == ["holiday.jpg"]


@pytest.mark.parametrize(
    "argv, earlier",
    [
        (FOLDER_CASES[0], ["model_index.json", "transformer/config.json"]),
        (FOLDER_CASES[2], ["config.json", "diffusion_pytorch_model.safetensors", "README.md"]),
        (FOLDER_CASES[3], ["config.json", "checkpoint/model.safetensors"]),
        (FOLDER_CASES[4], ["exit_schedule.json", "calibration.json"]),
        (FOLDER_CASES[5], ["sweep.json", "plans/dpm-solver++-6-0.5/exit_schedule.json"]),
    ],
    ids=["train", "train-uem", "train-mdlm", "calibrate", "sweep"],
)
def test_every_command_refuses_its_own_earlier_output_without_overwrite(argv, earlier, tmp_path, capsys):
    for name in earlier:
        (tmp_path / "out" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "out" / name).write_text("{}")
    code, err = _exit([*argv, "--out", str(tmp_path / "out")], capsys)
    assert code == 2 and "holds an earlier output of ee-diffusion" in err and "--overwrite" in err


def test_bench_files_need_overwrite_and_are_replaced_with_it(tmp_path, capsys):
    tiny = [
        "bench",
        "--model",
        "random:dit-tiny",
        "--methods",
        "baseline",
        "--num-samples",
        "2",
        "--batch-size",
        "2",
        "--repeats",
        "1",
        "--steps",
        "2",
    ]
    (tmp_path / "rows.json").write_text("mine")
    (tmp_path / "notes.csv").write_text("a,b\n1,2\n")
    for option, name in (("--json", "rows.json"), ("--csv", "notes.csv")):
        code, err = _exit([*tiny, option, str(tmp_path / name)], capsys)
        assert code == 2 and "exists; pass --overwrite to replace it" in err
        code, err = _exit([*tiny, option, str(tmp_path / name), "--overwrite"], capsys)  # not a bench's: never
        assert code == 2 and "is not an earlier output of this command, and is never overwritten" in err
    assert (tmp_path / "rows.json").read_text() == "mine" and (tmp_path / "notes.csv").read_text() == "a,b\n1,2\n"
    (tmp_path / "rows.json").unlink()
    assert main([*tiny, "--json", str(tmp_path / "rows.json")]) == 0
    assert main([*tiny, "--json", str(tmp_path / "rows.json"), "--overwrite"]) == 0  # its own earlier output
    assert json.loads((tmp_path / "rows.json").read_text())["rows"][0]["method"] == "baseline"
    csv = tmp_path / "new" / "folder" / "rows.csv"
    assert main([*tiny, "--csv", str(csv), "--plot", str(tmp_path / "front.png")]) == 0  # its folders are created
    assert main([*tiny, "--csv", str(csv), "--plot", str(tmp_path / "front.png"), "--overwrite"]) == 0
    expected = ["folder", "front.png", "new", "notes.csv", "rows.csv", "rows.json"]
    assert sorted(p.name for p in tmp_path.rglob("*")) == expected
