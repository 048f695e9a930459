"""Wall-clock timing that stays trustworthy on a noisy machine: warm-up, interleaved repeats, medians."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Timing:
    """Seconds per run of one method: every repeat (in round order), their median and their spread."""

    seconds: tuple[float, ...]

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def spread(self) -> float:
        """The interquartile range of the repeats over their median (0 for a single repeat): how far the repeats
        disagree. Above 0.1 the machine was too busy, or the runs too short, for the median to be trusted."""
        if len(self.seconds) < 2:
            return 0.0
        low, _, high = statistics.quantiles(self.seconds, n=4, method="inclusive")
        return (high - low) / self.median


def round_speedups(baseline: Timing, other: Timing) -> list[float]:
    """`baseline / other` seconds round by round of `time_interleaved`: each ratio compares two runs made next to each
    other in time, so a slow spell of the machine cancels out of it. Their median is the speedup to report."""
    if len(baseline.seconds) != len(other.seconds):
        raise ValueError(f"Paired timings need the same rounds, got {len(baseline.seconds)} and {len(other.seconds)}.")
    return [b / o for b, o in zip(baseline.seconds, other.seconds)]


def _synchronize(device: torch.device | str | None) -> None:
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(
    runs: Mapping[str, Callable[[], object]],
    repeats: int = 5,
    warmup: int = 1,
    device: torch.device | str | None = None,
) -> dict[str, Timing]:
    """Time several methods side by side: every round runs each method once, so drifts hit all alike, and the
    order rotates from round to round, so no method always runs first (or always last).

    Args:
        runs: Method name to a callable doing one full run.
        repeats: Timed rounds; the median is reported.
        warmup: Untimed rounds first (allocator, caches, lazy initialisation).
        device: Synchronised before and after each run when it is a CUDA device.
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"Need repeats >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}.")
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    names = list(runs)
    for round_index in range(warmup + repeats):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            run = runs[name]
            _synchronize(device)
            start = time.perf_counter()
            run()
            _synchronize(device)
            if round_index >= warmup:
                seconds[name].append(time.perf_counter() - start)
    return {name: Timing(tuple(values)) for name, values in seconds.items()}
