"""The methods `ee-diffusion bench` compares, as they are written: one declaration per kind (`METHOD_KINDS`), from
which the bench's `--help`, its errors and the docs' method list come; each kind's arguments are checked here, before
any model is loaded. How each kind runs is in `ee_diffusion.bench.methods` (which imports torch and diffusers; this
module does not, so `--help` and parsing stay instant).

A method spec is `kind` or `kind:argument`, optionally followed by `@N`: the method at N scheduler steps instead of the
cell's (`baseline@8` in a 10-step cell is the fewer-steps baseline).
"""

from __future__ import annotations

import dataclasses
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


def _parse_deediff(argument: str, spec: str) -> tuple[float | None, str | None, str | None]:
    from ..exits.heads import DECISIONS, POLICIES

    threshold, _, rest = argument.partition(":")
    policy, _, decision = rest.partition(":")
    (threshold,) = _arguments(spec, threshold, _Number("the threshold", float, 0, 1, low_open=True, default=None))
    if policy and policy not in POLICIES:
        raise ValueError(f"Bad method {spec!r}: the policy must be one of {', '.join(POLICIES)}, got {policy!r}.")
    if decision and decision not in DECISIONS:
        raise ValueError(f"Bad method {spec!r}: the decision must be one of {', '.join(DECISIONS)}, got {decision!r}.")
    return threshold, policy or None, decision or None


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


def _window(text: str, spec: str, usage: str, lowest: int = 0) -> tuple[int, int]:
    """A timestep window `<lo>-<hi>` (a timestep t is inside when lo < t < hi), lo >= `lowest` and lo < hi; `usage`:
    how the kind is written, for the message."""
    negative = lowest < 0 and text.startswith("-")
    low_text, dash, high_text = text[negative:].partition("-")
    if not (dash and low_text and high_text):
        raise ValueError(f"Bad method {spec!r}: expected {usage}, got the window {text!r}.")
    low = _Number("the window's low end", int, lowest).parse("-" * negative + low_text, spec)
    high = _Number("the window's high end", int, 0).parse(high_text, spec)
    if low >= high:
        raise ValueError(f"Bad method {spec!r}: the timestep window <lo>-<hi> needs lo < hi, got {low}-{high}.")
    return low, high


def _parse_pab(argument: str, spec: str) -> tuple[int, int, int]:
    skip, _, window = argument.partition(":")
    (skip_range,) = _arguments(spec, skip, _Number("the range (1 recomputes every call)", int, 2, default=2))
    low, high = _window(window or "100-800", spec, "pab[:<range>[:<lo>-<hi>]], e.g. pab:2:100-800")
    return skip_range, low, high


def _parse_seacache(argument: str, spec: str) -> tuple[float, int, int]:
    threshold, skips, order = _arguments(
        spec,
        argument,
        _Number("the threshold", float, 0, low_open=True, default=0.25),
        _Number("the most consecutive cached steps", int, 1, default=2),
        _Number("the residual order", int, 0, high=1, default=1),
    )
    return threshold, skips, order


def _parse_fastercache(argument: str, spec: str) -> tuple[int, tuple[int, int], int]:
    """`(attention range, attention window, unconditional-branch range)`."""
    parts = argument.split(":") if argument else []
    if len(parts) > 3:
        raise ValueError(f"Bad method {spec!r}: at most 3 ':'-separated arguments.")
    parts += [""] * (3 - len(parts))
    attention = _Number("the range (1 recomputes every call)", int, 2, default=2).parse(parts[0], spec)
    usage = "fastercache[:<range>[:<lo>-<hi>[:<cfg>]]], e.g. fastercache:2:-1-681"
    window = _window(parts[1] or "-1-681", spec, usage, lowest=-1)
    unconditional = _Number("the unconditional range (1 computes it every call)", int, 2, default=5).parse(
        parts[2], spec
    )
    return attention, window, unconditional


@dataclass(frozen=True)
class DBCacheArguments:
    """cache-dit's DBCache as a bench method writes it (see `METHOD_KINDS`); `mask`: a predefined step computation
    mask (`slow`, `medium`, `fast`, `ultra`), `static`: masked steps always reuse the cache."""

    threshold: float = 0.08
    fn: int = 1
    bn: int = 0
    warmup: int = 4
    order: int | None = None  # TaylorSeer's order; None: no TaylorSeer
    mask: str | None = None
    static: bool = False


_DBCACHE_NUMBERS = (
    _Number("the threshold", float, 0, low_open=True, default=DBCacheArguments.threshold),
    _Number("Fn (the first blocks always computed)", int, 1, default=DBCacheArguments.fn),
    _Number("Bn (the last blocks always computed)", int, 0, default=DBCacheArguments.bn),
    _Number("the warmup steps", int, 0, default=DBCacheArguments.warmup),
)
MASK_POLICIES = ("slow", "medium", "fast", "ultra")


def _parse_dbcache(argument: str, spec: str, before: int = 0) -> DBCacheArguments:
    """DBCache's arguments; `before`: how many arguments of the spec come ahead of them (for the message)."""
    if argument.count(":") >= len(_DBCACHE_NUMBERS):
        raise ValueError(f"Bad method {spec!r}: at most {before + len(_DBCACHE_NUMBERS)} ':'-separated arguments.")
    threshold, fn, bn, warmup = _arguments(spec, argument, *_DBCACHE_NUMBERS)
    return DBCacheArguments(threshold, fn, bn, warmup)


def _parse_dbcache_taylorseer(argument: str, spec: str) -> DBCacheArguments:
    order, _, rest = argument.partition(":")
    (order,) = _arguments(spec, order, _Number("the TaylorSeer order", int, 1, default=1))
    return dataclasses.replace(_parse_dbcache(rest, spec, before=1), order=order)


def _parse_dbcache_scm(argument: str, spec: str) -> DBCacheArguments:
    mask, _, rest = argument.partition(":")
    policy, static = mask.removesuffix("-static") or "medium", mask.endswith("-static")
    if policy not in MASK_POLICIES:
        accepted = ", ".join(f"{name}[-static]" for name in MASK_POLICIES)
        raise ValueError(f"Bad method {spec!r}: the mask must be one of {accepted}, got {mask!r}.")
    if static and rest.partition(":")[0]:
        raise ValueError(
            f"Bad method {spec!r}: a -static mask reuses the cache on every masked step and has no threshold; leave "
            f"it empty (dbcache-scm:{mask}::<Fn>...)."
        )
    return dataclasses.replace(_parse_dbcache(rest, spec, before=1), mask=policy, static=static)


def _parse_deepcache(argument: str, spec: str) -> tuple[int, int]:
    interval, branch = _arguments(
        spec,
        argument,
        _Number("the interval (1 computes every step)", int, 2, default=3),
        _Number("the branch", int, 0, default=0),
    )
    return interval, branch


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
        "deediff[:<threshold>[:<policy>[:<decision>]]]",
        "DeeDiff uncertainty exits with the model's exit heads (train-uem), threshold in (0, 1] (default: the "
        "heads'), per_batch or per_sample, decided from the previous step (previous_step: no host read inside a call) "
        "or at each block (per_block, DeeDiff's released rule); defaults: the heads' own rule",
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
    "seacache": MethodKind(
        "seacache[:<threshold>[:<skips>[:<order>]]]",
        "diffusers SeaCache, threshold > 0, at most skips >= 1 cached steps in a row, residual order 0 or 1 "
        "(default 0.25:2:1)",
        _parse_seacache,
        None,
    ),
    "fastercache": MethodKind(
        "fastercache[:<range>[:<lo>-<hi>[:<cfg>]]]",
        "diffusers FasterCache: attention every range >= 2 calls in the timestep window lo < hi (lo >= -1), the "
        "unconditional branch every cfg >= 2 (under guidance; default 2:-1-681:5)",
        _parse_fastercache,
        None,
    ),
    "dbcache": MethodKind(
        "dbcache[:<threshold>[:<Fn>[:<Bn>[:<warmup>]]]]",
        "cache-dit DBCache, threshold > 0, Fn >= 1 and Bn >= 0 blocks always computed, warmup >= 0 steps "
        "(default 0.08:1:0:4; the peers extra)",
        _parse_dbcache,
        None,
    ),
    "dbcache-taylorseer": MethodKind(
        "dbcache-taylorseer[:<order>[:<dbcache args>]]",
        "cache-dit DBCache with its TaylorSeer calibrator of order >= 1 (default 1), then dbcache's arguments",
        _parse_dbcache_taylorseer,
        None,
    ),
    "dbcache-scm": MethodKind(
        "dbcache-scm[:<mask>[:<dbcache args>]]",
        "cache-dit DBCache under its step computation mask slow, medium (default), fast or ultra (-static: "
        "reuse on every masked step), then dbcache's arguments",
        _parse_dbcache_scm,
        None,
    ),
    "deepcache": MethodKind(
        "deepcache[:<interval>[:<branch>]]",
        "DeepCache on a U-Net: the deep branches cached, recomputed every interval >= 2 steps, skip branch >= 0 "
        "(default 3:0; the peers extra)",
        _parse_deepcache,
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
