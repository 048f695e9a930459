"""`bench`, `calibrate` and `sweep` on text-to-image pipeline folders: prompts, sizes and guidance as each pipeline's
`__call__` takes them, PSNR/SSIM against the full-compute output where there is no FID reference, and usage errors
before anything loads.

The folders are tiny PixArt-alpha, SD3 and Flux pipelines built from configs (tests/pipelines/conftest.py's
transformers and VAEs), with tiny T5/CLIP text encoders and a word-level tokenizer built in code, saved by their
drop-ins' `save_pretrained`: nothing is downloaded.
"""

from __future__ import annotations

import json

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    PreTrainedTokenizerFast,
    T5Config,
    T5EncoderModel,
)

from ee_diffusion import EarlyExitPixArtAlphaPipeline, EarlyExitStableDiffusion3Pipeline, ExitSchedule
from ee_diffusion.bench import harness
from ee_diffusion.bench.harness import BenchConfig, pipeline_inputs, run_bench
from ee_diffusion.bench.report import ROW_KEYS
from ee_diffusion.cli import main
from ee_diffusion.metrics import PSNR_CAP_DB, image_similarity
from tests.pipelines.conftest import NUM_PIXART_BLOCKS, make_pixart_pipe, make_sd3_pipe

pytestmark = pytest.mark.timeout(300)

WORDS = ["<pad>", "<unk>", "</s>", "a", "cat", "dog", "photo", "of"]
PROMPTS = ["--prompt", "a cat", "--prompt", "a dog"]
SIZES = ["--height", "16", "--width", "16"]


def tokenizer(max_length: int = 8) -> PreTrainedTokenizerFast:
    """A word-level tokenizer of `WORDS`, built in code."""
    words = Tokenizer(models.WordLevel({word: i for i, word in enumerate(WORDS)}, unk_token="<unk>"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=words, pad_token="<pad>", unk_token="<unk>", eos_token="</s>", model_max_length=max_length
    )


def t5(width: int = 16) -> T5EncoderModel:
    torch.manual_seed(0)
    config = T5Config(vocab_size=len(WORDS), d_model=width, d_ff=2 * width, d_kv=8, num_layers=1, num_heads=2)
    return T5EncoderModel(config).eval()


def clip(width: int = 8, projection: bool = True) -> CLIPTextModel:
    torch.manual_seed(0)
    config = CLIPTextConfig(
        vocab_size=len(WORDS),
        hidden_size=width,
        intermediate_size=2 * width,
        num_hidden_layers=1,
        num_attention_heads=2,
        projection_dim=width,
        max_position_embeddings=8,
        bos_token_id=0,
        eos_token_id=2,
        pad_token_id=0,
    )
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config).eval()


def save_pixart(folder) -> None:
    pipe = make_pixart_pipe()
    EarlyExitPixArtAlphaPipeline(
        **{**pipe.components, "tokenizer": tokenizer(), "text_encoder": t5()}
    ).save_pretrained(folder)


def save_sd3(folder) -> None:
    """SD3's two CLIPs (hidden 8 each: their joined width is the transformer's 16) and its T5 (16)."""
    pipe = make_sd3_pipe()
    encoders = {"tokenizer": tokenizer(), "text_encoder": clip(), "tokenizer_2": tokenizer(), "text_encoder_2": clip()}
    encoders.update(tokenizer_3=tokenizer(), text_encoder_3=t5())
    EarlyExitStableDiffusion3Pipeline(**{**pipe.components, **encoders}).save_pretrained(folder)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("prompt-pipelines")
    save_pixart(root / "pixart")
    save_sd3(root / "sd3")
    return root


def _bench(folder, out, *extra):
    argv = ["bench", "--model", str(folder), *PROMPTS, *SIZES, "--num-samples", "2", "--batch-size", "2"]
    return main([*argv, "--steps", "2", "--repeats", "1", "--json", str(out), *extra])


# FirstBlockCache does not apply to SD3 (its last joint block returns no text stream): `pab` there.
@pytest.mark.parametrize("name, accelerator", [("pixart", "fbcache:0.2"), ("sd3", "pab")])
def test_bench_scores_a_prompt_pipeline_against_its_full_compute_output(folders, name, accelerator, tmp_path, capsys):
    out = tmp_path / "rows.json"
    assert _bench(folders / name, out, "--methods", f"baseline,ase:linear:0.5,{accelerator}") == 0
    printed = capsys.readouterr().out
    report = json.loads(out.read_text())
    rows = {row["method"]: row for row in report["rows"]}
    assert list(rows) == ["baseline", "ase:linear:0.5", accelerator]
    assert [list(row) for row in report["rows"]] == [list(ROW_KEYS)] * 3
    assert report["config"]["prompts"] == ["a cat", "a dog"] and report["config"]["height"] == 16
    baseline = rows["baseline"]
    assert baseline["psnr"] == PSNR_CAP_DB and baseline["ssim"] == pytest.approx(1.0)
    for row in rows.values():
        assert row["fid"] is None and row["class_accuracy"] is None and row["images_per_s"] > 0
        assert row["psnr"] <= PSNR_CAP_DB and -1 <= row["ssim"] <= 1 + 1e-9
        assert row["quality_reference"] == "full compute: baseline@2"
    assert rows["ase:linear:0.5"]["block_fraction"] < 1 and rows["ase:linear:0.5"]["psnr"] < PSNR_CAP_DB
    assert "PSNR vs full" in printed and "SSIM vs full" in printed
    assert "note: PSNR/SSIM vs full" in printed and "penalised unfairly" in printed
    guidance = "guidance_scale 4.5" if name == "pixart" else "guidance_scale 7"
    assert f"2 prompt(s) at 16 x 16 px, {guidance}" in printed  # the pipeline's own default guidance


def test_every_method_gets_the_same_seeds_and_prompts_and_without_a_baseline_the_bench_makes_the_reference(folders):
    """No `baseline` row: the bench generates the full-compute output itself; a full-depth schedule reproduces it
    exactly (same seeds, same prompts, batch by batch), and a method at fewer steps is scored against it too."""
    config = BenchConfig(
        model=str(folders / "pixart"),
        methods=[f"ase:constant:{NUM_PIXART_BLOCKS}", "ase:linear:1", f"ase:constant:{NUM_PIXART_BLOCKS}@2"],
        prompts=["a cat", "a dog", "a photo of a cat"],
        height=16,
        width=16,
        num_samples=3,
        batch_size=2,
        steps=3,
        repeats=1,
        guidance_scale=None,
    )
    full, cut, fewer = run_bench(config, progress=False)
    assert full.psnr == PSNR_CAP_DB and full.ssim == pytest.approx(1.0)
    assert cut.psnr < PSNR_CAP_DB and fewer.psnr < PSNR_CAP_DB
    assert {row.quality_reference for row in (full, cut, fewer)} == {"full compute: baseline@3"}
    assert full.speedup is None  # no baseline row to time against


def test_calibrated_plan_on_a_prompt_pipeline_runs_in_the_bench_at_its_steps(folders, tmp_path, capsys):
    plan = tmp_path / "plan"
    argv = ["calibrate", "--model", str(folders / "pixart"), *PROMPTS, *SIZES, "--steps", "2", "--num-probes", "2"]
    assert main([*argv, "--target-compute", "0.7", "--out", str(plan)]) == 0
    record = json.loads((plan / "calibration.json").read_text())
    assert record["prompts"] == ["a cat", "a dog"] and record["guidance_scale"] == 4.5
    assert record["compute_fraction"] <= 0.7 and ExitSchedule.from_pretrained(plan).config.shape == "plan"
    out = tmp_path / "rows.json"
    assert _bench(folders / "pixart", out, "--methods", f"baseline,ase:{plan}") == 0
    rows = {row["method"]: row for row in json.loads(out.read_text())["rows"]}
    assert rows[f"ase:{plan}"]["block_fraction"] == pytest.approx(record["compute_fraction"])
    assert rows[f"ase:{plan}"]["steps"] == 2 and rows[f"ase:{plan}"]["psnr"] is not None
    assert "bench it as --methods ase:" in capsys.readouterr().out


def test_sweep_on_a_prompt_pipeline_puts_its_rows_on_a_psnr_front(folders, tmp_path, capsys):
    out = tmp_path / "sweep"
    argv = ["sweep", "--model", str(folders / "pixart"), *PROMPTS, *SIZES, "--steps", "2,3", "--budgets", "0.6"]
    argv += ["--accelerators", "fbcache:0.2", "--num-samples", "2", "--batch-size", "2", "--repeats", "1"]
    assert main([*argv, "--num-probes", "2", "--out", str(out)]) == 0
    report = json.loads((out / "sweep.json").read_text())
    rows = {(row["method"].split("/")[-1], row["steps"]): row for row in report["rows"]}
    assert {("baseline", 2), ("baseline", 3), ("fbcache:0.2", 2), ("dpm-solver++-3-0.6", 3)} <= set(rows)
    # one reference for every step count: the full model at the largest
    assert {row["quality_reference"] for row in report["rows"]} == {"full compute: baseline@3"}
    assert rows[("baseline", 3)]["psnr"] == PSNR_CAP_DB and rows[("baseline", 2)]["psnr"] < PSNR_CAP_DB
    assert rows[("baseline", 3)]["on_front"] and report["best"] == {}  # no FID: no quality levels
    printed = capsys.readouterr().out
    assert "PSNR vs full" in printed and "on the front" in printed and (out / "sweep.png").stat().st_size > 0


def save_flux(folder) -> None:
    """A tiny Flux.1-dev-shaped pipeline, as diffusers' own tests build one (a CLIP of width 32, a T5 of 32), with the
    dynamic shifting of Flux.1-dev's scheduler."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel

    from ee_diffusion.pipelines.early_exit import EarlyExitFluxPipeline

    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=4,
        num_layers=2,
        num_single_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        axes_dims_rope=[4, 4, 8],
    ).eval()
    torch.manual_seed(0)
    vae = AutoencoderKL(
        sample_size=32,
        in_channels=3,
        out_channels=3,
        block_out_channels=(4,),
        layers_per_block=1,
        latent_channels=1,
        norm_num_groups=1,
        use_quant_conv=False,
        use_post_quant_conv=False,
        shift_factor=0.0609,
        scaling_factor=1.5035,
    ).eval()
    EarlyExitFluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True),
        vae=vae,
        text_encoder=clip(32, projection=False),
        tokenizer=tokenizer(),
        text_encoder_2=t5(32),
        tokenizer_2=tokenizer(),
        transformer=transformer,
    ).save_pretrained(folder)


def test_bench_runs_a_flux_pipeline_with_its_distilled_guidance(tmp_path, capsys):
    save_flux(tmp_path / "flux")
    out = tmp_path / "rows.json"
    assert _bench(tmp_path / "flux", out, "--methods", "baseline,ase:linear:0.5,fbcache:0.2,magcache") == 0
    rows = {row["method"]: row for row in json.loads(out.read_text())["rows"]}
    assert rows["magcache"]["block_fraction"] is not None  # its ratios measured on the image stream of both stacks
    assert rows["baseline"]["psnr"] == PSNR_CAP_DB and rows["baseline"]["ssim"] == pytest.approx(1.0)
    assert rows["ase:linear:0.5"]["block_fraction"] < 1 and rows["ase:linear:0.5"]["psnr"] < PSNR_CAP_DB
    printed = capsys.readouterr().out
    assert "guidance_scale 3.5 (the pipeline's default)" not in printed and "guidance_scale 3.5" in printed
    assert "dpm-solver++" in printed  # on flow sigmas (`build_scheduler`'s flow-matching form)


def _exit(argv, capsys):
    try:
        code = main(argv)
    except SystemExit as stop:  # argparse's own exit
        code = stop.code
    return code, capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["bench", "--prompt", "a cat"], "digits-dit (EarlyExitDiTPipeline) is class-conditional"),
        (["calibrate", "--prompt", "a cat", "--tolerance", "0.1", "--out", "OUT"], "it takes no prompt"),
        (["sweep", "--prompt", "a cat", "--out", "OUT"], "leave out --prompt and --prompts"),
        (["bench", "--height", "16"], "it takes no height or width"),
        (["bench", "--model", "PIXART"], "PIXART (EarlyExitPixArtAlphaPipeline) is text-to-image"),
        (["calibrate", "--model", "PIXART", "--tolerance", "0.1", "--out", "OUT"], "give the prompts to generate"),
        (["sweep", "--model", "PIXART", "--out", "OUT"], "(--prompt TEXT, repeatable, or --prompts FILE"),
        (["bench", "--model", "PIXART", "--prompt", "a cat", "--height", "0"], "--height: expected an integer >= 1"),
        (["bench", "--model", "PIXART", "--width", "-16"], "--width: expected an integer >= 1, got -16"),
        (["bench", "--model", "PIXART", "--prompt", " "], "--prompt: expected a non-empty prompt, got ' '"),
        (["bench", "--model", "PIXART", "--prompts", "MISSING"], "--prompts: no such file: "),
        (["calibrate", "--model", "PIXART", "--prompts", "EMPTY", "--tolerance", "0.1", "--out", "OUT"], "no prompt"),
        (["bench", "--model", "PIXART", "--prompt", "a", "--prompts", "FILE"], "not allowed with argument --prompt"),
    ],
)
def test_prompt_usage_errors_end_before_anything_loads(folders, argv, message, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(harness, "load_pipe", lambda *args: pytest.fail("loaded a model"))
    monkeypatch.setattr("ee_diffusion.pipelines.load_early_exit_pipeline", lambda *a, **k: pytest.fail("loaded"))
    (tmp_path / "empty.txt").write_text("\n  \n")
    (tmp_path / "prompts.txt").write_text("a cat\n")
    places = {
        "PIXART": str(folders / "pixart"),
        "OUT": str(tmp_path / "out"),
        "MISSING": str(tmp_path / "none.txt"),
        "EMPTY": str(tmp_path / "empty.txt"),
        "FILE": str(tmp_path / "prompts.txt"),
    }
    argv = [places.get(part, part) for part in argv]
    code, err = _exit(argv, capsys)
    message = message.replace("PIXART", places["PIXART"])
    assert code == 2 and message in err and "Traceback" not in err, err
    assert "error: " in err.strip().splitlines()[-1]


def test_a_prompts_file_gives_one_prompt_a_line(folders, tmp_path):
    (tmp_path / "prompts.txt").write_text("a cat\n\n  a photo of a dog  \n")
    out = tmp_path / "rows.json"
    argv = ["bench", "--model", str(folders / "pixart"), "--prompts", str(tmp_path / "prompts.txt"), *SIZES]
    argv += ["--methods", "baseline", "--num-samples", "2", "--batch-size", "2", "--steps", "2", "--repeats", "1"]
    assert main([*argv, "--json", str(out), "--save-images", str(tmp_path / "images")]) == 0
    assert json.loads(out.read_text())["config"]["prompts"] == ["a cat", "a photo of a dog"]
    names = sorted(path.name for path in (tmp_path / "images" / "baseline").iterdir())
    assert names == ["00000_prompt0.png", "00001_prompt1.png"]


def test_what_a_pipeline_call_takes_is_read_from_its_signature():
    from diffusers import DDPMPipeline, FluxPipeline

    from ee_diffusion import EarlyExitDiTPipeline

    dit, pixart, flux = (
        pipeline_inputs(cls) for cls in (EarlyExitDiTPipeline, EarlyExitPixArtAlphaPipeline, FluxPipeline)
    )
    assert (dit.conditioning, dit.sizes, dit.guidance) == ("class_labels", False, "guidance_scale")
    assert (pixart.conditioning, pixart.sizes, pixart.default_guidance) == ("prompt", True, 4.5)
    assert pixart.call_kwargs(["a cat"], None, 16, 16)["use_resolution_binning"] is False
    assert "guidance_scale" not in pixart.call_kwargs(["a cat"])  # None: the pipeline's default
    # Flux-dev: --guidance-scale is its distilled `guidance_scale`; `true_cfg_scale` stays at its default
    assert flux.guidance == "guidance_scale" and "true_cfg_scale" not in flux.call_kwargs(["a"], 3.5, 16, 16)
    assert pipeline_inputs(DDPMPipeline).call_kwargs([None, None]) == {"batch_size": 2}

    class ImageToImage:
        def __call__(self, prompt, image, num_inference_steps=2, generator=None, output_type="pil"): ...

    with pytest.raises(TypeError, match=r"cannot drive ImageToImage: it also needs 'image'"):
        pipeline_inputs(ImageToImage)
    with pytest.raises(TypeError, match="cannot drive Module: its __call__ takes"):
        pipeline_inputs(torch.nn.Module)


def test_psnr_and_ssim_of_images_against_a_reference():
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(3, 3, 16, 16, generator=generator)
    same = image_similarity(images, images.clone())
    assert same.psnr == PSNR_CAP_DB and same.ssim == pytest.approx(1.0) and same.num_images == 3
    noisy = (images + 0.01 * torch.randn(images.shape, generator=generator)).clamp(0, 1)
    close = image_similarity(noisy, images)
    assert 35 < close.psnr < PSNR_CAP_DB and 0.9 < close.ssim < 1  # 0.01 RMS: 40 dB
    with pytest.raises(ValueError, match="of the same shape"):
        image_similarity(images, images[:2])


@pytest.mark.parametrize("side", [4, 7, 10])
def test_ssim_of_images_smaller_than_its_window_uses_the_largest_window_that_fits(side):
    """torchmetrics sizes its Gaussian window by `sigma` alone: below 11 pixels the window must shrink with it (at 4
    pixels its 11-tap window failed inside torchmetrics)."""
    from torchmetrics.functional.image import structural_similarity_index_measure as ssim

    generator = torch.Generator().manual_seed(0)
    images = torch.rand(2, 3, side, side, generator=generator)
    noisy = (images + 0.1 * torch.randn(images.shape, generator=generator)).clamp(0, 1)
    assert image_similarity(images, images.clone()).ssim == pytest.approx(1.0)
    window = side if side % 2 else side - 1
    sigma = (window - 1) / 2 / 3.5
    expected = ssim(noisy.double(), images.double(), data_range=1.0, kernel_size=window, sigma=sigma)
    assert image_similarity(noisy, images).ssim == pytest.approx(float(expected), rel=1e-6)
    if side > 4:  # a smaller window than torchmetrics' 11 taps (which reflect-pads what it does not cover)
        assert float(expected) != pytest.approx(float(ssim(noisy.double(), images.double(), data_range=1.0)))


def test_the_text_to_image_digits_model_is_scored_against_the_held_out_digits():
    """`digits-flux` asked for 1 x 32 x 32 images of digit prompts gets FID/KID against the held-out digits and the
    class accuracy of each image (the digit its prompt asks for); any other prompt gets PSNR/SSIM. Every call passes
    the 8 tokens its tokenizer takes, not the 512 `FluxPipeline` would pad to."""
    from ee_diffusion.data.digits import digit_of_prompt, digit_prompt
    from ee_diffusion.pipelines import load_early_exit_pipeline

    assert [digit_of_prompt(digit_prompt(d)) for d in range(10)] == list(range(10))
    assert digit_of_prompt("a handwritten cat") is None
    assert ("max_sequence_length", 8) in pipeline_inputs(load_early_exit_pipeline("digits-flux")).fixed
    common = dict(
        model="digits-flux",
        height=32,
        width=32,
        methods=["baseline"],
        num_samples=4,
        batch_size=4,
        repeats=1,
        steps=4,
        scheduler="euler",
    )
    (digits,) = run_bench(BenchConfig(**common, prompts=[digit_prompt(3), digit_prompt(7)]), progress=False)
    assert digits.fid is not None and digits.class_accuracy is not None and digits.psnr is None
    (other,) = run_bench(BenchConfig(**common, prompts=["a handwritten cat"]), progress=False)
    assert other.fid is None and other.class_accuracy is None and other.psnr is not None
