"""The methods `ee-diffusion bench` compares, as they are written: one declaration per kind (`METHOD_KINDS`), from
which the bench's `--help`, its errors and the docs' method list come; each kind's arguments are checked here, before
any model is loaded. How each kind runs is in `ee_diffusion.bench.methods` (which imports torch and diffusers; this
module does not, so `--help` and parsing stay instant).

A method spec is `kind` or `kind:argument`, optionally followed by `@N`: the method at N scheduler steps instead of the
cell's (`baseline@8` in a 10-step cell is the fewer-steps baseline).
"""

from __future__ import annotations

import math
import re
import textwrap
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Kinds whose argument is a comma-separated list, and what an item of such a list looks like (`12`, `0.5`, `8@10`).
_LISTS = ("ase:step:", "layerskip:")
_LIST_ITEM = re.compile(r"-?[0-9.]+(@[0-9]+)?")


def _no_argument(argument: str, spec: str) -> None:
    return None


def _parse_ase(argument: str, spec: str) -> str:
    from ..schedules import ExitSchedule

    ExitSchedule.check_spec(argument)
    return argument


def _parse_finetuned(argument: str, spec: str) -> tuple[str, str]:
    """`(model, schedule)`: the model checked to exist, the schedule (`""`: the model's own) checked, a folder also
    found inside the model's folder (the plans shipped in `digits-dit-ase/plans/`)."""
    from ..pipelines.loading import resolve_pretrained
    from ..schedules import ExitSchedule

    model, _, schedule = argument.partition(":")
    folder = Path(resolve_pretrained(model))
    if schedule and not Path(schedule).exists() and (folder / schedule).is_dir():
        schedule = str(folder / schedule)
    if schedule and (folder.is_dir() or Path(schedule).exists()):  # a hub model's own folders are not here to check
        ExitSchedule.check_spec(schedule)
    return model, schedule


def _parse_deediff(argument: str, spec: str) -> tuple[float | None, str | None]:
    from ..exits.heads import POLICIES

    threshold, _, policy = argument.partition(":")
    (threshold,) = _arguments(spec, threshold, _Number("the threshold", float, 0, 1, low_open=True, default=None))
    if policy and policy not in POLICIES:
        raise ValueError(f"Bad method {spec!r}: the policy must be one of {', '.join(POLICIES)}, got {policy!r}.")
    return threshold, policy or None


@dataclass(frozen=True)
class _Number:
    """One `:`-separated argument of a method: its name in messages, its type, its range and its default."""

    name: str
    kind: type  # int or float
    low: float
    high: float | None = None
    low_open: bool = False
    default: Any = None

    def parse(self, text: str, spec: str) -> Any:
        if not text:
            return self.default
        try:
            value = self.kind(text)
        except ValueError:
            value = None
        too_low = value is not None and (value <= self.low if self.low_open else value < self.low)
        too_high = value is not None and self.high is not None and value > self.high
        if value is None or not math.isfinite(value) or too_low or too_high:
            kind = "an integer" if self.kind is int else "a finite number"
            bounds = f"{'>' if self.low_open else '>='} {self.low:g}" + (
                "" if self.high is None else f" and <= {self.high:g}"
            )
            raise ValueError(f"Bad method {spec!r}: {self.name} must be {kind} {bounds}, got {text!r}.")
        return value


def _arguments(spec: str, argument: str, *numbers: _Number) -> list[Any]:
    """The `:`-separated `argument` of `spec` as `numbers` say, missing trailing ones at their defaults."""
    parts = argument.split(":") if argument else []
    if len(parts) > len(numbers):
        raise ValueError(f"Bad method {spec!r}: at most {len(numbers)} ':'-separated arguments.")
    return [number.parse(part, spec) for number, part in zip(numbers, parts + [""] * (len(numbers) - len(parts)))]


def _parse_fbcache(argument: str, spec: str) -> float:
    (threshold,) = _arguments(spec, argument, _Number("the threshold", float, 0, low_open=True, default=0.05))
    return threshold


def _parse_layerskip(argument: str, spec: str) -> list[int] | None:
    if not argument:
        return None
    index = _Number("a block index", int, 0)
    indices = [index.parse(part, spec) for part in argument.split(",")]
    if len(set(indices)) != len(indices):
        raise ValueError(f"Bad method {spec!r}: the block indices must be distinct, got {argument}.")
    return indices


def _parse_taylorseer(argument: str, spec: str) -> tuple[int, int]:
    interval, order = _arguments(
        spec,
        argument,
        _Number("the interval (1 computes every step)", int, 2, default=5),
        _Number("the order", int, 0, default=1),
    )
    return interval, order


def _parse_magcache(argument: str, spec: str) -> tuple[float, int]:
    threshold, max_skips = _arguments(
        spec,
        argument,
        _Number("the threshold", float, 0, low_open=True, default=0.06),
        _Number("the most consecutive skips", int, 1, default=3),
    )
    return threshold, max_skips


def _parse_pab(argument: str, spec: str) -> tuple[int, int, int]:
    skip, _, window = argument.partition(":")
    (skip_range,) = _arguments(spec, skip, _Number("the range (1 recomputes every call)", int, 2, default=2))
    low_text, dash, high_text = (window or "100-800").partition("-")
    if not dash:
        raise ValueError(f"Bad method {spec!r}: expected pab[:<range>[:<lo>-<hi>]], e.g. pab:2:100-800.")
    low = _Number("the window's low end", int, 0).parse(low_text, spec)
    high = _Number("the window's high end", int, 0).parse(high_text, spec)
    if low >= high:
        raise ValueError(f"Bad method {spec!r}: the timestep window <lo>-<hi> needs lo < hi, got {low}-{high}.")
    return skip_range, low, high


@dataclass(frozen=True)
class MethodKind:
    """A kind of method: how it is written, what it does (one line, for `--help` and the docs), and how its argument
    is checked before any model is loaded (`parse(argument, spec)`: what the method is built from, or a `ValueError`
    naming the spec)."""

    syntax: str
    summary: str
    parse: Callable[[str, str], Any]
    needs_argument: bool | None  # True: required, False: none, None: optional


METHOD_KINDS: dict[str, MethodKind] = {
    "baseline": MethodKind("baseline", "the model at full depth", _no_argument, False),
    "ase": MethodKind(
        "ase:<schedule>",
        "an exit schedule: linear:M, cosine:M, constant:M, step:d1,d2,... or a schedule or plan folder",
        _parse_ase,
        True,
    ),
    "finetuned": MethodKind(
        "finetuned:<model>[:<schedule>]",
        "another model (ASE fine-tuned) under its own saved "
        "schedule, or under this one (a folder may be inside the model's)",
        _parse_finetuned,
        True,
    ),
    "deediff": MethodKind(
        "deediff[:<threshold>[:<policy>]]",
        "DeeDiff uncertainty exits with the model's exit heads "
        "(train-uem), threshold in (0, 1] (default: the heads'), per_batch (default) or per_sample",
        _parse_deediff,
        None,
    ),
    "fbcache": MethodKind(
        "fbcache[:<threshold>]", "diffusers FirstBlockCache, threshold > 0 (default 0.05)", _parse_fbcache, None
    ),
    "layerskip": MethodKind(
        "layerskip[:<i,j,...>]",
        "diffusers LayerSkip of these 0-based blocks (default: the middle block)",
        _parse_layerskip,
        None,
    ),
    "taylorseer": MethodKind(
        "taylorseer[:<interval>[:<order>]]",
        "diffusers TaylorSeer cache, interval >= 2, order >= 0 (default 5:1)",
        _parse_taylorseer,
        None,
    ),
    "magcache": MethodKind(
        "magcache[:<threshold>[:<skips>]]",
        "diffusers MagCache, threshold > 0, skips >= 1 (default 0.06:3), ratios calibrated on the model",
        _parse_magcache,
        None,
    ),
    "pab": MethodKind(
        "pab[:<range>[:<lo>-<hi>]]",
        "diffusers PyramidAttentionBroadcast, range >= 2, timestep window lo < hi (default 2:100-800)",
        _parse_pab,
        None,
    ),
}


STEPS_SUFFIX_HELP = (
    "<method>@N",
    "that method at N scheduler steps instead of the cell's (baseline@8: fewer steps, "
    "timed beside the rest); its blocks count against the cell's steps",
)


def method_syntax() -> str:
    return ", ".join(kind.syntax for kind in METHOD_KINDS.values())


def methods_help(width: int = 119) -> str:
    """The method list of `ee-diffusion bench --help`, from `METHOD_KINDS`."""
    column = max(len(kind.syntax) for kind in METHOD_KINDS.values()) + 4
    lines = []
    for syntax, summary in [*((kind.syntax, kind.summary) for kind in METHOD_KINDS.values()), STEPS_SUFFIX_HELP]:
        wrapped = textwrap.wrap(summary, width - column - 2) or [""]
        lines.append(f"  {syntax:<{column - 2}}{wrapped[0]}")
        lines.extend(" " * column + line for line in wrapped[1:])
    return "\n".join(lines)


def _steps_suffix(spec: str) -> tuple[str, int | None]:
    """`spec` without its `@N` suffix, and N (`None` without one)."""
    head, at, count = spec.rpartition("@")
    if not at or not count.isdigit():
        return spec, None
    if int(count) < 1:
        raise ValueError(f"Bad method {spec!r}: `@N` needs N >= 1 scheduler steps, got {count}.")
    return head, int(count)


def kind_of(spec: str) -> tuple[str, str, int | None]:
    """The kind of `spec` (a key of `METHOD_KINDS`), its argument and its `@N` step count (`None` without one)."""
    body, steps = _steps_suffix(spec)
    kind, _, argument = body.partition(":")
    entry = METHOD_KINDS.get(kind)
    if (
        entry is None
        or (entry.needs_argument is True and not argument)
        or (entry.needs_argument is False and argument)
    ):
        raise ValueError(f"Unknown method {spec!r}; accepted kinds: {method_syntax()}, each optionally with @N.")
    return kind, argument, steps


def check_method(spec: str) -> None:
    """Raise a `ValueError` unless `spec` is a method whose arguments are in range (no model is loaded)."""
    kind, argument, _ = kind_of(spec)
    METHOD_KINDS[kind].parse(argument, spec)


def default_methods(model: str, steps: list[int], scheduler: list[str]) -> list[str]:
    """The fair front at the bench's step count: the baseline, the baseline at 80% of the steps (with one step count),
    FirstBlockCache at 0.15 (on `digits-dit` the strongest diffusers cache at 8-10 steps, see `ee-diffusion sweep`);
    then, when the model has a shipped ASE fine-tuned sibling, that model under its schedule at both step counts and
    under the plan shipped in its folder for this scheduler and step count (`plans/<scheduler>-<steps>`), and without
    a sibling, the model under `linear:0.5`."""
    from ..shipped import shipped_model_path

    fewer = round(0.8 * steps[0]) if len(steps) == 1 else 0
    at_fewer = [f"@{fewer}"] if 1 <= fewer < steps[0] else []
    plain = ["baseline", *(f"baseline{at}" for at in at_fewer), "fbcache:0.15"]
    sibling = f"{model}-ase"
    if shipped_model_path(sibling) is None:
        return [*plain, "ase:linear:0.5"]
    ours = [f"finetuned:{sibling}", *(f"finetuned:{sibling}{at}" for at in at_fewer)]
    plan = f"plans/{scheduler[0]}-{steps[0]}"  # a plan is made for one scheduler and step count: one cell only
    if len(steps) == len(scheduler) == 1 and (shipped_model_path(sibling) / plan).is_dir():
        ours.append(f"finetuned:{sibling}:{plan}")
    return [*plain, *ours]


def parse_methods(text: str) -> list[str]:
    """Split a `--methods` string on the commas that start a new method (a comma followed by a number continues a
    list: `ase:step:12,8,4`, `layerskip:3,7`), and check each method (a `ValueError` for an empty list, a repeated
    method, or a bad one)."""
    methods: list[str] = []
    for piece in text.split(","):
        continues = methods and methods[-1].startswith(_LISTS) and _LIST_ITEM.fullmatch(piece)
        if continues:
            methods[-1] += "," + piece
        else:
            methods.append(piece)
    if not text.strip():
        raise ValueError("Give at least one method.")
    for spec in methods:
        check_method(spec)
    repeated = sorted({spec for spec in methods if methods.count(spec) > 1})
    if repeated:
        raise ValueError(f"Each method once, got {', '.join(repeated)} more than once.")
    return methods
