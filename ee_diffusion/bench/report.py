"""The rows of `ee-diffusion bench` (`BenchRow`) and what it writes of them: a console table (rich), JSON, CSV, a
Pareto plot (PNG) and the images (PNG).

JSON: `{"config": {...}, "rows": [{ROW_KEYS}], "notes": {method: reason}}`; the rows carry exactly `ROW_KEYS`, and a
method that could not run (an accelerator that does not support the model) has a row of `None` numbers and its reason
in `notes`. The CSV has the `ROW_KEYS` columns and a last `note` column. `quality_reference` says what a row's quality
numbers are measured against: the `--reference` (FID/KID), the held-out digits, or, for `psnr` and `ssim`, the
full-compute output of the same seeds and prompts (`full compute: baseline@<steps>`).
"""

from __future__ import annotations

import csv
import io
import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from rich.console import Console
from rich.table import Table

from ..outputs import OutputKind, staged_file, staged_folder

# What `save_images` writes: PNG files, in a folder per method (and per cell).
SAVED_IMAGES = OutputKind("ee-diffusion bench --save-images", ("*.png",))

# A timing spread (interquartile range over median of the timed rounds) above this is reported as unstable.
UNSTABLE_SPREAD = 0.10


@dataclass
class BenchRow:
    """One method in one (scheduler, steps) cell. `note` says why a method did not run (all numbers `None`).

    `images_per_s` comes from the median of the timed rounds, `timing_spread` is their interquartile range over
    their median, and `speedup` is the median over rounds of the baseline's seconds over this method's (see
    `ee_diffusion.metrics.round_speedups`). `depth_per_step` is, under an exit schedule or exit heads, the mean number
    of blocks run at each sampling step (mean over samples and batches; a classifier-free-guidance call counts both
    halves); under a diffusers accelerator, the blocks' worth of work each step ran (its measured block fraction
    times the model's exit blocks); `None` for methods that run every block. `psnr` (dB, capped at
    `ee_diffusion.metrics.PSNR_CAP_DB`) and `ssim` compare the images with the full-compute output of the same seeds
    and conditioning (models scored without a FID reference); `quality_reference` names what the quality numbers are
    measured against. `gflop_per_image` is the floating-point operations (1e9) per image of one pipeline call of the
    timing batch, counted by torch (`ee_diffusion.metrics.count_flops`: matrix products, convolutions, attention;
    `None` under `--compile`), and `flop_fraction` that over the cell's baseline's."""

    method: str
    model: str
    scheduler: str
    steps: int
    num_samples: int
    fid: float | None
    kid: float | None
    class_accuracy: float | None
    images_per_s: float | None
    timing_spread: float | None
    speedup: float | None
    block_fraction: float | None
    peak_memory_mb: float | None
    note: str | None = None
    depth_per_step: list[float] | None = None
    psnr: float | None = None
    ssim: float | None = None
    quality_reference: str | None = None
    gflop_per_image: float | None = None
    flop_fraction: float | None = None


ROW_KEYS = (
    "method",
    "model",
    "scheduler",
    "steps",
    "num_samples",
    "fid",
    "kid",
    "class_accuracy",
    "images_per_s",
    "timing_spread",
    "speedup",
    "block_fraction",
    "peak_memory_mb",
    "depth_per_step",
    "psnr",
    "ssim",
    "quality_reference",
    "gflop_per_image",
    "flop_fraction",
)

# Said under every table with PSNR/SSIM rows.
SIMILARITY_NOTE = (
    "PSNR/SSIM vs full: each method's images against the full-compute output ({reference}) of the same seeds and "
    "prompts: closeness to the full model, not image quality. A row with fewer steps samples along another "
    "trajectory and is penalised unfairly; judge fewer-steps rows against real images (--reference, FID/KID)."
)


def rows_as_dicts(rows: list[BenchRow]) -> list[dict]:
    return [{key: value for key, value in asdict(row).items() if key in ROW_KEYS} for row in rows]


def notes(rows: list[BenchRow]) -> dict[str, str]:
    """Why each method that did not run did not run."""
    return {row.method: row.note for row in rows if row.note is not None}


def unstable(rows: list[BenchRow]) -> list[BenchRow]:
    """The rows whose timed rounds disagree by more than `UNSTABLE_SPREAD` of their median."""
    return [row for row in rows if row.timing_spread is not None and row.timing_spread > UNSTABLE_SPREAD]


def similarity_note(rows: list[BenchRow]) -> str | None:
    """What the PSNR/SSIM numbers of `rows` mean and do not mean, when some row has them."""
    scored = [row for row in rows if row.psnr is not None]
    if not scored:
        return None
    references = sorted(
        {row.quality_reference.removeprefix("full compute: ") for row in scored if row.quality_reference}
    )
    return SIMILARITY_NOTE.format(reference=", ".join(references) or "the baseline")


def _cell(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_table(rows: list[BenchRow]) -> str:
    """The rows as a console table (rich), one block of rows per (scheduler, steps) cell."""
    table = Table(show_edge=False, pad_edge=False)
    headers = [
        "method",
        "model",
        "scheduler",
        "steps",
        "n",
        "FID",
        "KID x1e3",
        "class acc",
        "img/s",
        "spread",
        "speedup",
        "blocks",
        "FLOPs",
        "peak MB",
    ]
    with_notes = any(row.note for row in rows)
    with_similarity = any(row.psnr is not None for row in rows)
    if with_similarity:  # against the full-compute output: labelled so, and explained under the table
        headers[headers.index("class acc") + 1 : headers.index("class acc") + 1] = ["PSNR vs full", "SSIM vs full"]
    for header in headers + ["note"] * with_notes:  # a note may fold onto more lines; nothing else does
        table.add_column(header, overflow="fold", no_wrap=header != "note")
    for index, row in enumerate(rows):
        following = rows[index + 1] if index + 1 < len(rows) else row
        table.add_row(
            row.method,
            row.model,
            row.scheduler,
            str(row.steps),
            str(row.num_samples),
            _cell(row.fid, ".2f"),
            _cell(None if row.kid is None else row.kid * 1e3, ".2f"),
            _cell(row.class_accuracy, ".1%"),
            *[_cell(row.psnr, ".2f"), _cell(row.ssim, ".4f")] * with_similarity,
            _cell(row.images_per_s, ".1f"),
            _cell(row.timing_spread, ".0%"),
            _cell(row.speedup, ".2f") + ("x" if row.speedup is not None else ""),
            _cell(row.block_fraction, ".1%"),
            _cell(row.flop_fraction, ".1%"),
            _cell(row.peak_memory_mb, ".0f"),
            *[row.note or ""] * with_notes,
            end_section=(following.scheduler, following.steps) != (row.scheduler, row.steps),
        )
    console = Console(file=io.StringIO(), width=220, color_system=None)
    console.print(table)
    return console.file.getvalue().rstrip()


def write_json(path: str, config: dict[str, Any], rows: list[BenchRow]) -> None:
    report = {"config": config, "rows": rows_as_dicts(rows), "notes": notes(rows)}
    with staged_file(path) as staged:
        staged.write_text(json.dumps(report, indent=2))


def write_csv(path: str, rows: list[BenchRow]) -> None:
    with staged_file(path) as staged, open(staged, "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=[*ROW_KEYS, "note"])
        writer.writeheader()
        for row, values in zip(rows, rows_as_dicts(rows)):
            depths = values["depth_per_step"]
            profile = "" if depths is None else " ".join(f"{depth:.2f}" for depth in depths)
            writer.writerow({**values, "depth_per_step": profile, "note": row.note or ""})


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both axes (x: higher is better, y: lower is better)."""
    return [
        i
        for i, (x, y) in enumerate(points)
        if not any(x2 >= x and y2 <= y and (x2, y2) != (x, y) for x2, y2 in points)
    ]


def plot(path: str, rows: list[BenchRow]) -> None:
    """Quality against images/s, one point per method and cell, the Pareto front joined; FID when the rows have it,
    otherwise class accuracy (as error, 1 - accuracy), otherwise PSNR against the full-compute output (higher is
    better), otherwise the block fraction (speed-only rows). When rows
    have a depth profile (exit schedules, exit heads), a second panel draws the blocks run at each sampling step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [row for row in rows if row.images_per_s is not None]
    higher_is_better = False
    if all(row.fid is not None for row in rows):
        label, quality = "FID (lower is better)", [row.fid for row in rows]
    elif all(row.class_accuracy is not None for row in rows):
        label, quality = "class error, 1 - accuracy", [1 - row.class_accuracy for row in rows]
    elif all(row.psnr is not None for row in rows):
        label, quality = "PSNR vs the full-compute output, dB (higher is better)", [row.psnr for row in rows]
        higher_is_better = True
    else:
        label, quality = "executed block fraction (speed-only rows)", [row.block_fraction for row in rows]
    speed = [row.images_per_s for row in rows]
    several_cells = len({(row.scheduler, row.steps) for row in rows}) > 1
    profiled = [row for row in rows if row.depth_per_step]
    figure, panels = plt.subplots(1, 2 if profiled else 1, figsize=(13 if profiled else 7, 5), squeeze=False)
    axes = panels[0][0]
    axes.scatter(speed, quality, color="tab:blue")
    for row, x, y in zip(rows, speed, quality):
        name = f"{row.method} ({row.scheduler}-{row.steps})" if several_cells else row.method
        axes.annotate(name, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    lower_is_better = [-value for value in quality] if higher_is_better else quality
    front = sorted(pareto_front(list(zip(speed, lower_is_better))), key=lambda i: speed[i])
    axes.plot([speed[i] for i in front], [quality[i] for i in front], "--o", color="tab:red", label="Pareto front")
    axes.set_xlabel("images / s")
    axes.set_ylabel(label)
    axes.set_title(f"{rows[0].model}, {rows[0].num_samples} samples per method" if rows else "no rows")
    axes.legend()
    if profiled:
        depths = panels[0][1]
        for row in profiled:
            name = f"{row.method} ({row.scheduler}-{row.steps})" if several_cells else row.method
            depths.plot(range(1, len(row.depth_per_step) + 1), row.depth_per_step, "-o", markersize=3, label=name)
        depths.set_xlabel("sampling step (first: the noisiest)")
        depths.set_ylabel("blocks run (mean over samples)")
        depths.set_title("depth per sampling step")
        depths.legend(fontsize=7)
    figure.tight_layout()
    with staged_file(path) as staged:
        figure.savefig(staged, dpi=120)
    plt.close(figure)


def safe_name(text: str) -> str:
    """A method spec as a folder name: runs of characters other than letters, digits, '.', '-', '_' become '_'."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "_"


def save_images(
    folder: str, rows: list[BenchRow], images: list[dict[int, torch.Tensor]], labels: list[int] | list[str]
) -> None:
    """Write `{folder}/{method}/{index:05d}_class{label}.png` (under `{scheduler}-{steps}/` when there are several
    cells); `images[k]` holds row `k`'s batches by batch index, NCHW in [0, 1]. A label that is a text is the name's
    suffix as it is (`prompt0`: `00000_prompt0.png`; empty: `00000.png`). 1, 3 and 4 channels are grey, RGB and RGBA
    (the latents of `random:` models are written as they are). The folder is written whole, then put in place of an
    earlier one (`ee_diffusion.outputs.staged_folder`)."""
    with staged_folder(folder) as staged:
        _save_images(staged, rows, images, labels)


def _save_images(
    folder: Path, rows: list[BenchRow], images: list[dict[int, torch.Tensor]], labels: list[int] | list[str]
) -> None:
    suffixes = [f"_class{label}" if isinstance(label, int) else f"_{label}" if label else "" for label in labels]
    several_cells = len({(row.scheduler, row.steps) for row in rows}) > 1
    for row, batches in zip(rows, images):
        if row.note is not None:
            continue
        out = Path(folder) / (f"{row.scheduler}-{row.steps}" if several_cells else "") / safe_name(row.method)
        out.mkdir(parents=True, exist_ok=True)
        pictures = torch.cat([batches[i] for i in sorted(batches)])
        pixels = (pictures.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
        for index, (array, suffix) in enumerate(zip(pixels, suffixes)):
            Image.fromarray(np.squeeze(array, axis=-1) if array.shape[-1] == 1 else array).save(
                out / f"{index:05d}{suffix}.png"
            )
