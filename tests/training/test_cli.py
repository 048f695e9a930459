import json

from ee_diffusion import EarlyExitDiTPipeline, ExitSchedule, load_early_exit_pipeline
from ee_diffusion.cli import main


def test_train_then_finetune_ase_writes_pipeline_folders(tmp_path):
    base, tuned = tmp_path / "base", tmp_path / "tuned"
    assert (
        main(["train", "--arch", "dit", "--out", str(base), "--steps", "2", "--batch-size", "4", "--threads", "1"])
        == 0
    )
    assert (base / "checkpoint.pt").exists()
    card = (base / "README.md").read_text()
    assert "ee-diffusion train --arch dit" in card and "Steps: 2" in card
    weights = next((base / "transformer").glob("*.safetensors"))
    assert weights.stat().st_size < 6e6  # 2.45M parameters in fp16

    assert (
        main(
            [
                "finetune-ase",
                "--model",
                str(base),
                "--schedule",
                "step:12,10,8,6",
                "--out",
                str(tuned),
                "--steps",
                "1",
                "--batch-size",
                "4",
                "--threads",
                "1",
            ]
        )
        == 0
    )
    pipe = load_early_exit_pipeline(str(tuned))
    assert isinstance(pipe, EarlyExitDiTPipeline) and pipe.vae is None
    assert pipe.exit_schedule == ExitSchedule.step(12, [12, 10, 8, 6])
    assert json.loads((tuned / "exit_schedule" / "exit_schedule.json").read_text())["table"] == [12, 10, 8, 6]
    assert "ASE fine-tuned from" in (tuned / "README.md").read_text()


def test_train_records_the_prediction_type_and_finetune_ase_keeps_it(tmp_path):
    base, tuned = tmp_path / "base", tmp_path / "tuned"
    assert (
        main(
            [
                "train",
                "--arch",
                "unet",
                "--prediction-type",
                "v_prediction",
                "--out",
                str(base),
                "--steps",
                "1",
                "--batch-size",
                "2",
                "--threads",
                "1",
            ]
        )
        == 0
    )
    assert load_early_exit_pipeline(str(base)).scheduler.config.prediction_type == "v_prediction"
    assert (
        main(
            [
                "finetune-ase",
                "--model",
                str(base),
                "--schedule",
                "linear:6",
                "--out",
                str(tuned),
                "--steps",
                "1",
                "--batch-size",
                "2",
                "--threads",
                "1",
            ]
        )
        == 0
    )
    assert load_early_exit_pipeline(str(tuned)).scheduler.config.prediction_type == "v_prediction"
