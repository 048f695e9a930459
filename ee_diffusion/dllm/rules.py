"""When to stop refining: the early-commit rules (Prophet, SchED) and the Fast-dLLM-style threshold rule.

An early-commit rule is a small function of `(logits, positions, progress)`:

- `logits` `(batch, length, vocab)`: the denoiser's raw logits at this step;
- `positions` `(batch, length)` bool: the generated span (the answer, every block of it);
- `progress` in `(0, 1]`: this step's place in the step schedule (counting from 1) over the step budget.

It returns a `(batch,)` bool tensor: which rows commit *every* still-masked token, future blocks included, to its
argmax now and stop refining. The confidence both rules use is the gap between the top-1 and top-2 raw logits.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

SCHED_SHAPES = ("linear", "cosine", "exp")


def top2_margin(logits: torch.Tensor) -> torch.Tensor:
    """Top-1 minus top-2 logit, over the last dimension."""
    top2 = logits.float().topk(2, dim=-1).values
    return top2[..., 0] - top2[..., 1]


def mean_margin(logits: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Per row, the mean top-1 minus top-2 logit gap over `positions` (`(batch, length)` bool)."""
    weights = positions.float()
    return (top2_margin(logits) * weights).sum(-1) / weights.sum(-1).clamp(min=1.0)


def prophet_threshold(
    progress: float, thresholds: tuple[float, ...] = (8.0, 5.0, 3.5), boundaries: tuple[float, ...] = (0.33, 0.67)
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


def answer_window(positions: torch.Tensor, start: int, size: int | None) -> torch.Tensor:
    """The `size` positions of the span `positions` that follow its first `start` ones (the whole rest if None)."""
    index = positions.long().cumsum(-1) - 1
    window = positions & (index >= start)
    return window if size is None else window & (index < start + size)


@dataclass(frozen=True)
class ProphetCommit:
    """Prophet ("Diffusion Language Models Know the Answer Before Decoding"): commit everything once the mean
    top-2 logit gap over the answer window reaches the threshold of the current progress stage.

    Args:
        thresholds: Gap thresholds of the stages (paper: 8.0 / 5.0 / 3.5; the released code uses 7.5 / 5.0 / 2.5).
        boundaries: Progress values where the stages change.
        answer_start: Offset of the answer window in the generated span.
        window: Length of the answer window (the released code averages over 5 tokens); None: the rest of the span.
    """

    thresholds: tuple[float, ...] = (8.0, 5.0, 3.5)
    boundaries: tuple[float, ...] = (0.33, 0.67)
    answer_start: int = 0
    window: int | None = 5

    def __post_init__(self) -> None:
        if len(self.thresholds) != len(self.boundaries) + 1:
            raise ValueError(
                f"Need one more threshold than boundaries, got thresholds={self.thresholds}, "
                f"boundaries={self.boundaries}."
            )
        if list(self.boundaries) != sorted(self.boundaries):
            raise ValueError(f"`boundaries` must be increasing, got {self.boundaries}.")
        if self.answer_start < 0 or (self.window is not None and self.window < 1):
            raise ValueError(f"Need answer_start >= 0 and window >= 1 or None, got {self.answer_start}, {self.window}.")

    def __call__(self, logits: torch.Tensor, positions: torch.Tensor, progress: float) -> torch.Tensor:
        gap = mean_margin(logits, answer_window(positions, self.answer_start, self.window))
        return gap >= prophet_threshold(progress, self.thresholds, self.boundaries)


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
        if self.tau_low > self.tau_high or self.k <= 0:
            raise ValueError(f"Need tau_low <= tau_high and k > 0, got {self.tau_low}, {self.tau_high}, k={self.k}.")

    def __call__(self, logits: torch.Tensor, positions: torch.Tensor, progress: float) -> torch.Tensor:
        threshold = sched_threshold(progress, self.tau_high, self.tau_low, self.shape, self.k)
        return mean_margin(logits, positions) >= threshold


@dataclass(frozen=True)
class ThresholdCommit:
    """Fast-dLLM's parallel rule: each step commits every masked token of the block whose probability exceeds
    `threshold`, and never fewer than the step's even share (so at least one per step, and no more steps than
    plain decoding). Composes with either early-commit rule.

    Args:
        threshold: Probability above which a token is committed.
    """

    threshold: float = 0.9

    def __post_init__(self) -> None:
        if not 0.0 < self.threshold <= 1.0:
            raise ValueError(f"`threshold` must be in (0, 1], got {self.threshold}.")

    def num_tokens(self, confidence: torch.Tensor, masked: torch.Tensor, scheduled: torch.Tensor) -> torch.Tensor:
        """How many tokens each row commits: `max(scheduled, #{masked with confidence > threshold})`."""
        return torch.maximum(scheduled, ((confidence > self.threshold) & masked).sum(-1))


EarlyCommit = Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]


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
