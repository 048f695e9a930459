"""Bad command-line input ends every subcommand with `error: ...` and exit status 2, before anything is loaded."""

import argparse
import shutil
import subprocess
import sys

import pytest

from ee_diffusion.cli import build_parser, main
from ee_diffusion.shipped import SHIPPED_MODELS_DIR as SHIPPED


def _exit(argv, capsys):
    try:
        code = main(argv)
    except SystemExit as stop:  # argparse's own exit on a bad option
        code = stop.code
    return code, capsys.readouterr().err


CASES = [
    (["bench", "--num-samples", "1"], "--num-samples: expected an integer >= 2, got 1"),
    (["bench", "--batch-size", "0"], "--batch-size: expected an integer >= 1, got 0"),
    (["bench", "--repeats", "x"], "--repeats: expected an integer, got 'x'"),
    (["bench", "--steps", "20,0"], "--steps: expected an integer >= 1, got 0"),
    (["bench", "--scheduler", "ddim,heun"], "--scheduler: unknown 'heun'; accepted: dpm-solver++, ddim, ddpm, euler"),
    (["bench", "--threads", "-1"], "--threads: expected an integer >= 0, got -1"),
    (["bench", "--guidance-scale", "nan"], "--guidance-scale: expected a finite number in [0, inf), got nan"),
    (["bench", "--device", "gpu"], "--device: not a torch device: 'gpu'"),
    (["bench", "--device", "cuda:99"], "--device: 'cuda:99': this machine has"),
    (["bench", "--save-images", "README.md/images"], "--save-images: cannot write 'README.md/images'"),
    (["bench", "--plot", "/proc/no/such/front.png"], "--plot: cannot write '/proc/no/such/front.png'"),
    (["bench", "--inception-path", "/no/such/inception.pt"], "--inception-path: no such file or folder"),
    (["bench", "--methods", "warp:9", "--num-samples", "2"], "Unknown method 'warp:9'"),
    (["bench", "--json", "README.md/out.json"], "--json: cannot write 'README.md/out.json'"),
    (["bench", "--csv", "."], "--csv: '.' is a folder; give a file name"),
    (["bench", "--reference", "/no/such/reference"], "--reference: no such file or folder"),
    (["bench", "--reference", "README.md"], "No reference at README.md"),
    (["bench", "--model", "digits-ditt"], "No model 'digits-ditt': it is not a shipped model"),
    (["bench", "--model", "random:foo"], "Unknown random model 'random:foo'; accepted: ['random:dit-xl-2'"),
    (["bench", "--methods", "baseline,ase:linear:-0.5", "--num-samples", "2"], "Bad exit schedule 'linear:-0.5'"),
    # every accelerator argument against what the method means, at parse time (no model loads)
    (["bench", "--methods", ""], "--methods: Give at least one method."),
    (["bench", "--methods", "baseline,baseline"], "--methods: Each method once, got baseline more than once"),
    (
        ["bench", "--methods", "fbcache:0"],
        "--methods: Bad method 'fbcache:0': the threshold must be a finite number > 0",
    ),
    (["bench", "--methods", "fbcache:-0.1"], "the threshold must be a finite number > 0, got '-0.1'"),
    (["bench", "--methods", "fbcache:nan"], "the threshold must be a finite number > 0, got 'nan'"),
    (["bench", "--methods", "fbcache:0.1:2"], "Bad method 'fbcache:0.1:2': at most 1 ':'-separated arguments"),
    (["bench", "--methods", "magcache:0"], "Bad method 'magcache:0': the threshold must be a finite number > 0"),
    (["bench", "--methods", "magcache:0.1:0"], "the most consecutive skips must be an integer >= 1, got '0'"),
    (["bench", "--methods", "magcache:0.1:1.5"], "the most consecutive skips must be an integer >= 1, got '1.5'"),
    (["bench", "--methods", "taylorseer:0"], "Bad method 'taylorseer:0': the interval (1 computes every step) must"),
    (["bench", "--methods", "taylorseer:1"], "the interval (1 computes every step) must be an integer >= 2, got '1'"),
    (["bench", "--methods", "taylorseer:5:-1"], "the order must be an integer >= 0, got '-1'"),
    (
        ["bench", "--methods", "pab:0"],
        "Bad method 'pab:0': the range (1 recomputes every call) must be an integer >= 2",
    ),
    (["bench", "--methods", "pab:1"], "the range (1 recomputes every call) must be an integer >= 2, got '1'"),
    (["bench", "--methods", "pab:2:800-100"], "the timestep window <lo>-<hi> needs lo < hi, got 800-100"),
    (["bench", "--methods", "pab:2:-5-100"], "Bad method 'pab:2:-5-100'"),
    (["bench", "--methods", "pab:2:100"], "expected pab[:<range>[:<lo>-<hi>]]"),
    (["bench", "--methods", "layerskip:-1"], "a block index must be an integer >= 0, got '-1'"),
    (["bench", "--methods", "layerskip:2,2"], "the block indices must be distinct, got 2,2"),
    (["bench", "--methods", "deediff:0"], "the threshold must be a finite number > 0 and <= 1, got '0'"),
    (["bench", "--methods", "deediff:0.05:per_pixel"], "the policy must be one of per_batch, per_sample"),
    (["bench", "--methods", "baseline@0"], "`@N` needs N >= 1 scheduler steps, got 0"),
    (["bench", "--methods", "ase:linear:0"], "Bad exit schedule 'linear:0': a depth is at least 1 block, got 0"),
    (["bench", "--methods", "ase:step:12,x"], "Unknown method 'x'"),
    (["bench", "--methods", "ase:step:12,-1"], "Bad exit schedule 'step:12,-1': a depth is at least 1 block, got -1"),
    (["bench", "--methods", "ase:linear:1.5"], "must lie in (0, 1], got 1.5"),
    (["bench", "--methods", "ase:wavy:3"], "Bad exit schedule 'wavy:3': expected linear:M"),
    (["bench", "--methods", "finetuned:nowhere"], "--methods: No model 'nowhere'"),
    (["bench", "--methods", "finetuned:digits-dit-ase:plans/nowhere"], "Bad exit schedule 'plans/nowhere'"),
    # prompts and sizes: for text-to-image pipelines, checked against the model's model_index.json before it loads
    (["bench", "--height", "0"], "--height: expected an integer >= 1, got 0"),
    (["bench", "--prompt", ""], "--prompt: expected a non-empty prompt, got ''"),
    (["bench", "--prompts", "/no/such/prompts.txt"], "--prompts: no such file: '/no/such/prompts.txt'"),
    (["bench", "--prompts", "README.md", "--prompt", "a"], "argument --prompt: not allowed with argument --prompts"),
    (["bench", "--prompt", "a cat"], "digits-dit (EarlyExitDiTPipeline) is class-conditional"),
    (["bench", "--model", "random:dit-tiny", "--width", "64"], "it takes no height or width"),
    (
        ["calibrate", "--out", "/tmp/x", "--tolerance", "0.1", "--prompt", "a"],
        "it takes no prompt; leave out --prompt",
    ),
    (["sweep", "--out", "/tmp/x", "--model", "digits-unet", "--prompt", "a"], "digits-unet (EarlyExitUNet2DPipeline)"),
    (["sweep", "--out", "/tmp/x", "--accelerators", "pab:0"], "--accelerators: Bad method 'pab:0'"),
    (["sweep", "--out", "/tmp/x", "--accelerators", "magcache:0.1:0"], "--accelerators: Bad method 'magcache:0.1:0'"),
    # found once the model is loaded: a value the model cannot take
    (
        ["bench", "--methods", "layerskip:99", "--num-samples", "2"],
        "Bad method 'layerskip:99': digits-dit has blocks 0 to 11, got 99",
    ),
    (
        ["bench", "--model", "digits-unet", "--methods", "deediff", "--num-samples", "2"],
        "No method can run on digits-unet: deediff: uncertainty exits need a transformer",
    ),
    (
        ["bench", "--methods", "finetuned:digits-dit-ase:plans/dpm-solver++-10", "--steps", "4"],
        "This plan was made for "
        "10 steps of DPMSolverMultistepScheduler; the run asks for 4 steps of DPMSolverMultistepScheduler",
    ),
    (
        ["bench", "--methods", "finetuned:digits-dit-ase:plans/dpm-solver++-10@8"],
        "made for 10 steps of DPMSolverMultistepScheduler; the run asks for 8 steps",
    ),
    (
        ["bench", "--methods", "finetuned:digits-dit-ase:plans/dpm-solver++-10", "--scheduler", "ddim"],
        "the run asks for 10 steps of DDIMScheduler",
    ),
    (["bench", "--methods", "ase:linear:13", "--num-samples", "2"], "Bad exit schedule 'linear:13'"),
    (
        ["finetune-ase", "--model", "digits-dit", "--schedule", "linear:0", "--out", "/tmp/ee-never"],
        "Bad exit schedule 'linear:0'",
    ),
    (["speed", "--steps", "0"], "--steps: expected an integer >= 1, got 0"),
    (["speed", "--sample-size", "33"], "--sample-size: expected an even number (the DiT's patches are 2 x 2), got 33"),
    (["speed", "--num-layers", "0"], "--num-layers: expected an integer >= 1, got 0"),
    (["speed", "--schedule", "linear:99", "--repeats", "1"], "Bad exit schedule 'linear:99'"),
    (
        ["train", "--arch", "dit", "--out", "/tmp/x", "--lr", "-1"],
        "--lr: expected a finite number in (0, inf), got -1",
    ),
    (["train", "--arch", "gan", "--out", "/tmp/x"], "--arch: invalid choice: 'gan'"),
    (
        ["train", "--arch", "classifier", "--out", "/tmp/ee-never", "--steps", "3", "--batch=4"],
        "The classifier trains for --epochs with --seed; --steps, --batch-size set how a denoiser trains",
    ),
    (
        ["train", "--arch", "classifier", "--out", "/tmp/ee-never", "--prediction-type", "epsilon"],
        "; --prediction-type sets how a denoiser trains (--arch dit, unet)",
    ),
    (
        ["train", "--arch", "unet", "--out", "/tmp/ee-never", "--epochs", "3"],
        "digits-unet trains for --steps; --epochs sets the classifier's training (--arch classifier)",
    ),
    (["train", "--arch", "dit"], "the following arguments are required: --out"),
    (["train", "--arch", "dit", "--out", "README.md"], "--out: 'README.md' is a file, not a folder"),
    (
        ["finetune-ase", "--model", "digits-dit", "--schedule", "linear:6", "--out", "/tmp/x", "--ema-decay", "1"],
        "--ema-decay: expected a finite number in (0, 1), got 1",
    ),
    (
        ["train", "--arch", "dit", "--out", "/tmp/x", "--ema-decay", "0"],
        "--ema-decay: expected a finite number in (0, 1), got 0",
    ),
    (["finetune-ase", "--model", "nowhere", "--schedule", "linear:6", "--out", "/tmp/x"], "No model 'nowhere'"),
    (
        [
            "finetune-ase",
            "--model",
            "digits-flux",
            "--schedule",
            "linear:6",
            "--out",
            "/tmp/x",
            "--loss-weight",
            "min-snr",
        ],
        "digits-flux is a flow-matching model, whose loss is unweighted",
    ),
    (
        ["finetune-ase", "--model", "digits-dit", "--schedule", "linear:6", "--out", "/tmp/x", "--eval-samples", "5"],
        "digits-dit is not a Flux model: --eval-samples and --eval-steps measure a Flux model's samples",
    ),
    (["calibrate", "--out", "/tmp/x"], "one of the arguments --tolerance --target-compute is required"),
    (
        ["calibrate", "--out", "/tmp/x", "--target-compute", "0"],
        "--target-compute: expected a finite number in (0, 1]",
    ),
    (["calibrate", "--out", "/tmp/x", "--tolerance", "-1"], "--tolerance: expected a finite number in [0, inf)"),
    (
        ["calibrate", "--out", "/tmp/x", "--tolerance", "0.1", "--actions", "reuse,skip"],
        "--actions: unknown 'skip'; accepted: reuse, tail, drop",
    ),
    (["calibrate", "--out", "/tmp/x", "--tolerance", "0.1", "--target-compute", "0.5"], "not allowed with argument"),
    (["calibrate", "--out", "/tmp/x", "--tolerance", "0.1", "--steps", "1"], "--steps: expected an integer >= 2"),
    (["calibrate", "--out", "/tmp/x", "--tolerance", "0.1", "--model", "nowhere"], "No model 'nowhere'"),
    (
        ["calibrate", "--out", "/tmp/x", "--tolerance", "0.1", "--error", "digits"],
        "The error --error digits compares the two sets of probe images by the covariance of their features: give "
        "--num-probes 50 or more",
    ),
    (["calibrate", "--out", "/tmp/x", "--tolerance", "0.1", "--error", "ssim"], "argument --error: invalid choice"),
    (
        ["calibrate", "--out", "/tmp/x", "--tolerance", "0.1", "--inception-path", "/tmp"],
        "The option --inception-path is read by --error inception only, and this run measures --error pixels",
    ),
    (["sweep", "--out", "/proc/ee-sweep"], "--out: cannot write '/proc/ee-sweep': '/proc' is not a writable folder"),
    (["bench", "--csv", "/proc/rows.csv"], "--csv: cannot write '/proc/rows.csv'"),
    (["sweep", "--out", "/tmp/x", "--budgets", "0.5,1.5"], "--budgets: expected a finite number in (0, 1), got 1.5"),
    (["sweep", "--out", "/tmp/x", "--accelerators", "bogus:1"], "--accelerators: Unknown method 'bogus:1'"),
    (["sweep", "--out", "/tmp/x", "--accelerators", "baseline"], "must be other accelerators' methods"),
    (["sweep", "--out", "/tmp/x", "--accelerators", "fbcache:x", "--steps", "2"], "Bad method 'fbcache:x'"),
    (["sweep", "--out", "/tmp/x", "--finetuned", "nowhere"], "No model 'nowhere'"),
    (["sweep", "--out", "/tmp/x", "--model", "digits-unet", "--finetuned", "digits-unet"], "another model than"),
    (
        ["sweep", "--out", "/tmp/x", "--finetuned", "digits-unet-ase"],
        "'digits-unet-ase' is a UNet2DPipeline, 'digits-dit' a DiTPipeline",
    ),
    (
        ["bench", "--fid-backend", "clean-fid", "--num-samples", "2"],
        "A FID backend (--fid-backend) or Inception path (--inception-path) chooses how a reference (--reference)",
    ),
    (["train-mdlm", "--out", "/tmp/x", "--steps", "0"], "--steps: expected an integer >= 1, got 0"),
    (["train-mdlm", "--out", "/tmp/x", "--workers", "-2"], "--workers: expected an integer >= 0, got -2"),
    (["dllm-bench", "--tasks", "addition,division"], "--tasks: unknown 'division'; accepted: addition, sorting"),
    (
        ["dllm-bench", "--methods", "fast"],
        "--methods: Unknown method 'fast'; expected NAME[:VALUE][+CACHE[/K]] with NAME",
    ),
    (["dllm-bench", "--methods", "full,prophet:x"], "Bad value in method 'prophet:x'"),
    (["dllm-bench", "--methods", "full:3"], "Bad value in method 'full:3'"),
    (["dllm-bench", "--methods", "threshold:1.5"], "the value must be a probability in (0, 1], got 1.5"),
    (["dllm-bench", "--methods", "sched-exp:-1"], "the value must be a finite top-2 logit gap > 0, got -1"),
    (["dllm-bench", "--methods", "prophet+triple"], "Unknown method 'prophet+triple'"),
    (["dllm-bench", "--methods", "prophet:inf"], "the value must be a finite top-2 logit gap > 0, got inf"),
    (["dllm-bench", "--methods", "full+dual/0"], "Bad refresh interval in method 'full+dual/0'"),
    (["dllm-bench", "--repeats", "-1"], "--repeats: expected an integer >= 0, got -1"),
    (["dllm-bench", "--plot", "/proc/front.png"], "--plot: cannot write '/proc/front.png'"),
    (["train-mdlm", "--out", "/tmp/x", "--tasks", "addition,division"], "--tasks: unknown 'division'"),
    (["train-mdlm", "--out", "/tmp/x", "--init-from", "nowhere"], "'nowhere' is neither a shipped language model"),
    (["train-mdlm", "--out", "/tmp/x", "--init-from", "docs"], "--init-from: 'docs' holds no language model"),
    # an empty path or model name is refused, not read as the current folder
    (["train", "--arch", "dit", "--out", ""], "--out: expected a path, got an empty string"),
    (["bench", "--save-images", ""], "--save-images: expected a path, got an empty string"),
    (["bench", "--json", " "], "--json: expected a path, got an empty string"),
    (["bench", "--reference", ""], "--reference: expected a path, got an empty string"),
    (["bench", "--model", ""], "--model: expected a model name, folder or hub id, got an empty string"),
    (["sweep", "--out", "/tmp/x", "--finetuned", ""], "--finetuned: expected a model name, folder or hub id"),
    (["dllm-bench", "--model", ""], "--model: expected a model name, folder or hub id, got an empty string"),
    (["dllm-bench", "--num-problems", "0"], "--num-problems: expected an integer >= 1, got 0"),
    (
        ["dllm-bench", "--model", "tiny-mlm"],
        "--model: 'tiny-mlm' is neither a shipped language model (tiny-mdlm, tiny-mdlm-puzzles) nor a folder nor a "
        "hub id (org/name)",
    ),
    (["dllm-bench", "--model", "/no/such/model"], "--model: '/no/such/model' is neither a shipped language model"),
    (
        ["dllm-bench", "--model", str(SHIPPED / "digits-dit")],
        "holds no language model: no config.json or tokenizer.json",
    ),
    (["train-uem", "--out", "/tmp/x", "--threshold", "0"], "--threshold: expected a finite number in (0, 1], got 0"),
    (
        ["train", "--arch", "dit", "--out", "/tmp/x", "--seed", "1" + "0" * 22],
        "--seed: expected an integer in [0, 4294967295]",
    ),
    (["bench", "--seed", "-1"], "--seed: expected an integer in [0, 4294967295], got -1"),
    (["train-uem", "--out", "/tmp/x", "--threshold", "5"], "--threshold: expected a finite number in (0, 1], got 5"),
    (["dllm-bench", "--plot", "front.txt"], "--plot: 'front.txt': a plot is written as one of"),
    (["dllm-bench", "--plot", "front"], "--plot: 'front': a plot is written as one of"),
    (["bench", "--plot", "front.txt"], "--plot: 'front.txt': a plot is written as one of"),
    (
        ["dllm-bench", "--json", "same.png", "--plot", "same.png"],
        "Each output needs a file of its own; got --json same.png, --plot same.png",
    ),
    (
        ["train-mdlm", "--out", "/tmp/x", "--steps", "1", "--stop-at", "5"],
        "Step 5 (--stop-at) is past the run's last step (--steps 1)",
    ),
]


@pytest.mark.parametrize("argv, message", CASES, ids=[" ".join(argv) for argv, _ in CASES])
def test_bad_input_ends_with_an_error_and_status_2(argv, message, capsys):
    code, err = _exit(argv, capsys)
    assert code == 2
    assert "error: " in err and message in err and "Traceback" not in err
    assert "error: " in err.strip().splitlines()[-1], "nothing is printed after the error (no stray progress line)"


# Found in the model's files (model_index.json, scheduler_config.json) or the arguments alone: refused before any model
# loads (no loading bar, no header).
BEFORE_LOADING = [
    (
        ["finetune-ase", "--model", "digits-dit", "--schedule", "garbage", "--out", "OUT"],
        "Bad exit schedule 'garbage'",
    ),
    (
        ["finetune-ase", "--model", "digits-dit-ase", "--schedule", "linear:6", "--out", "OUT"],
        "digits-dit-ase already runs under an exit schedule; fine-tune the model it was made from.",
    ),
    (["train-uem", "--exit-blocks", "2,2", "--out", "OUT"], "--exit-blocks must be increasing block counts, got 2,2"),
    (["train-uem", "--model", "digits-unet", "--out", "OUT"], "digits-unet has a UNet2DModel; exit heads are for"),
    (
        ["train-uem", "--model", "digits-flux", "--out", "OUT"],
        "digits-flux has a FluxTransformer2DModel; exit heads are for DiTTransformer2DModel, PixArtTransformer2DModel",
    ),
    (
        ["train-uem", "--model", "digits-dit-ase", "--out", "OUT"],
        "digits-dit-ase already runs under an exit schedule; train exit heads for the model it was made from.",
    ),
    (
        [
            "calibrate",
            "--model",
            "digits-flux",
            "--scheduler",
            "ddim",
            "--prompt",
            "a handwritten one",
            "--height",
            "32",
        ]
        + ["--width", "32", "--tolerance", "0.1", "--out", "OUT"],
        "The scheduler 'ddim' samples DDPM-trained models, but this model is flow-matching",
    ),
    (
        ["bench", "--reference", "REF", "--inception-path", "EMPTY", "--num-samples", "2"],
        "clean-fid's Inception network is missing",
    ),
    (
        ["calibrate", "--tolerance", "0.1", "--error", "inception", "--num-probes", "50", "--inception-path", "EMPTY"]
        + ["--out", "OUT"],
        "clean-fid's Inception network is missing",
    ),
]


@pytest.mark.parametrize("argv, message", BEFORE_LOADING, ids=[" ".join(argv[:3]) for argv, _ in BEFORE_LOADING])
def test_what_the_files_tell_is_refused_before_anything_loads(argv, message, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "ref.npz").write_bytes(b"")
    paths = {"OUT": tmp_path / "out", "REF": tmp_path / "ref.npz", "EMPTY": tmp_path / "empty"}
    code = main([str(paths.get(part, part)) for part in argv])
    out, err = capsys.readouterr()
    assert code == 2 and message in err and "Traceback" not in err, err
    assert "Loading" not in err and not out, (out, err)
    assert not (tmp_path / "out").exists()


def _broken_copy(tmp_path, model, file, content):
    folder = tmp_path / model
    shutil.copytree(SHIPPED / model, folder)
    (folder / file).write_bytes(content)
    return folder


LOAD_CASES = [
    (
        "digits-dit",
        "transformer/config.json",
        b"{bad",
        ["bench", "--methods", "baseline"],
        "transformer/config.json' is not a valid JSON file: Expecting property name",
    ),
    (
        "digits-dit",
        "transformer/diffusion_pytorch_model.safetensors",
        b"garbage",
        ["bench", "--methods", "baseline"],
        "diffusion_pytorch_model.safetensors': Error while deserializing header",
    ),
    (
        "digits-dit",
        "model_index.json",
        b"[",
        ["calibrate", "--tolerance", "0.1", "--out", "OUT"],
        "model_index.json' is not a valid JSON file",
    ),
    (
        "digits-dit-ase",
        "plans/dpm-solver++-10/exit_schedule.json",
        b"{",
        ["bench", "--methods", "ase:MODEL/plans/dpm-solver++-10"],
        "--methods: It looks like the config file at",
    ),
    (
        "digits-dit",
        "transformer/config.json",
        b"nope",
        ["finetune-ase", "--schedule", "linear:6", "--out", "OUT"],
        "transformer/config.json' is not a valid JSON file",
    ),
    (
        "digits-dit",
        "scheduler/scheduler_config.json",
        b"nope",
        ["calibrate", "--tolerance", "0.1", "--out", "OUT"],
        "scheduler_config.json' is not a valid JSON file",
    ),
    (
        "digits-dit",
        "exit_heads/diffusion_pytorch_model.safetensors",
        b"\x00" * 16,
        ["bench", "--methods", "deediff"],
        "exit_heads/diffusion_pytorch_model.safetensors",
    ),
]


@pytest.mark.parametrize(
    "model, file, content, argv, message", LOAD_CASES, ids=[f"{argv[0]} {file}" for _, file, _, argv, _ in LOAD_CASES]
)
def test_a_broken_file_is_an_error_naming_it(model, file, content, argv, message, tmp_path, capsys):
    folder = _broken_copy(tmp_path, model, file, content)
    argv = [part.replace("MODEL", str(folder)).replace("OUT", str(tmp_path / "out")) for part in argv]
    if "--methods" in argv and "ase:" not in argv[argv.index("--methods") + 1]:
        argv += ["--model", str(folder)]
    elif argv[0] != "bench":
        argv += ["--model", str(folder)]
    code, err = _exit([*argv, "--num-samples", "2"] if argv[0] == "bench" else argv, capsys)
    assert code == 2 and message in err and "Traceback" not in err, err
    assert "error: " in err.strip().splitlines()[-1]


PARSE_TIME = [
    (argv, message)
    for argv, message in CASES
    if message.startswith("--") or "required" in message or "not allowed" in message
]


@pytest.mark.parametrize("argv, message", PARSE_TIME, ids=[" ".join(argv) for argv, _ in PARSE_TIME])
def test_option_errors_stop_the_parser_before_any_command_runs(argv, message, capsys):
    with pytest.raises(SystemExit) as stop:
        build_parser().parse_args(argv)
    assert stop.value.code == 2 and message in capsys.readouterr().err


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    (action,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return action.choices


@pytest.mark.parametrize("command", sorted(_subcommands()))
def test_help_states_every_options_default(command):
    """Each option with a default (0 included) shows it in `--help` (one computed at run time says so in words)."""
    parser = _subcommands()[command]
    for action in parser._actions:
        if not action.option_strings or action.help == argparse.SUPPRESS or isinstance(action, argparse._HelpAction):
            continue
        shown = parser._get_formatter()._get_help_string(action)
        if not (action.default is None or action.default is False):
            assert "(default: " in shown, (command, action.dest, shown)
        assert "(default: None)" not in shown


HEAVY = ("torch", "diffusers", "transformers", "accelerate")


def test_help_of_every_command_loads_no_heavy_package():
    """`--help` answers at once: neither the CLI nor the package namespace imports torch, diffusers or transformers
    before a command runs (measured: 0.1 s, against 10 s when the package imported them eagerly)."""
    script = (
        "import sys\nfrom ee_diffusion.cli import main\n"
        "for argv in ([], ['bench'], ['speed'], ['train'], ['finetune-ase'], ['train-mdlm'], ['dllm-bench']):\n"
        "    try:\n        main([*argv, '--help'])\n    except SystemExit:\n        pass\n"
        f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert result.stdout.strip().splitlines()[-1] == "[]"


def test_package_names_load_on_first_use():
    script = (
        "import sys, ee_diffusion\n"
        f"before = sorted(m for m in {HEAVY!r} if m in sys.modules)\n"
        "from ee_diffusion import ExitSchedule, EarlyExitDiTPipeline\n"
        "from ee_diffusion.dllm import ProphetCommit\n"
        "print(before, ExitSchedule.__module__, EarlyExitDiTPipeline.__module__, ProphetCommit.__module__,\n"
        "      'ExitSchedule' in dir(ee_diffusion), ee_diffusion.exits.__name__)"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert result.stdout.split() == [
        "[]",
        "ee_diffusion.schedules.exit_schedule",
        "ee_diffusion.pipelines.early_exit",
        "ee_diffusion.dllm.rules",
        "True",
        "ee_diffusion.exits",
    ]
    import ee_diffusion

    with pytest.raises(AttributeError, match="has no attribute 'NoSuchName'"):
        ee_diffusion.NoSuchName  # noqa: B018
    assert set(ee_diffusion.__all__) <= set(dir(ee_diffusion))


@pytest.mark.parametrize("command, resumable", [("train-mdlm", True), ("dllm-bench", False)])
def test_ctrl_c_ends_with_a_line_and_status_130_and_says_how_to_resume(command, resumable, monkeypatch, capsys):
    import ee_diffusion.outputs
    from ee_diffusion.cli import arguments

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    # each command's first step, in which the interruption comes
    monkeypatch.setattr(ee_diffusion.outputs, "check_output_folder", interrupted)
    monkeypatch.setattr(arguments, "check_output_files", interrupted)
    parser_args = ["--out", "/tmp/never-written"] if resumable else []
    code, err = _exit([command, *parser_args], capsys)
    assert code == 130 and "Traceback" not in err
    assert err.strip() == f"ee-diffusion {command}: interrupted" + (
        "; the same command with --resume continues from its last checkpoint" if resumable else ""
    )
