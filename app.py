"""ee-diffusion's demo: the shipped models with and without an accelerator, side by side, offline.

`python app.py` (or `make app`) serves it on http://127.0.0.1:7860 (`--host`, `--port`, whose defaults follow Gradio's
`GRADIO_SERVER_NAME` and `GRADIO_SERVER_PORT` where those are set, as on a Hugging Face Space or in a container;
`--share` is off: nothing here reaches the internet). Three tabs, each a named API endpoint that `gradio_client` can
script:

- `/generate_images`: one class-conditional image model (a shipped digits model or a local diffusers folder) at full
  depth and under an accelerator (an exit schedule, DeeDiff's uncertainty exits, or one of diffusers' caches), from
  the same noise: both images, the wall time of each call, the speedup, the share of block work run, and the blocks
  run at each sampling step.
- `/decode_text`: a shipped language model (`tiny-mdlm`, `tiny-mdlm-puzzles`) decodes a prompt with all its steps,
  with Prophet, with SchED and with Fast-dLLM's threshold rule (without and with its KV cache): each answer, its
  denoiser passes and time, and the answer as it filled in, pass by pass.
- `/read_bench`: a JSON file written by `ee-diffusion bench --json` as a table and its quality/speed plot.

Models load once, on first use, and stay loaded: changing the schedule or the accelerator does not reload them. The
accelerators are the bench's methods (`ee_diffusion.bench.methods`), put on and taken off the shared pipeline around
each call, so what the demo shows is what the bench measures (one timed call each here, not interleaved rounds).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import threading
import time
from dataclasses import fields
from numbers import Real
from pathlib import Path
from typing import Any

DEFAULT_HOST, DEFAULT_PORT = "127.0.0.1", 7860


class _FromEnvironment(str):
    """A default read from an environment variable (`name`), so that a bad value's message can name the variable."""

    name: str

    def __new__(cls, value: str, name: str) -> _FromEnvironment:
        text = super().__new__(cls, value)
        text.name = name
        return text


def _port(text: str) -> int:
    """`--port`'s type: a whole number from 1 to 65535 (argparse also applies it to a default read as a string)."""
    source = f"${text.name} " if isinstance(text, _FromEnvironment) else ""
    try:
        port = int(text)
    except ValueError:
        port = 0
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{source}must be a whole number from 1 to 65535, got {str(text)!r}")
    return port


def build_parser() -> argparse.ArgumentParser:
    """`python app.py`'s arguments. The defaults of `--host` and `--port` are Gradio's `GRADIO_SERVER_NAME` and
    `GRADIO_SERVER_PORT` when set (a Hugging Face Space or a container sets them, and serving on loopback there would
    be unreachable), else 127.0.0.1 and 7860; the flags win over both."""
    host = os.environ.get("GRADIO_SERVER_NAME", "").strip()
    port = os.environ.get("GRADIO_SERVER_PORT", "").strip()
    parser = argparse.ArgumentParser(description="ee-diffusion's demo (offline, on the shipped models).")
    parser.add_argument(
        "--host",
        default=host or DEFAULT_HOST,
        help=f"address to serve on (0.0.0.0: every interface; default: $GRADIO_SERVER_NAME if set, "
        f"else {DEFAULT_HOST})",
    )
    port_default = _FromEnvironment(port, "GRADIO_SERVER_PORT") if port else DEFAULT_PORT  # argparse runs _port on it
    parser.add_argument(
        "--port",
        type=_port,
        default=port_default,
        help=f"port to serve on (default: $GRADIO_SERVER_PORT if set, else {DEFAULT_PORT})",
    )
    return parser


if __name__ == "__main__":
    # Usage errors and --help before gradio's (slow) import, which reads GRADIO_SERVER_PORT itself with int() and
    # fails with a traceback on a bad value: it gets the port chosen here, the one the app serves on anyway.
    os.environ["GRADIO_SERVER_PORT"] = str(build_parser().parse_args().port)
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # offline: no version check, no telemetry
import gradio as gr  # noqa: E402
import pandas  # noqa: E402  (a dependency of gradio)

from ee_diffusion.errors import USER_ERRORS, user_message  # noqa: E402

# System fonts only: the default theme would fetch its fonts from Google, which an offline browser waits for.
THEME = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])
IMAGE_MODELS = ("digits-dit", "digits-dit-ase", "digits-unet", "digits-unet-ase")
TEXT_MODELS = ("tiny-mdlm", "tiny-mdlm-puzzles")
TEXT_METHODS = {
    "full steps": "full",
    "Prophet": "prophet",
    "SchED (exp)": "sched-exp",
    "Fast-dLLM threshold 0.7": "threshold:0.7",
    "Fast-dLLM threshold 0.7 + prefix KV cache": "threshold:0.7+prefix",
}
# Prompts of each model's tasks: tiny-mdlm adds and sorts, tiny-mdlm-puzzles permutes and finds digit sums.
TEXT_EXAMPLES = {
    "tiny-mdlm": ("123+4567=", "sort:93120=", "58+9=", "sort:8080123="),
    "tiny-mdlm-puzzles": ("perm:3141592=", "dsum:4,23=", "dsum:5,9=", "perm:12345678="),
}
MASK, END = "_", "."  # how a masked and an end-of-answer position show in the fill-in table
MAX_SEED = 2**63 - 1  # the largest seed torch.Generator.manual_seed takes as a signed 64-bit number

# What the acceleration choice means, as a bench method spec built from the tab's inputs.
SHAPE = "exit schedule (shape)"
OWN = "the model's own exit schedule"
FOLDER = "saved or calibrated schedule (folder)"
DEEDIFF = "DeeDiff uncertainty exits"
CACHES = {
    "FirstBlockCache (diffusers)": "fbcache",
    "MagCache (diffusers)": "magcache",
    "TaylorSeer (diffusers)": "taylorseer",
    "PyramidAttentionBroadcast (diffusers)": "pab",
}
ACCELERATIONS = (SHAPE, OWN, FOLDER, DEEDIFF, *CACHES)
SHAPES = ("linear", "cosine", "constant")


def method_spec(
    acceleration: str, model: str, shape: str, min_depth: float, folder: str | None, threshold: str | float | None
) -> str:
    """The bench method (`ee_diffusion.bench.methods`) an acceleration choice of the image tab stands for (`threshold`:
    a number, or empty for the method's default)."""
    if acceleration == SHAPE:
        if shape not in SHAPES:
            raise ValueError(f"The schedule shape must be one of {SHAPES}, got {shape!r}.")
        if min_depth is None or not 0 < float(min_depth) <= 1:
            raise ValueError(f"The minimum depth is a fraction of the model's blocks in (0, 1], got {min_depth}.")
        return f"ase:{shape}:{float(min_depth):.3f}"
    if acceleration == OWN:
        return f"finetuned:{model}"
    if acceleration == FOLDER:
        if not folder or not (Path(folder) / "exit_schedule.json").is_file():
            raise ValueError(
                f"The schedule folder must hold an exit_schedule.json (one that `ee-diffusion calibrate` "
                f"or `ExitSchedule.save_pretrained` wrote), got {folder!r}."
            )
        return f"ase:{folder}"
    threshold = None if threshold is None or str(threshold).strip() == "" else str(threshold).strip()
    try:  # 0 would make each method a no-op: FirstBlockCache and MagCache never skip, DeeDiff never exits
        if threshold is not None and not (math.isfinite(float(threshold)) and float(threshold) > 0):
            raise ValueError
    except ValueError:
        raise ValueError(
            f"The threshold must be a number > 0 (empty: the method's default), got {threshold!r}."
        ) from None
    argument = "" if threshold is None else f":{float(threshold):g}"
    if acceleration == DEEDIFF:
        return f"deediff{argument}"
    if acceleration in CACHES:
        kind = CACHES[acceleration]
        return kind + (argument if kind in ("fbcache", "magcache") else "")
    raise ValueError(f"The acceleration must be one of {ACCELERATIONS}, got {acceleration!r}.")


def whole_number(value: Any, what: str, low: int, high: int, note: str = "") -> int:
    """`value` as typed in a number field (Gradio passes it unrounded), as an int from `low` to `high`; a fraction,
    a non-number or a value out of range is a `ValueError` that says so (`what`: how the message names the field;
    `note`: why the bounds are what they are)."""
    whole = (
        not isinstance(value, bool)
        and isinstance(value, Real)
        and math.isfinite(value)
        and value == int(value)
        and low <= value <= high
    )
    if not whole:
        raise ValueError(f"{what} must be a whole number from {low} to {high}{note}, got {value}.")
    return int(value)


def parse_labels(text: str) -> list[int]:
    """`"3"` or `"0, 1, 7"`: one image per class id."""
    try:
        labels = [int(part) for part in str(text).replace(";", ",").split(",") if part.strip()]
    except ValueError:
        raise ValueError(
            f"Class labels are whole numbers separated by commas (e.g. 3 or 0,1,7), got {text!r}."
        ) from None
    if not labels:
        raise ValueError("Give at least one class label (e.g. 3 or 0,1,7).")
    if len(labels) > 16:
        raise ValueError(f"At most 16 class labels at once, got {len(labels)}.")
    return labels


class Models:
    """The pipelines, each loaded on first use and kept; a lock per pipeline, since a method puts hooks on it."""

    def __init__(self) -> None:
        self._pipes: dict[str, tuple[Any, Any, threading.Lock]] = {}
        self._lock = threading.Lock()

    def image(self, model: str) -> tuple[Any, Any, threading.Lock]:
        """`(pipeline, its own scheduler config, its lock)` for a shipped name or a local pipeline folder."""
        from ee_diffusion.pipelines.loading import load_early_exit_pipeline, resolve_pretrained

        model = str(model or "").strip()
        if not model:
            raise ValueError(f"Choose a model: one of {IMAGE_MODELS}, or a local diffusers pipeline folder.")
        try:
            key = resolve_pretrained(model)
        except (OSError, ValueError) as error:
            raise ValueError(
                f"{model!r} is neither a shipped model ({', '.join(IMAGE_MODELS)}) nor a local diffusers "
                f"pipeline folder: {error}"
            ) from None
        with self._lock:
            if key not in self._pipes:
                if not (Path(key) / "model_index.json").is_file():
                    raise ValueError(f"{model!r} is not a diffusers pipeline folder (it has no model_index.json).")
                try:
                    pipe = load_early_exit_pipeline(key)
                except (*USER_ERRORS, KeyError) as error:  # a broken config (OSError) or weights (SafetensorError)
                    raise ValueError(
                        f"{model!r} could not be loaded as an image pipeline: {user_message(error)}"
                    ) from None
                if not hasattr(pipe, "exit_stats") or "class_labels" not in _call_parameters(pipe):
                    raise ValueError(
                        f"{model!r} holds a {type(pipe).__name__}; this tab runs class-conditional "
                        "image pipelines (DiT, U-Net)."
                    )
                pipe.set_progress_bar_config(desc="sampling")
                _warm_up(pipe)
                self._pipes[key] = (pipe, pipe.scheduler.config, threading.Lock())
            return self._pipes[key]

    def text(self, model: str) -> Any:
        from ee_diffusion import MaskedDiffusionLMPipeline

        if model not in TEXT_MODELS:
            raise ValueError(f"Unknown language model {model!r}; expected one of {TEXT_MODELS}.")
        with self._lock:
            if model not in self._pipes:
                self._pipes[model] = (MaskedDiffusionLMPipeline.from_pretrained(model), None, threading.Lock())
            return self._pipes[model]


def _warm_up(pipe: Any) -> None:
    """One short call, so that the first timed call does not pay for the first run's one-time costs."""
    import torch

    pipe(
        class_labels=[0],
        guidance_scale=2.0,
        num_inference_steps=2,
        output_type="pt",
        generator=torch.Generator(pipe.device).manual_seed(0),
    )


def _call_parameters(pipe: Any) -> set[str]:
    import inspect

    return set(inspect.signature(pipe.__call__).parameters)


MODELS = Models()


def _grid(images: Any) -> Any:
    """A row of images (NCHW in [0, 1]) as one PIL image, scaled up to at least 128 pixels high."""
    import torch
    from PIL import Image

    row = torch.cat(list(images.float().clamp(0, 1)), dim=-1)
    scale = max(1, 128 // row.shape[-2])
    row = torch.nn.functional.interpolate(row[None], scale_factor=scale, mode="nearest")[0]
    pixels = (row * 255).round().byte().permute(1, 2, 0).numpy()
    return Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels)


def _timed_call(pipe: Any, method: Any, labels: list[int], seed: int, steps: int, guidance: float) -> dict:
    import torch

    with method.session(pipe) as work:
        generator = torch.Generator(pipe.device).manual_seed(seed)
        start = time.perf_counter()
        images = pipe(
            class_labels=labels,
            guidance_scale=guidance,
            generator=generator,
            num_inference_steps=steps,
            output_type="pt",
        ).images
        seconds = time.perf_counter() - start
        return {"images": images, "seconds": seconds, "fraction": work(), "depths": work.depths()}


def _depth_plot(full_blocks: int, steps: int, depths: list[float] | None, label: str) -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 3.2))
    axes.plot(range(1, steps + 1), [full_blocks] * steps, "-", color="tab:gray", label="full model")
    if depths:
        axes.plot(range(1, len(depths) + 1), depths, "-o", markersize=3, color="tab:red", label=label)
    axes.set_xlabel("sampling step (first: the noisiest)")
    axes.set_ylabel("blocks run (mean over the batch)")
    axes.set_ylim(0, full_blocks + 1)
    axes.legend(fontsize=8)
    figure.tight_layout()
    plt.close(figure)
    return figure


def generate_images(
    model: str,
    labels: str,
    scheduler: str,
    steps: float,
    seed: float,
    guidance: float,
    acceleration: str,
    shape: str,
    min_depth: float,
    schedule_folder: str | None,
    threshold: str | None,
    progress: gr.Progress = gr.Progress(track_tqdm=True),
) -> tuple:
    """The model at full depth and under the acceleration, from the same noise: both images, a summary, the numbers
    (JSON) and the depth plot."""
    try:
        return _generate_images(
            model, labels, scheduler, steps, seed, guidance, acceleration, shape, min_depth, schedule_folder, threshold
        )
    except USER_ERRORS as error:  # Gradio would show only "upstream app raised an exception" for these
        raise gr.Error(user_message(error)) from None


def _generate_images(
    model, labels, scheduler, steps, seed, guidance, acceleration, shape, min_depth, schedule_folder, threshold
) -> tuple:
    from ee_diffusion.bench.methods import Target, build_method
    from ee_diffusion.bench.noise_schedulers import SCHEDULERS, build_scheduler
    from ee_diffusion.exits import num_exit_blocks

    labels = parse_labels(labels)
    if scheduler not in SCHEDULERS:
        raise ValueError(f"The scheduler must be one of {sorted(SCHEDULERS)}, got {scheduler!r}.")
    steps = whole_number(steps, "Steps", 1, 1000)
    seed = whole_number(seed, "The seed", 0, MAX_SEED)
    if not isinstance(guidance, Real) or isinstance(guidance, bool) or not 0 <= guidance < math.inf:
        raise ValueError(f"The guidance scale must be a finite number >= 0, got {guidance}.")
    guidance = float(guidance)
    pipe, scheduler_config, lock = MODELS.image(model)
    spec = method_spec(acceleration, model, shape, min_depth, schedule_folder, threshold)
    with lock:
        pipe.scheduler = build_scheduler(scheduler, scheduler_config)
        target = Target(model, lambda _: pipe, steps)
        method = build_method(spec, target)
        if method.unsupported:
            raise ValueError(f"{acceleration} cannot run on {model}: {method.unsupported}.")
        if acceleration == OWN and pipe.exit_schedule is None:
            raise ValueError(f"{model} has no exit schedule of its own; pick a shape or a schedule folder.")
        full = _timed_call(pipe, build_method("baseline", target), labels, seed, steps, guidance)
        fast = _timed_call(pipe, method, labels, seed, steps, guidance)
        blocks = num_exit_blocks(pipe)
    speedup = full["seconds"] / fast["seconds"]
    numbers = {
        "method": spec,
        "full_seconds": round(full["seconds"], 4),
        "accelerated_seconds": round(fast["seconds"], 4),
        "speedup": round(speedup, 3),
        "block_fraction": round(fast["fraction"], 4),
        "blocks": blocks,
        "depth_per_step": None if fast["depths"] is None else [round(depth, 3) for depth in fast["depths"]],
    }
    summary = (
        f"**{acceleration}** (`{spec}`) on `{model}`, {scheduler} at {steps} steps, {len(labels)} image(s)\n\n"
        f"| | full model | accelerated |\n|---|---|---|\n"
        f"| wall time | {full['seconds']:.2f} s | {fast['seconds']:.2f} s |\n"
        f"| block work run | 100% | {fast['fraction']:.1%} |\n\n"
        f"**Speedup {speedup:.2f}x** (one timed call each, same noise; `ee-diffusion bench` times interleaved rounds)."
    )
    plot = _depth_plot(blocks, steps, fast["depths"], acceleration)
    return _grid(full["images"]), _grid(fast["images"]), summary, numbers, plot


def _answer_text(pipe: Any, tokens: Any) -> str:
    """An answer's positions as text: masked ones as `MASK`, the end of the answer and after as `END`."""
    mask, eos = pipe.adapter.mask_token_id, pipe.tokenizer.eos_token_id
    shown = []
    for token in tokens.tolist():
        if token == mask:
            shown.append(MASK)
        elif token == eos or token == pipe.tokenizer.pad_token_id:
            shown.append(END)
        else:
            shown.append(pipe.tokenizer.convert_ids_to_tokens(token))
    return "".join(shown)


def decode_text(model: str, prompt: str, steps: float, progress: gr.Progress = gr.Progress(track_tqdm=True)) -> tuple:
    """A shipped language model decodes the prompt with every method: a summary table, the numbers (JSON) and the
    answers as they filled in, one row per denoiser pass."""
    try:
        return _decode_text(model, prompt, steps)
    except USER_ERRORS as error:
        raise gr.Error(user_message(error)) from None


def _decode_text(model: str, prompt: str, steps: float) -> tuple:
    from ee_diffusion.dllm.methods import method_settings

    pipe, _, lock = MODELS.text(model)
    prompt = str(prompt or "").strip()
    if not prompt:
        examples = TEXT_EXAMPLES[model]
        raise ValueError(f"Write a prompt, for example {examples[0]!r} or {examples[1]!r}.")
    gen_length = pipe.config.gen_length
    steps = whole_number(steps, "Steps", 1, gen_length, note=" (the answer's length)")
    results, fills = {}, {}
    with lock:
        for label, name in TEXT_METHODS.items():
            # The tokens each denoiser pass embeds: the answer as it stands (a pass over Fast-dLLM's prefix cache
            # embeds only the block and what follows it, here the whole answer).
            inputs: list[Any] = []
            hook = pipe.model.get_input_embeddings().register_forward_pre_hook(
                lambda module, args, inputs=inputs: inputs.append(args[0][0].clone())
            )
            try:
                start = time.perf_counter()
                output = pipe(prompt=prompt, **method_settings(name, steps))
                seconds = time.perf_counter() - start
            finally:
                hook.remove()
            width = len(output.sequences[0])
            fills[label] = [_answer_text(pipe, tokens[-width:]) for tokens in inputs]
            fills[label].append(_answer_text(pipe, output.sequences[0]))
            results[label] = {"answer": output.texts[0], "passes": int(output.nfe[0]), "seconds": round(seconds, 4)}
    rows = max(len(fill) for fill in fills.values())
    table = [[str(i + 1) if i < rows - 1 else "final"] for i in range(rows)]
    for fill in fills.values():
        for i in range(rows):
            cell = fill[i] if i < len(fill) - 1 else ("" if i < rows - 1 else fill[-1])
            table[i].append(cell)
    summary = "| method | answer | denoiser passes | time |\n|---|---|---|---|\n" + "\n".join(
        f"| {label} | `{result['answer']}` | {result['passes']} | {result['seconds'] * 1000:.0f} ms |"
        for label, result in results.items()
    )
    return summary, results, pandas.DataFrame(table, columns=["pass", *TEXT_METHODS])


def read_bench(path: str | None) -> tuple:
    """A bench JSON (`ee-diffusion bench --json`) as a table and its quality/speed plot."""
    try:
        return _read_bench(path)
    except USER_ERRORS as error:
        raise gr.Error(user_message(error)) from None


def _read_bench(path: str | None) -> tuple:
    from ee_diffusion.bench.report import ROW_KEYS, BenchRow, plot

    if not path:
        raise ValueError("Upload a JSON file written by `ee-diffusion bench --json`.")
    try:
        report = json.loads(Path(path).read_text())
        names = {field.name for field in fields(BenchRow)}
        rows = [BenchRow(**{key: value for key, value in row.items() if key in names}) for row in report["rows"]]
        notes = report.get("notes") or {}
        for row in rows:
            _check_bench_row(row)
            row.note = notes.get(row.method)
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError, UnicodeDecodeError, ValueError):
        raise ValueError(
            f"{Path(path).name} is not a bench JSON (`ee-diffusion bench --json` writes one: an object "
            "with the rows of the table under 'rows')."
        ) from None
    columns = [key for key in ROW_KEYS if key != "depth_per_step"]
    table = [[getattr(row, key) for key in columns] for row in rows]
    image = Path(tempfile.mkdtemp()) / "bench.png"
    plot(str(image), rows)
    return pandas.DataFrame(table, columns=columns), str(image)


def _check_bench_row(row: Any) -> None:
    """Raise a `ValueError` unless a row read from a bench JSON holds what the bench writes: a text method, numbers
    (or nothing) where it writes numbers, and numbers per step for `depth_per_step`."""

    def number(value: Any) -> bool:
        return value is None or (isinstance(value, (int, float)) and not isinstance(value, bool))

    numeric = ("steps", "num_samples", "fid", "kid", "class_accuracy", "images_per_s", "timing_spread", "speedup")
    numeric += ("block_fraction", "peak_memory_mb", "psnr", "ssim", "gflop_per_image", "flop_fraction")
    depths = row.depth_per_step
    if (
        not isinstance(row.method, str)
        or not all(number(getattr(row, key)) for key in numeric)
        or not (depths is None or (isinstance(depths, list) and all(number(d) and d is not None for d in depths)))
    ):
        raise ValueError(f"not a bench row: {row}")


def build_demo() -> gr.Blocks:
    """The app: three tabs, each with a named API endpoint."""
    from ee_diffusion.bench.noise_schedulers import SCHEDULERS

    with gr.Blocks(title="ee-diffusion", analytics_enabled=False) as demo:
        gr.Markdown("# ee-diffusion\nThe same noise with and without an accelerator, on the shipped models, offline.")
        with gr.Tab("Image"):
            with gr.Row():
                with gr.Column():
                    model = gr.Dropdown(
                        list(IMAGE_MODELS),
                        value="digits-dit-ase",
                        allow_custom_value=True,
                        label="model (a shipped one, or type a local diffusers folder)",
                    )
                    labels = gr.Textbox("3", label="class label(s), comma-separated")
                    with gr.Row():
                        scheduler = gr.Dropdown(list(SCHEDULERS), value="dpm-solver++", label="scheduler")
                        # precision=None: the function gets the number as typed (precision=0 would round 2.5 to
                        # 2 before the function could refuse it)
                        steps = gr.Number(10, precision=None, step=1, label="steps")
                        seed = gr.Number(0, precision=None, step=1, label="seed")
                        guidance = gr.Number(2.0, label="guidance scale")
                    acceleration = gr.Radio(list(ACCELERATIONS), value=OWN, label="acceleration")
                    with gr.Row():
                        shape = gr.Dropdown(list(SHAPES), value="linear", label="schedule shape")
                        min_depth = gr.Slider(
                            0.05,
                            1.0,
                            value=0.5,
                            step=0.05,
                            label="minimum depth (share of the blocks, at the noisiest step)",
                        )
                    schedule_folder = gr.Textbox(
                        label="schedule folder (holding exit_schedule.json)",
                        placeholder="e.g. ee_diffusion/assets/digits-dit-ase/plans/...",
                    )
                    threshold = gr.Textbox(label="threshold (DeeDiff, FirstBlockCache, MagCache; empty: the default)")
                    run = gr.Button("Generate", variant="primary")
                with gr.Column():
                    with gr.Row():
                        full_image = gr.Image(label="full model", type="pil", elem_id="full-image")
                        fast_image = gr.Image(label="accelerated", type="pil", elem_id="fast-image")
                    summary = gr.Markdown(elem_id="image-summary")
                    depth = gr.Plot(label="blocks run per sampling step")
                    numbers = gr.JSON(label="numbers")
            inputs = [
                model,
                labels,
                scheduler,
                steps,
                seed,
                guidance,
                acceleration,
                shape,
                min_depth,
                schedule_folder,
                threshold,
            ]
            outputs = [full_image, fast_image, summary, numbers, depth]
            run.click(generate_images, inputs, outputs, api_name="generate_images")
        with gr.Tab("Text"):
            with gr.Row():
                text_model = gr.Dropdown(list(TEXT_MODELS), value=TEXT_MODELS[0], label="model")
                prompt = gr.Textbox(
                    TEXT_EXAMPLES[TEXT_MODELS[0]][0],
                    label="prompt (tiny-mdlm: addition or sorting; tiny-mdlm-puzzles: permutation or digit sum)",
                )
                text_steps = gr.Number(18, precision=None, step=1, label="steps (full decoding)")
            gr.Examples(
                [[model, example] for model, examples in TEXT_EXAMPLES.items() for example in examples],
                [text_model, prompt],
            )
            decode = gr.Button("Decode", variant="primary")
            text_summary = gr.Markdown(elem_id="image-summary")
            fill = gr.Dataframe(label=f"the answer as it filled in ({MASK}: masked, {END}: after the end)")
            text_numbers = gr.JSON(label="numbers")
            decode.click(
                decode_text,
                [text_model, prompt, text_steps],
                [text_summary, text_numbers, fill],
                api_name="decode_text",
            )
        with gr.Tab("Benchmark"):
            bench_file = gr.File(label="a JSON file from `ee-diffusion bench --json`", type="filepath")
            bench_table = gr.Dataframe(label="rows")
            bench_plot = gr.Image(label="quality against speed", type="filepath")
            bench_file.upload(read_bench, [bench_file], [bench_table, bench_plot], api_name="read_bench")
    return demo


def serve(host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, **launch_kwargs: Any) -> gr.Blocks:
    """Build the app and serve it, queued (a long generation does not block another user's page)."""
    demo = build_demo().queue(default_concurrency_limit=2)
    demo.launch(server_name=host, server_port=port, theme=THEME, ssr_mode=False, **launch_kwargs)
    return demo


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        serve(args.host, args.port)
    except OSError as error:  # the port is taken, or the host is not an address of this machine
        parser.error(f"cannot serve on {args.host}:{args.port}: {error}")


if __name__ == "__main__":
    main()
