"""`Command`: what one `ee-diffusion` subcommand declares, from which the parser is built."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass

from . import arguments as arg


@dataclass(frozen=True)
class Command:
    """One subcommand.

    Args:
        name: What is typed (`bench`).
        summary: One line for `ee-diffusion --help`.
        description: The paragraph of `ee-diffusion NAME --help`.
        add_arguments: Adds the command's options to its parser.
        run: Runs it on the parsed options; returns the exit status.
        epilog: Text after the options in `--help` (`None`: none), or a function that makes it.
    """

    name: str
    summary: str
    description: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]
    epilog: str | Callable[[], str] | None = None

    def add_to(self, subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
        epilog = self.epilog() if callable(self.epilog) else self.epilog
        parser = subparsers.add_parser(
            self.name,
            formatter_class=arg.HelpFormatter,
            help=self.summary,
            description=self.description,
            epilog=epilog,
        )
        self.add_arguments(parser)
        parser.set_defaults(func=self.run)
        return parser
