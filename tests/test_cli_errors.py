"""Bad command-line input ends every subcommand with `error: ...` and exit status 2, before anything is loaded."""

import pytest

from ee_diffusion.cli import main


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
    (["bench", "--json", "/no/such/folder/out.json"], "--json: cannot write '/no/such/folder/out.json'"),
    (["bench", "--csv", "."], "--csv: '.' is a folder; give a file name"),
    (["bench", "--reference", "/no/such/reference"], "--reference: no such file or folder"),
    (["bench", "--reference", "README.md"], "No reference at README.md"),
    (["bench", "--model", "digits-ditt"], "No model 'digits-ditt': it is not a shipped model"),
    (["bench", "--methods", "baseline,ase:linear:-0.5", "--num-samples", "2"], "Bad exit schedule 'linear:-0.5'"),
    (["speed", "--steps", "0"], "--steps: expected an integer >= 1, got 0"),
    (["speed", "--num-layers", "0"], "--num-layers: expected an integer >= 1, got 0"),
    (["speed", "--schedule", "linear:99", "--repeats", "1"], "Bad exit schedule 'linear:99'"),
    (["train", "--arch", "dit", "--out", "/tmp/x", "--lr", "-1"], "--lr: expected a finite number in (0, inf), got -1"),
    (["train", "--arch", "gan", "--out", "/tmp/x"], "--arch: invalid choice: 'gan'"),
    (["train", "--arch", "dit"], "the following arguments are required: --out"),
    (["train", "--arch", "dit", "--out", "README.md"], "--out: 'README.md' is a file, not a folder"),
    (["finetune-ase", "--model", "digits-dit", "--schedule", "linear:6", "--out", "/tmp/x", "--ema-decay", "1"],
     "--ema-decay: expected a finite number in [0, 1), got 1"),
    (["finetune-ase", "--model", "nowhere", "--schedule", "linear:6", "--out", "/tmp/x"], "No model 'nowhere'"),
    (["train-mdlm", "--out", "/tmp/x", "--steps", "0"], "--steps: expected an integer >= 1, got 0"),
    (["train-mdlm", "--out", "/tmp/x", "--workers", "-2"], "--workers: expected an integer >= 0, got -2"),
    (["dllm-bench", "--tasks", "addition,division"], "--tasks: unknown 'division'; accepted: addition, sorting"),
    (["dllm-bench", "--methods", "fast"], "--methods: unknown 'fast'; accepted: full, halfsteps"),
    (["dllm-bench", "--num-problems", "0"], "--num-problems: expected an integer >= 1, got 0"),
    (["dllm-bench", "--model", "tiny-mlm"], "No model 'tiny-mlm': it is not a shipped model (tiny-mdlm)"),
]


@pytest.mark.parametrize("argv, message", CASES, ids=[" ".join(argv) for argv, _ in CASES])
def test_bad_input_ends_with_an_error_and_status_2(argv, message, capsys):
    code, err = _exit(argv, capsys)
    assert code == 2
    assert "error: " in err and message in err and "Traceback" not in err


@pytest.mark.parametrize("command", ["bench", "speed", "train", "finetune-ase", "train-mdlm", "dllm-bench"])
def test_help_states_the_defaults(command, capsys):
    with pytest.raises(SystemExit) as stop:
        main([command, "--help"])
    text = capsys.readouterr().out
    assert stop.value.code == 0 and "(default: " in text and "(default: None)" not in text
