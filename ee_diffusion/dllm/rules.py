"""When to stop refining: the early-commit rules (Prophet, SchED) and the Fast-dLLM-style threshold rule.

An early-commit rule is a small function of `(logits, positions, progress)`:

- `logits` `(batch, length, vocab)`: the denoiser's raw logits at this step;
- `positions` `(batch, length)` bool: the generated span (the answer, every block of it);
- `progress` in `(0, 1]`: this step's place in the step schedule (counting from 1) over the step budget.

It returns a `(batch,)` bool tensor: which rows commit *every* still-masked token, future blocks included, to its
argmax now and stop refining. The confidence both rules use is the gap between the top-1 and top-2 raw logits.

A rule that also needs the current tokens (`ProphetCommit` with a `marker`) takes them as a `tokens` keyword,
`(batch, length)` with the mask token where nothing is committed yet; the sampler passes `tokens` only to rules whose
signature has it (as diffusers passes optional arguments to a scheduler's `step`).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ..validation import as_int, as_number

SCHED_SHAPES = ("linear", "cosine", "exp")
PROPHET_THRESHOLDS = (7.5, 5.0, 2.5)  # the released code's (pixeli99/Prophet); the paper states 8.0 / 5.0 / 3.5


def top2_margin(logits: torch.Tensor) -> torch.Tensor:
    """Top-1 minus top-2 logit, over the last dimension."""
    top2 = logits.float().topk(2, dim=-1).values
    return top2[..., 0] - top2[..., 1]


def mean_margin(logits: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Per row, the mean top-1 minus top-2 logit gap over `positions` (`(batch, length)` bool)."""
    weights = positions.float()
    return (top2_margin(logits) * weights).sum(-1) / weights.sum(-1).clamp(min=1.0)


def prophet_threshold(
    progress: float, thresholds: tuple[float, ...] = PROPHET_THRESHOLDS, boundaries: tuple[float, ...] = (0.33, 0.67)
) -> float:
    """Prophet's staged threshold: `thresholds[i]` while `progress < boundaries[i]`, the last one after."""
    for threshold, boundary in zip(thresholds, boundaries):
        if progress < boundary:
            return threshold
    return thresholds[-1]


def sched_threshold(progress: float, tau_high: float, tau_low: float, shape: str = "linear", k: float = 4.0) -> float:
    """SchED's smooth, non-increasing threshold `tau(p)` from `tau_high` at `p = 0` towards `tau_low`.

    linear `tau_high + (tau_low - tau_high) p`; cosine `tau_low + (tau_high - tau_low) (1 + cos(pi p)) / 2`;
    exp `tau_low + (tau_high - tau_low) exp(-k p)` (which reaches `tau_low` only as `k p` grows).
    """
    p = min(max(progress, 0.0), 1.0)
    if shape == "linear":
        return tau_high + (tau_low - tau_high) * p
    if shape == "cosine":
        return tau_low + (tau_high - tau_low) * (1.0 + math.cos(math.pi * p)) / 2.0
    if shape == "exp":
        return tau_low + (tau_high - tau_low) * math.exp(-k * p)
    raise ValueError(f"Unknown SchED shape {shape!r}; expected one of {SCHED_SHAPES}.")


def answer_window(
    positions: torch.Tensor, start: int, size: int | None, after: torch.LongTensor | None = None
) -> torch.Tensor:
    """The `size` positions of the span `positions` that follow its first `start` ones (the whole rest if None).

    With `after` `(batch,)`, the span is counted from index `after` of each row on (the positions before it are not
    part of it).
    """
    if after is not None:
        positions = positions & (torch.arange(positions.shape[-1], device=positions.device) >= after[:, None])
    index = positions.long().cumsum(-1) - 1
    window = positions & (index >= start)
    return window if size is None else window & (index < start + size)


def marker_end(tokens: torch.LongTensor, positions: torch.Tensor, marker: tuple[int, ...]) -> torch.LongTensor:
    """Per row, the index right after the last occurrence of the token sequence `marker` inside the span
    `positions`; -1 where the span holds none."""
    length = len(marker)
    if tokens.shape[-1] < length:
        return torch.full(tokens.shape[:1], -1, dtype=torch.long, device=tokens.device)
    target = torch.tensor(marker, dtype=tokens.dtype, device=tokens.device)
    hits = (tokens.unfold(-1, length, 1) == target).all(-1) & positions.unfold(-1, length, 1).all(-1)
    last = hits.shape[-1] - 1 - hits.flip(-1).long().argmax(-1)
    return torch.where(hits.any(-1), last + length, -1)


@dataclass(frozen=True)
class ProphetCommit:
    """Prophet ("Diffusion Language Models Know the Answer Before Decoding"): commit everything once the mean
    top-2 logit gap over the answer window reaches the threshold of the current progress stage.

    The defaults are the released code's (github `pixeli99/Prophet`, `generate_earlyexit.py` and `eval_llada.py`):
    thresholds 7.5 / 5.0 / 2.5 changing at 33 % and 67 % of the steps, a 5-token window. The paper states 8.0 / 5.0 /
    3.5; pass `thresholds=(8.0, 5.0, 3.5)` for those. The released evaluation forces "The answer is" into the answer
    and starts the window one token after it; `marker=<ids of "The answer is">, answer_start=1` does the same for an
    answer that holds the marker (forced or written by the model).

    Args:
        thresholds: Gap thresholds of the stages.
        boundaries: Progress values where the stages change.
        answer_start: Offset of the answer window: from the start of the generated span, or, with `marker`, from
            the position right after the marker.
        window: Length of the answer window (the released code averages over 5 tokens); None: the rest of the span.
        marker: Token ids (a non-empty sequence) the window follows: it starts `answer_start` positions after the
            marker's last occurrence among the span's committed tokens. A row whose span holds no marker yet (or
            nothing after it) does not fire. None: the window is placed by `answer_start` alone.
    """

    thresholds: tuple[float, ...] = PROPHET_THRESHOLDS
    boundaries: tuple[float, ...] = (0.33, 0.67)
    answer_start: int = 0
    window: int | None = 5
    marker: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "thresholds", _numbers("thresholds", self.thresholds, low=0))
        object.__setattr__(self, "boundaries", _numbers("boundaries", self.boundaries, low=0))
        if any(boundary >= 1 for boundary in self.boundaries):
            raise ValueError(f"`boundaries` are progress values in (0, 1), got {self.boundaries}.")
        if len(self.thresholds) != len(self.boundaries) + 1:
            raise ValueError(
                f"Need one more threshold than boundaries, got thresholds={self.thresholds}, "
                f"boundaries={self.boundaries}."
            )
        if any(b <= a for a, b in zip(self.boundaries, self.boundaries[1:])):
            raise ValueError(f"`boundaries` must be increasing, got {self.boundaries}.")
        as_int("answer_start", self.answer_start, low=0)
        if self.window is not None:
            as_int("window", self.window, low=1)
        if self.marker is not None:
            if isinstance(self.marker, (str, bytes)) or not hasattr(self.marker, "__iter__"):
                raise TypeError(f"`marker` must be None or a sequence of token ids, got {self.marker!r}.")
            marker = tuple(as_int(f"marker[{i}]", token, low=0) for i, token in enumerate(self.marker))
            if not marker:
                raise ValueError("`marker` must hold at least one token id, got an empty sequence.")
            object.__setattr__(self, "marker", marker)

    def __call__(
        self, logits: torch.Tensor, positions: torch.Tensor, progress: float, tokens: torch.LongTensor | None = None
    ) -> torch.Tensor:
        threshold = prophet_threshold(progress, self.thresholds, self.boundaries)
        if self.marker is None:  # a window past the span's end holds nothing to judge, and never fires
            window = answer_window(positions, self.answer_start, self.window)
            return window.any(-1) & (mean_margin(logits, window) >= threshold)
        if tokens is None:
            raise ValueError(f"ProphetCommit(marker={self.marker}) needs the current `tokens` to find its marker.")
        after = marker_end(tokens, positions, self.marker)
        window = answer_window(positions, self.answer_start, self.window, after.clamp(min=0))
        return (after >= 0) & window.any(-1) & (mean_margin(logits, window) >= threshold)


@dataclass(frozen=True)
class SchEDCommit:
    """SchED ("Fast-Decoding Diffusion LLMs via Progress-Aware Confidence Schedules"): commit everything once the
    mean top-2 logit gap over the whole generated span reaches a smooth threshold `tau(progress)`.

    Args:
        tau_high: Threshold at the start (`p = 0`).
        tau_low: Threshold the schedule falls to (reached at `p = 1` for linear and cosine).
        shape: `"linear"`, `"cosine"` or `"exp"`.
        k: Rate of the exponential shape (the paper tries 2, 4, 8, 16).
    """

    tau_high: float = 7.5
    tau_low: float = 2.5
    shape: str = "linear"
    k: float = 4.0

    def __post_init__(self) -> None:
        if self.shape not in SCHED_SHAPES:
            raise ValueError(f"Unknown SchED shape {self.shape!r}; expected one of {SCHED_SHAPES}.")
        for name in ("tau_high", "tau_low", "k"):
            object.__setattr__(self, name, as_number(name, getattr(self, name)))
        if self.tau_low > self.tau_high or self.k <= 0:
            raise ValueError(f"Need tau_low <= tau_high and k > 0, got {self.tau_low}, {self.tau_high}, k={self.k}.")

    def __call__(self, logits: torch.Tensor, positions: torch.Tensor, progress: float) -> torch.Tensor:
        threshold = sched_threshold(progress, self.tau_high, self.tau_low, self.shape, self.k)
        return mean_margin(logits, positions) >= threshold


@dataclass(frozen=True)
class ThresholdCommit:
    """Fast-dLLM's parallel rule: each step commits every masked token of the block whose probability is at least
    `threshold`, and never fewer than the step's even share. Composes with either early-commit rule.

    With as many steps as positions (the shipped models' default) the even share is one token, and the rule is the
    released code's (`NVlabs/Fast-dLLM`, `get_transfer_index`: at least one token per step, `>=` the threshold). With
    fewer steps per block the released code commits at least one token and takes as many steps as the block needs;
    this rule's even share keeps the run within its step budget. The released code takes the softmax in float64: the
    sampler's `confidence_dtype="float64"` does the same (its default is the logits' dtype, as LLaDA's `generate()`).

    Args:
        threshold: Probability at or above which a token is committed.
    """

    threshold: float = 0.9

    def __post_init__(self) -> None:
        object.__setattr__(self, "threshold", as_number("threshold", self.threshold))
        if not 0.0 < self.threshold <= 1.0:
            raise ValueError(f"`threshold` must be in (0, 1], got {self.threshold}.")

    def num_tokens(self, confidence: torch.Tensor, masked: torch.Tensor, scheduled: torch.Tensor) -> torch.Tensor:
        """How many tokens each row commits: `max(scheduled, #{masked with confidence >= threshold})`."""
        return torch.maximum(scheduled, ((confidence >= self.threshold) & masked).sum(-1))


EarlyCommit = Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]


def _numbers(name: str, values: Any, low: float) -> tuple[float, ...]:
    """A sequence argument of finite numbers >= `low`, as a tuple of floats (else an error naming it)."""
    if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
        raise TypeError(f"`{name}` must be a sequence of numbers, got {values!r}.")
    return tuple(as_number(f"{name}[{i}]", value, low=low) for i, value in enumerate(values))


def accepts_tokens(rule: EarlyCommit) -> bool:
    """Whether the rule takes the current tokens (a `tokens` keyword)."""
    return "tokens" in inspect.signature(rule).parameters


def resolve_early_commit(early_commit: EarlyCommit | str | None) -> EarlyCommit | None:
    """`None`, a rule (any callable of `(logits, positions, progress)`), or `"prophet"` / `"sched"` for the rule
    with its defaults."""
    if early_commit is None or callable(early_commit):
        return early_commit
    if early_commit == "prophet":
        return ProphetCommit()
    if early_commit == "sched":
        return SchEDCommit()
    raise TypeError(
        f"`early_commit` must be None, 'prophet', 'sched' or a rule such as ProphetCommit() or SchEDCommit(); "
        f"got {early_commit!r}."
    )
