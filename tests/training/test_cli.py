import json

import torch

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
                "--target",
                "teacher",
            ]
        )
        == 0
    )
    assert torch.load(tuned / "checkpoint.pt", weights_only=False)["config"]["target"] == "teacher"
    pipe = load_early_exit_pipeline(str(tuned))
    assert isinstance(pipe, EarlyExitDiTPipeline) and pipe.vae is None
    assert pipe.exit_schedule == ExitSchedule.step(12, [12, 10, 8, 6])
    assert json.loads((tuned / "exit_schedule" / "exit_schedule.json").read_text())["table"] == [12, 10, 8, 6]
    assert "_name_or_path" not in json.loads((tuned / "transformer" / "config.json").read_text())  # where base was
    assert (
        "ASE fine-tuned from" in (tuned / "README.md").read_text()
        and "--target teacher" in (tuned / "README.md").read_text()
    )


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


def test_finetune_ase_of_digits_flux_writes_an_early_exit_flux_folder_that_samples_under_its_schedule(tmp_path):
    from diffusers import FluxPipeline
    from safetensors.torch import load_file

    from ee_diffusion import EarlyExitFluxPipeline

    tuned = tmp_path / "flux-ase"
    argv = ["finetune-ase", "--model", "digits-flux", "--schedule", "step:8,6,4,2", "--out", str(tuned)]
    argv += ["--steps", "2", "--warmup-steps", "1", "--lr", "1e-2", "--batch-size", "4", "--threads", "1"]
    argv += ["--eval-samples", "2", "--eval-steps", "2", "--target", "teacher"]
    assert main(argv) == 0
    index = json.loads((tuned / "model_index.json").read_text())
    assert index["_class_name"] == "EarlyExitFluxPipeline" and "_name_or_path" not in index
    card = (tuned / "README.md").read_text()
    words = " ".join(card.split())
    assert "ASE fine-tuned under the exit schedule `step:8,6,4,2`" in words
    assert "each exit learning the base model's full-depth velocity" in words
    assert "| euler | 2 | 8 | off |" in card and "| dpm-solver++ | 2 | 8 | off |" in card
    assert all(
        t.dtype == torch.float16
        for t in load_file(tuned / "transformer" / "diffusion_pytorch_model.safetensors").values()
    )
    pipe = load_early_exit_pipeline(str(tuned))
    assert isinstance(pipe, EarlyExitFluxPipeline) and pipe.exit_schedule == ExitSchedule.step(8, [8, 6, 4, 2])
    base = FluxPipeline.from_pretrained(load_early_exit_pipeline("digits-flux").name_or_path)
    changed = [
        name
        for name, weight in pipe.transformer.state_dict().items()
        if not torch.equal(weight, base.transformer.state_dict()[name])
    ]
    assert changed and not any("timestep_embedder" in name for name in changed)  # trained; its embedding frozen
    for part in ("vae", "text_encoder"):
        assert all(
            torch.equal(a, b) for a, b in zip(getattr(pipe, part).parameters(), getattr(base, part).parameters())
        )
    pipe.set_progress_bar_config(disable=True)
    out = pipe(
        "a handwritten seven", height=32, width=32, num_inference_steps=4, max_sequence_length=8, output_type="pt"
    )
    assert out.images.shape == (1, 1, 32, 32)
    depths = pipe.exit_schedule.depths_for(pipe.scheduler.timesteps)
    assert pipe.exit_stats.blocks_per_call == depths and sum(depths) < 4 * 8  # the schedule ran
