"""The `ee-diffusion` command: one module per command family, each declaring its commands (`Command`); the parser is
built from those declarations.

- `images`: `speed`, `bench` (the image-model bench);
- `plans`: `calibrate`, `sweep`;
- `training`: `train`, `finetune-ase`, `train-uem`, `train-flux`;
- `dllm`: `train-mdlm`, `dllm-bench`.

Bad options end in `error: ...` and exit status 2 while the command line is parsed; what is found once a command
runs (a user's error, see `ee_diffusion.errors`) ends the same way, without a traceback.
"""

from __future__ import annotations

import argparse
import sys

from ..errors import USER_ERRORS, user_message
from . import arguments as arg
from .command import Command

DESCRIPTION = """\
Early exit for diffusion models: make them sample faster by running fewer denoiser blocks where that is enough, and
measure it honestly (speed, executed blocks and sample quality, side by side with plain alternatives).

`ee-diffusion COMMAND --help` gives each command's options, with their defaults and accepted values."""


def commands() -> list[Command]:
    """Every command, in the order `--help` lists them."""
    from . import dllm, images, plans, training

    return [*images.COMMANDS, *plans.COMMANDS, *training.COMMANDS, *dllm.COMMANDS]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ee-diffusion", description=DESCRIPTION, formatter_class=arg.HelpFormatter)
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in commands():
        command.add_to(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)  # bad options end here: `error: ...`, exit status 2
    args.argv = argv
    try:
        return args.func(args)
    except USER_ERRORS as error:  # found once running: a bad value, a missing package, a missing or broken file
        print(f"ee-diffusion {args.command}: error: {user_message(error)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: what was written before stays as it was (`ee_diffusion.outputs`)
        hint = "; the same command with --resume continues from its last checkpoint" if hasattr(args, "resume") else ""
        print(f"ee-diffusion {args.command}: interrupted{hint}", file=sys.stderr)
        return 130


__all__ = ["Command", "build_parser", "main"]
