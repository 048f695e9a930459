"""argparse types and shared options of the `ee-diffusion` commands: each type turns bad input into `error: ...` and
exit status 2 while the command line is parsed, before anything is loaded or computed."""

from __future__ import annotations

import argparse
import math
import os
import tempfile
import textwrap
from collections.abc import Callable, Iterable
from pathlib import Path
from types import ModuleType
from typing import Any


class HelpFormatter(argparse.HelpFormatter):
    """Every option's default in its help (unless it has none); in descriptions and epilogs, paragraphs are wrapped
    and lines that start with a space (tables, examples) are printed as written."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        shown = action.option_strings and not (
            action.default is None or action.default is False or action.default == argparse.SUPPRESS
        )  # 0 is a default to show
        if shown and "%(default)" not in text:
            shown = ",".join(map(str, action.default)) if isinstance(action.default, list) else "%(default)s"
            text += f" (default: {shown})"
        return text

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        paragraphs = []
        for paragraph in text.split("\n\n"):
            if any(line.startswith(" ") for line in paragraph.splitlines()):
                paragraphs.append(paragraph)
            else:
                paragraphs.append(
                    textwrap.fill(" ".join(paragraph.split()), width, initial_indent=indent, subsequent_indent=indent)
                )
        return "\n\n".join(paragraphs)


def integer(low: int, high: int | None = None) -> Callable[[str], int]:
    """An integer in `[low, high]` (no upper end when `high` is None)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low or (high is not None and value > high):
            accepted = f">= {low}" if high is None else f"in [{low}, {high}]"
            raise argparse.ArgumentTypeError(f"expected an integer {accepted}, got {value}")
        return value

    return parse


def number(
    low: float, high: float | None = None, low_open: bool = False, high_open: bool = False
) -> Callable[[str], float]:
    """A finite number between `low` and `high`, each end closed unless said open."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        too_low = value <= low if low_open else value < low
        too_high = high is not None and (value >= high if high_open else value > high)
        if not math.isfinite(value) or too_low or too_high:
            ends = (
                ("(" if low_open else "[")
                + f"{low:g}, "
                + ("inf)" if high is None else f"{high:g}" + (")" if high_open else "]"))
            )
            raise argparse.ArgumentTypeError(f"expected a finite number in {ends}, got {text}")
        return value

    return parse


def numbers(low: float, high: float, low_open: bool = False, high_open: bool = False) -> Callable[[str], list[float]]:
    """A comma-separated list of numbers, each as `number` accepts it."""
    single = number(low, high, low_open, high_open)
    return lambda text: [single(part) for part in text.split(",")]


# A seed: what every generator of the project's runs takes (numpy's too), so that no run fails at its first draw.
seed = integer(0, 2**32 - 1)


def integers(low: int) -> Callable[[str], list[int]]:
    """A comma-separated list of integers, each at least `low`."""
    single = integer(low)
    return lambda text: [single(part) for part in text.split(",")]


def names(accepted: Iterable[str]) -> Callable[[str], list[str]]:
    """A comma-separated list of names, each one of `accepted`."""
    accepted = list(accepted)

    def parse(text: str) -> list[str]:
        values = text.split(",")
        bad = [value for value in values if value not in accepted]
        if bad:
            raise argparse.ArgumentTypeError(f"unknown {', '.join(map(repr, bad))}; accepted: {', '.join(accepted)}")
        return values

    return parse


def device(text: str) -> str:
    """A torch device this machine has (`cpu`, `cuda`, `cuda:1`, `mps`)."""
    import torch

    try:
        parsed = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"not a torch device: {text!r} (cpu, cuda, cuda:N, mps)") from None
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text!r}: this machine has no CUDA device (torch {torch.__version__})")
    if parsed.type == "cuda" and parsed.index is not None and parsed.index >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(f"{text!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if parsed.type == "mps" and not torch.backends.mps.is_available():
        raise argparse.ArgumentTypeError(f"{text!r}: MPS is not available on this machine")
    return text


def torch_with_threads(threads: int) -> ModuleType:
    """torch, imported when a command runs (never for `--help`), using `threads` CPU threads (0: torch's default)."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    return torch


def _can_create_files_in(folder: Path) -> bool:
    """Whether a file can be created in `folder` now, tried for real: permission bits say yes to root everywhere,
    /proc and read-only mounts included."""
    try:
        with tempfile.TemporaryFile(dir=folder):
            return True
    except OSError:
        return False


def _writable_place(path: Path, shown: str) -> None:
    """Raise unless the folder `path` could be created or written: its nearest existing ancestor is a writable
    folder. `shown`: what the user gave, for the message."""
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir() or not _can_create_files_in(existing):
        raise argparse.ArgumentTypeError(f"cannot write {shown!r}: {str(existing)!r} is not a writable folder")


def _path(text: str) -> Path:
    """`text` as a path; an empty or blank one is refused (`Path("")` would be the current folder)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("expected a path, got an empty string")
    return Path(text)


def output_file(text: str) -> str:
    """A file the command will write at the end (its missing parent folders are created then): not a folder, and
    creatable or writable now."""
    path = _path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is a folder; give a file name")
    if path.exists() and not os.access(path, os.W_OK):
        raise argparse.ArgumentTypeError(f"cannot write {text!r}")
    _writable_place(path.parent, text)
    return text


def plot_file(text: str) -> str:
    """An `output_file` for a matplotlib figure: its extension names a format matplotlib writes (`.png`, `.svg`,
    `.pdf`, ...)."""
    from matplotlib.backend_bases import FigureCanvasBase

    formats = FigureCanvasBase.get_supported_filetypes()
    if Path(text).suffix.lstrip(".").lower() not in formats:
        raise argparse.ArgumentTypeError(
            f"{text!r}: a plot is written as one of {', '.join(sorted(formats))}; give a file name ending in one "
            "(e.g. .png)"
        )
    return output_file(text)


def output_folder(text: str) -> str:
    """A folder the command will write into: an existing writable folder, or one that can be created."""
    path = _path(text)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is a file, not a folder")
    _writable_place(path, text)
    return text


GUIDANCE_SCALE = 2.0  # what the shipped digits models and plans are measured and calibrated at


def add_guidance(command: argparse.ArgumentParser) -> None:
    """`--guidance-scale`, with the one default of `bench`, `calibrate` and `sweep`."""
    command.add_argument(
        "--guidance-scale",
        type=number(0),
        help="the pipeline's guidance_scale argument: classifier-free guidance (1: off), for Flux-dev its distilled "
        "guidance (its true_cfg_scale stays at its default); a plan is calibrated for one guidance scale (default: "
        f"{GUIDANCE_SCALE:g} for class-conditional models, what the shipped digits models and plans are measured and "
        "calibrated at; the pipeline's own default for the others)",
    )


def prompt_text(text: str) -> str:
    """A prompt: any text that is not blank."""
    if not text.strip():
        raise argparse.ArgumentTypeError(f"expected a non-empty prompt, got {text!r}")
    return text


def prompt_file(text: str) -> list[str]:
    """A text file of prompts, one per line (blank lines skipped), holding at least one."""
    path = Path(text)
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"no such file: {text!r} (a text file, one prompt per line)")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise argparse.ArgumentTypeError(f"cannot read {text!r}: {error}") from None
    prompts = [line.strip() for line in lines if line.strip()]
    if not prompts:
        raise argparse.ArgumentTypeError(f"{text!r} holds no prompt (one per line; blank lines are skipped)")
    return prompts


def add_inputs(command: argparse.ArgumentParser, what: str) -> None:
    """`--prompt`/`--prompts` and `--height`/`--width`, for text-to-image pipelines (`what`: what the prompts make)."""
    prompts = command.add_mutually_exclusive_group()
    prompts.add_argument(
        "--prompt",
        dest="prompts",
        action="append",
        type=prompt_text,
        metavar="TEXT",
        help=f"a prompt, repeatable: text-to-image pipelines (PixArt, SD3, Stable Diffusion, Flux, ...) need at least "
        f"one; {what} cycle through them (class-conditional models take class labels instead, and refuse it)",
    )
    prompts.add_argument(
        "--prompts",
        type=prompt_file,
        metavar="FILE",
        help="a text file of prompts, one per line (blank lines skipped), instead of --prompt",
    )
    for side in ("height", "width"):
        command.add_argument(
            f"--{side}",
            type=integer(1),
            metavar="PX",
            help=f"image {side} in pixels, for pipelines that take one (default: the pipeline's; a multiple of what "
            "its VAE and patches need, 8 or 16 for most)",
        )


def check_model_inputs(args: argparse.Namespace) -> Any:
    """Before anything loads: whether `args.model`'s pipeline takes what the command line gives (prompts or class
    labels, sizes, guidance), as far as its `model_index.json` tells (a `ValueError` saying what to change), and the
    guidance default filled in (`GUIDANCE_SCALE` for class-conditional models, the pipeline's own for the others).
    Returns its
    `ee_diffusion.bench.harness.PipelineInputs`, or `None` when that is known only once the pipeline is loaded (then
    the command checks it there)."""
    from ..bench.harness import pipeline_inputs_of_model
    from ..bench.noise_schedulers import build_scheduler

    inputs = pipeline_inputs_of_model(args.model)
    if inputs is not None:
        inputs.check(args.model, args.prompts, args.height, args.width, args.guidance_scale)
        if args.guidance_scale is None:  # recorded as the value it is (JSON, calibration.json)
            args.guidance_scale = GUIDANCE_SCALE if inputs.conditioning == "class_labels" else inputs.default_guidance
    scheduler_config = _scheduler_config(args.model)
    names = getattr(args, "scheduler", None) or []
    if scheduler_config is not None:
        for name in [names] if isinstance(names, str) else names:
            build_scheduler(name, scheduler_config)  # one that does not fit the model is refused before it loads
    return inputs


def _scheduler_config(model: str) -> dict | None:
    """The scheduler config in a local or shipped pipeline folder, or `None` (a hub id, a random model)."""
    from diffusers import DDPMScheduler

    from ..pipelines.loading import resolve_pretrained

    if model.startswith("random:"):
        return None
    folder = Path(resolve_pretrained(model))
    if not (folder / "scheduler" / DDPMScheduler.config_name).is_file():
        return None
    return DDPMScheduler.load_config(str(folder), subfolder="scheduler")  # an error names a broken file


def describe_inputs(args: argparse.Namespace, inputs: Any) -> str:
    """What the command's images are conditioned on and their guidance, in words (for the commands' headers)."""
    if args.prompts:
        what = f"{len(args.prompts)} prompt(s)"
        if args.height or args.width:
            what += f" at {args.height or 'default'} x {args.width or 'default'} px"
    else:
        what = "class labels" if inputs is None or inputs.conditioning == "class_labels" else "no conditioning"
    if inputs is not None:
        return f"{what}, {inputs.guidance_in_effect(args.guidance_scale)}"
    guidance = "the pipeline's default" if args.guidance_scale is None else f"{args.guidance_scale:g}"
    return f"{what}, guidance {guidance}"


def add_reference(command: argparse.ArgumentParser) -> None:
    """`--reference`, `--fid-backend` and `--inception-path`: real images to score FID/KID against."""
    command.add_argument(
        "--reference",
        type=existing_path,
        help="real images to score FID/KID against: a folder of images or an .npz of reference statistics (default: "
        "the held-out digits for the digits models; PSNR/SSIM against the full-compute output for other models)",
    )
    command.add_argument(
        "--fid-backend",
        choices=["clean-fid", "torchmetrics", "digits"],
        help="FID/KID feature network for --reference (default: the .npz's, else digits for 1x32x32 "
        "images, else clean-fid's Inception)",
    )
    command.add_argument(
        "--inception-path",
        type=existing_path,
        help="local inception-2015-12-05.pt (or its folder) for --fid-backend clean-fid",
    )


def add_overwrite(command: argparse.ArgumentParser, what: str) -> None:
    """`--overwrite`: replace an earlier output of the command (`what` names it in the help)."""
    command.add_argument(
        "--overwrite",
        action="store_true",
        help=f"replace {what} when it holds an earlier output "
        "of this command (anything else, and the shipped models, are never overwritten)",
    )


def card_command(args: argparse.Namespace) -> str:
    """The command that makes a trained model, for its card: the one given, less `--resume` and `--overwrite` (a
    resumed run ends where the uninterrupted one does, and the card's reader starts afresh)."""
    return "ee-diffusion " + " ".join(word for word in args.argv if word not in ("--resume", "--overwrite"))


def check_output_files(args: argparse.Namespace, *names: str) -> None:
    """Check each output file option of `names` that was given (`check_output_file`), before anything is loaded."""
    from ..outputs import check_output_file, matplotlib_figure, rows_csv, rows_json

    written = {"json": rows_json, "csv": rows_csv, "plot": matplotlib_figure}  # how each looks
    given = {name: getattr(args, name) for name in names if getattr(args, name, None)}
    for name, path in given.items():
        check_output_file(path, overwrite=args.overwrite, earlier_output=written[name])
    resolved = [Path(path).resolve() for path in given.values()]
    if len(set(resolved)) < len(resolved):
        options = ", ".join(f"--{name.replace('_', '-')} {path}" for name, path in given.items())
        raise ValueError(f"Each output needs a file of its own; got {options}.")


def method_list(text: str) -> list[str]:
    """A comma-separated list of `ee-diffusion bench` methods, each checked (no model is loaded; a schedule folder's
    JSON is read)."""
    from ..bench.method_specs import parse_methods
    from ..errors import USER_ERRORS, user_message

    try:
        return parse_methods(text)
    except USER_ERRORS as error:
        raise argparse.ArgumentTypeError(user_message(error)) from None


def optional_method_list(text: str) -> list[str]:
    """`method_list`, where an empty text is no method."""
    return method_list(text) if text.strip() else []


def model_name(text: str) -> str:
    """A model: a shipped model's name, a pipeline folder or a hub id; checked for existence where it is loaded, but
    never blank."""
    if not text.strip():
        raise argparse.ArgumentTypeError("expected a model name, folder or hub id, got an empty string")
    return text


def existing_path(text: str) -> str:
    """A file or folder that exists."""
    if not _path(text).exists():
        raise argparse.ArgumentTypeError(f"no such file or folder: {text!r}")
    return text
