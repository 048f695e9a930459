"""The decoding methods `dllm-bench` compares, by name, and the call settings each one means.

A method is `NAME[:VALUE][+CACHE[/K]]`:

- `NAME` is one of `METHODS`: `full` (the model's steps), `halfsteps`, `threshold` (Fast-dLLM's parallel rule),
  `prophet`, `sched-linear`, `sched-cosine`, `sched-exp`;
- `VALUE` sets the rule's threshold: the probability for `threshold` (default 0.9); the first (highest) top-2 logit
  gap for `prophet` and `sched-*` (default 7.5, the released Prophet code's), the later thresholds following in
  the same proportion as the defaults (Prophet 7.5 / 5.0 / 2.5, SchED 7.5 falling to 2.5);
- `CACHE` is `prefix` or `dual`: Fast-dLLM's block KV cache (`kv_cache.py`) under the method; `/K` also reruns the
  whole sequence every K steps of a block (`cache_refresh_every=K`).

torch-free to import (the rules are imported when settings are asked for), so the CLI can list `METHODS`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

CACHE_MODES = ("prefix", "dual")  # Fast-dLLM's block KV cache (`kv_cache.py`)
METHODS = ("full", "halfsteps", "threshold", "prophet", "sched-linear", "sched-cosine", "sched-exp")
RULES = ("threshold", "prophet", "sched-linear", "sched-cosine", "sched-exp")  # the methods that take a VALUE
DEFAULT_VALUES = {"threshold": 0.9, "prophet": 7.5, "sched-linear": 7.5, "sched-cosine": 7.5, "sched-exp": 7.5}
# What `dllm-bench --sweep` runs for each rule.
SWEEP_VALUES = {
    "threshold": (0.5, 0.7, 0.8, 0.9, 0.95, 0.99, 0.999),
    **{rule: (1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.5, 10.0, 12.5, 15.0, 20.0) for rule in RULES[1:]},
}
SCHED_EXP_RATE = 4.0


@dataclass(frozen=True)
class Method:
    """A parsed method: `name`, the rule's `value` (None: not a rule), the `cache` mode (None: off) and how often the
    cache is refreshed inside a block (`refresh`, None: at each block's first step only)."""

    name: str
    value: float | None = None
    cache: str | None = None
    refresh: int | None = None

    @property
    def label(self) -> str:
        """The method's canonical spelling (`sched-exp:6+prefix/2`); the default value is left out."""
        value = "" if self.value is None or self.value == DEFAULT_VALUES.get(self.name) else f":{_number(self.value)}"
        refresh = "" if self.refresh is None else f"/{self.refresh}"
        return f"{self.name}{value}{'' if self.cache is None else '+' + self.cache + refresh}"


def _number(value: float) -> str:
    """`value` short (`12.5`, `0.9`) where that reads back as the same float, else in full; never with a `+`, which
    separates the cache in a method spec (`1e06`, not `1e+06`)."""
    text = next(text for text in (f"{value:g}", f"{value:.12g}", f"{value:.17g}") if float(text) == value)
    return text.replace("e+", "e")


def parse_method(spec: str) -> Method:
    """`NAME[:VALUE][+CACHE[/K]]` as a `Method`; a `ValueError` naming what is accepted otherwise."""
    text, _, cache_spec = spec.partition("+")
    name, colon, value = text.partition(":")
    cache, slash, refresh = cache_spec.partition("/")
    accepted = (
        f"NAME[:VALUE][+CACHE[/K]] with NAME one of {METHODS}, VALUE a number for {RULES}, CACHE one of "
        f"{CACHE_MODES}, K a whole number >= 1"
    )
    if name not in METHODS or (cache and cache not in CACHE_MODES) or ("+" in spec and not cache):
        raise ValueError(f"Unknown method {spec!r}; expected {accepted}.")
    if slash and not (refresh.isdigit() and int(refresh) >= 1):
        raise ValueError(f"Bad refresh interval in method {spec!r}; expected {accepted}.")
    number = DEFAULT_VALUES.get(name)
    if colon:
        try:
            number = float(value)
        except ValueError:
            number = None
        if name not in RULES or number is None:
            raise ValueError(f"Bad value in method {spec!r}; expected {accepted}.")
        low_ok = 0 < number <= 1 if name == "threshold" else 0 < number < math.inf
        if not low_ok:
            what = "a probability in (0, 1]" if name == "threshold" else "a finite top-2 logit gap > 0"
            raise ValueError(f"Method {spec!r}: the value must be {what}, got {value}.")
    return Method(name, number, cache or None, int(refresh) if slash else None)


def method_settings(method: str | Method, steps: int) -> dict:
    """Call settings of a method, for a model whose full decoding takes `steps` steps."""
    from .rules import PROPHET_THRESHOLDS, ProphetCommit, SchEDCommit, ThresholdCommit

    method = parse_method(method) if isinstance(method, str) else method
    name, value = method.name, method.value
    settings: dict = {"steps": steps}
    if name == "halfsteps":
        settings["steps"] = max(steps // 2, 1)
    elif name == "threshold":
        settings["parallel"] = ThresholdCommit(value)
    elif name == "prophet":
        scale = value / PROPHET_THRESHOLDS[0]
        settings["early_commit"] = ProphetCommit(thresholds=tuple(t * scale for t in PROPHET_THRESHOLDS))
    elif name.startswith("sched-"):
        shape = name.removeprefix("sched-")
        settings["early_commit"] = SchEDCommit(tau_high=value, tau_low=value / 3, shape=shape, k=SCHED_EXP_RATE)
    if method.cache is not None:
        settings["kv_cache"] = method.cache
    if method.refresh is not None:
        settings["cache_refresh_every"] = method.refresh
    return settings


def sweep_methods(rules: tuple[str, ...] = RULES, cache: str | None = None) -> list[str]:
    """Every `SWEEP_VALUES` setting of each rule, as method specs (with `+cache` when given)."""
    suffix = "" if cache is None else f"+{cache}"
    return [Method(rule, value).label + suffix for rule in rules for value in SWEEP_VALUES[rule]]
