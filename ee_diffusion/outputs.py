"""Where ee-diffusion writes, and how: never into the models shipped with the package, never over a folder that holds
anything but an earlier output of the same kind, and never half-written where a complete output stood.

- `refuse_shipped(path)`: every function that saves calls it first; a path inside the installed package's `assets/`
  is a `ValueError`.
- `check_output_folder(path, kind, overwrite, resume)` and `check_output_file(path, overwrite, earlier_output)`: what
  a command checks before it loads or computes anything. A non-empty folder is accepted only when every file in it is
  one that `kind` writes (an earlier output of the same command), and then only with `overwrite` (replace it) or
  `resume` (continue it); an existing file only with `overwrite`, and only when it is such an output too (a JSON or
  CSV table of rows, a matplotlib figure).
- `staged_folder(path)` and `staged_file(path)`: the output is written to a hidden sibling (`.NAME.partial`) and
  renamed into place when complete, so an interrupted run leaves the earlier output as it was. A resumable run keeps
  its sibling when interrupted (its checkpoint is there) and continues from it with `resume=True`
  (`resume_source(path)`: where that continues from).
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from .shipped import SHIPPED_MODELS_DIR as SHIPPED_ASSETS


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def refuse_shipped(path: str | os.PathLike) -> None:
    """Raise a `ValueError` if `path` is inside the models shipped with the package (or is their folder)."""
    resolved = Path(path).resolve()
    if _inside(resolved, SHIPPED_ASSETS):
        raise ValueError(
            f"{str(path)!r} is inside the models shipped with ee-diffusion ({SHIPPED_ASSETS}), which are "
            "never written to; give a folder of your own (for example out/...)."
        )


@dataclass(frozen=True)
class OutputKind:
    """What one command writes into its output folder: shell patterns of the paths of its files, relative to the
    folder (`model_index.json`, `transformer/*`; a `*` also spans folders, so `*.png` is every image at any depth).

    Args:
        command: How the output is named in messages (`ee-diffusion train`).
        entries: Patterns of the relative paths of the files it writes.
        resumable: Whether the command continues an earlier output (`--resume`).
    """

    command: str
    entries: tuple[str, ...]
    resumable: bool = False

    def foreign_files(self, folder: Path) -> list[str]:
        """The files under `folder` (relative paths) that this kind of output does not write."""
        files = sorted(path.relative_to(folder).as_posix() for path in folder.rglob("*") if not path.is_dir())
        return [name for name in files if not any(fnmatch.fnmatchcase(name, pattern) for pattern in self.entries)]


def _stage_of(path: Path) -> Path:
    return path.parent / f".{path.name}.partial"


def check_output_folder(
    path: str | os.PathLike, kind: OutputKind, overwrite: bool = False, resume: bool = False
) -> None:
    """Raise a `ValueError` unless `kind`'s output may be written to the folder `path` (see the module docstring)."""
    folder = Path(path)
    refuse_shipped(folder)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{str(path)!r} is a file, not a folder.")
    if resume and not kind.resumable:
        raise ValueError(f"{kind.command} cannot resume.")
    if resume and not (folder.is_dir() or _stage_of(folder).is_dir()):
        raise ValueError(f"Nothing to resume in {str(path)!r}: it does not exist (leave out --resume to start).")
    if not folder.is_dir() or not any(folder.iterdir()):
        return
    foreign = kind.foreign_files(folder)
    if foreign:
        shown = ", ".join(foreign[:5]) + (", ..." if len(foreign) > 5 else "")
        raise ValueError(
            f"{str(path)!r} holds {shown}, which {kind.command} does not write: it is not an earlier "
            f"output of {kind.command}. Give an empty or new folder."
        )
    if not (overwrite or resume):
        how = "--overwrite to replace it" + (" or --resume to continue it" if kind.resumable else "")
        raise ValueError(f"{str(path)!r} holds an earlier output of {kind.command}; pass {how}.")


def check_output_file(
    path: str | os.PathLike, overwrite: bool = False, earlier_output: Callable[[Path], bool] | None = None
) -> None:
    """Raise a `ValueError` if `path` is a shipped file, a folder, or a file that exists: without `overwrite`, or, with
    it, one that `earlier_output` (the command's own test of a file it wrote: `rows_json`, `rows_csv`,
    `matplotlib_figure`) does not take for an earlier output."""
    file = Path(path)
    refuse_shipped(file)
    if file.is_dir():
        raise ValueError(f"{str(path)!r} is a folder; give a file name.")
    if file.exists() and not overwrite:
        raise ValueError(f"{str(path)!r} exists; pass --overwrite to replace it.")
    if file.exists() and earlier_output is not None and not earlier_output(file):
        raise ValueError(
            f"{str(path)!r} is not an earlier output of this command, and is never overwritten; give another file."
        )


def _head(file: Path, size: int = 4096) -> bytes:
    with open(file, "rb") as opened:
        return opened.read(size)


def rows_json(file: Path) -> bool:
    """Whether `file` is a JSON report of rows as ee-diffusion writes them: `{"rows": [...]}` or `[...]`, each row an
    object with a `method`."""
    try:
        report = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    rows = report.get("rows") if isinstance(report, dict) else report
    return isinstance(rows, list) and all(isinstance(row, dict) and "method" in row for row in rows)


def rows_csv(file: Path) -> bool:
    """Whether `file` is a CSV table of rows as ee-diffusion writes them (its header starts with `method,`)."""
    return _head(file).startswith(b"method,")


def matplotlib_figure(file: Path) -> bool:
    """Whether `file` is a figure matplotlib saved (PNG, SVG and PDF name it in their first bytes)."""
    return b"matplotlib" in _head(file).lower()


def resume_source(path: str | os.PathLike) -> Path:
    """The folder a resumed run of `staged_folder(path, resume=True)` continues: the sibling an interrupted run
    left, else `path` itself."""
    stage = _stage_of(Path(path))
    return stage if stage.is_dir() else Path(path)


@contextlib.contextmanager
def staged_folder(path: str | os.PathLike, resume: bool = False, keep_on_failure: bool = False) -> Iterator[Path]:
    """Yield a hidden sibling folder to write the output into; when the block completes, it replaces `path`.

    `resume`: start from the sibling an interrupted run left, else from a copy of `path`. `keep_on_failure`: leave the
    sibling when the block raises (a resumable run's checkpoint is there); otherwise it is removed. Either way `path`
    is untouched until the block completes.
    """
    final = Path(path)
    refuse_shipped(final)
    stage = _stage_of(final)
    if not (resume and stage.is_dir()):
        if stage.exists():
            shutil.rmtree(stage)
        if resume and final.is_dir():
            shutil.copytree(final, stage)
        else:
            stage.mkdir(parents=True)
    try:
        yield stage
    except BaseException:
        if not keep_on_failure:
            shutil.rmtree(stage, ignore_errors=True)
        raise
    replaced = final.parent / f".{final.name}.replaced"
    if replaced.exists():
        shutil.rmtree(replaced)
    if final.exists():
        final.rename(replaced)
    stage.rename(final)
    shutil.rmtree(replaced, ignore_errors=True)


@contextlib.contextmanager
def staged_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a hidden sibling file name (same suffix, so writers that go by it still do) to write; when the block
    completes it replaces `path`. Missing parent folders are created."""
    final = Path(path)
    refuse_shipped(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    temporary = final.parent / f".{final.stem}.partial{final.suffix}"
    try:
        yield temporary
        os.replace(temporary, final)
    finally:
        temporary.unlink(missing_ok=True)
