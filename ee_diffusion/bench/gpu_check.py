"""`make gpu-check`'s per-call measurements, and the one JSON file the check writes.

`measure_calls` times one denoiser call (the bench's `random:dit-xl-2` by default: a DiT-XL/2-shaped model with random
weights, which run the same kernels as trained ones) in five forms, each its own copy of the model, interleaved round
by round with rotating order (`ee_diffusion.metrics.time_interleaved`: untimed warm-up rounds first, the device
synchronised before each clock read):

- `eager`: the model as it is;
- `deediff_previous_step` and `deediff_per_block`: DeeDiff's uncertainty exits (`apply_uncertainty_exit`) with exit
  heads at every block (random weights) and threshold 0, which never exits, so the calls run every block and the
  difference to `eager` is the cost of the hooks and heads; decided from the previous call's uncertainties (the
  default, no host read) or at each exit point (a host read per point);
- `compiled_blocks`: the model compiled block by block, as `ee-diffusion bench --compile` compiles it
  (`ee_diffusion.bench.harness.compile_blocks`);
- `compiled_transformer`: `torch.compile` of the whole model.

Each form's `host_syncs` is the number of operations of one call (after the timed rounds) that make the host wait for
the device, counted with `torch.cuda.set_sync_debug_mode("warn")`, which warns at each; `None` on the CPU, where
nothing waits.

`python -m ee_diffusion.bench.gpu_check OUT.json [BENCH.json ...]` (CUDA only) measures these on the GPU and writes
them to OUT.json with the device's name, the torch and diffusers versions, the date and the rows of the
`ee-diffusion bench --json` files given (`scripts/gpu-check.sh` runs the whole check).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import platform
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import diffusers
import torch

from ..exits import ExitHeads, apply_uncertainty_exit, num_exit_blocks
from ..metrics import time_interleaved
from ..outputs import check_output_file, staged_file
from .harness import RANDOM_MODELS, BenchConfig, compile_blocks, load_pipe

FORMS = ("eager", "deediff_previous_step", "deediff_per_block", "compiled_blocks", "compiled_transformer")


def measure_calls(
    model: str = "random:dit-xl-2",
    device: str = "cuda",
    dtype: str = "bfloat16",
    batch_size: int = 64,
    repeats: int = 20,
    warmup: int = 3,
    backend: str = "inductor",
) -> dict[str, Any]:
    """Time one denoiser call of `model` in each of `FORMS` (see the module docstring).

    Args:
        model: A `random:` model of the bench (`RANDOM_MODELS`).
        device: Torch device.
        dtype: `float32`, `float16` or `bfloat16`.
        batch_size: Latents per call.
        repeats: Timed rounds; each form's median is reported.
        warmup: Untimed rounds first (the compiled forms compile in the first).
        backend: `torch.compile`'s backend for the compiled forms (`"aot_eager"` compiles without generating kernels:
            quicker, for tests).

    Returns:
        The settings, the seconds the measurement took, and per form its median milliseconds per call, the spread of
        the rounds (interquartile range over median) and its host synchronisations per call.
    """
    if not model.startswith("random:") or model.removeprefix("random:") not in RANDOM_MODELS:
        raise ValueError(f"`model` must be one of {['random:' + name for name in RANDOM_MODELS]}, got {model!r}.")
    start = time.perf_counter()
    place = torch.device(device)
    config = BenchConfig(model=model, device=device, dtype=dtype)
    eager = load_pipe(model, config, place).transformer
    calls = {form: _form(form, eager, backend) for form in FORMS}
    generator = torch.Generator().manual_seed(0)
    size, channels = eager.config.sample_size, eager.config.in_channels
    latents = torch.randn((batch_size, channels, size, size), generator=generator).to(place, eager.dtype)
    labels = torch.randint(0, eager.config.num_embeds_ada_norm, (batch_size,), generator=generator)
    inputs = {"timestep": torch.full((batch_size,), 500, device=place), "class_labels": labels.to(place)}

    def runner(call: Callable) -> Callable[[], None]:
        return lambda: call(latents, **inputs)

    with torch.no_grad():
        timings = time_interleaved(
            {form: runner(call) for form, call in calls.items()}, repeats=repeats, warmup=warmup, device=place
        )
        syncs = {form: _host_syncs(runner(call), place) for form, call in calls.items()}
    return {
        "model": model,
        "dtype": dtype,
        "batch_size": batch_size,
        "repeats": repeats,
        "warmup": warmup,
        "backend": backend,
        "seconds": time.perf_counter() - start,
        "forms": {
            form: {"median_ms": 1000 * timing.median, "spread": timing.spread, "host_syncs": syncs[form]}
            for form, timing in timings.items()
        },
    }


def _form(form: str, eager: torch.nn.Module, backend: str) -> Callable[..., Any]:
    """The model of one form, a copy of `eager` (the eager form itself for `eager`), as a callable."""
    if form == "eager":
        return eager
    model = copy.deepcopy(eager)
    if form == "compiled_transformer":
        return torch.compile(model, backend=backend)
    if form == "compiled_blocks":
        compile_blocks(model, backend=backend)
        return model
    decision = form.removeprefix("deediff_")
    width = model.config.num_attention_heads * model.config.attention_head_dim
    heads = ExitHeads(num_exit_blocks(model), width, threshold=0.0, decision=decision)
    apply_uncertainty_exit(model, torch.nn.Module.to(heads, model.device, model.dtype))  # torch's cast: no notice
    return model


def _host_syncs(call: Callable[[], None], device: torch.device) -> int | None:
    """The host synchronisations of one `call` on a CUDA device (`None` elsewhere)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            call()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchronizing" in str(warning.message) for warning in caught)


def report(calls: dict[str, Any], bench_files: list[str]) -> dict[str, Any]:
    """The check's JSON: where it ran, the per-call measurements, and the rows of each bench JSON file (by name)."""
    cuda = torch.cuda.is_available()
    return {
        "device": torch.cuda.get_device_name() if cuda else platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "diffusers": diffusers.__version__,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "calls": calls,
        "bench": {Path(path).stem: json.loads(Path(path).read_text()) for path in bench_files},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ee_diffusion.bench.gpu_check",
        description="Time one call of a DiT-XL/2-shaped denoiser (eager, DeeDiff hooks, compiled) on a CUDA device "
        "and write it, with the rows of the given bench JSON files, to one JSON file.",
    )
    parser.add_argument("out", help="the JSON file to write (an existing one is refused)")
    parser.add_argument("bench", nargs="*", help="`ee-diffusion bench --json` files whose rows the JSON includes")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print(
            "gpu-check measures on a CUDA device, and torch sees none (torch.cuda.is_available() is False): run it on "
            "a machine with an NVIDIA GPU and a CUDA build of torch.",
            file=sys.stderr,
        )
        return 2
    try:
        check_output_file(args.out)
        missing = [path for path in args.bench if not Path(path).is_file()]
        if missing:
            raise FileNotFoundError(f"No bench JSON file at {', '.join(missing)}.")
    except (ValueError, FileNotFoundError) as error:
        print(f"gpu-check: error: {error}", file=sys.stderr)
        return 2
    result = report(measure_calls(), args.bench)
    with staged_file(args.out) as staged:
        staged.write_text(json.dumps(result, indent=2))
    for form, row in result["calls"]["forms"].items():
        print(f"{form:<24}{row['median_ms']:>9.2f} ms{row['spread']:>8.1%}  host syncs: {row['host_syncs']}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
