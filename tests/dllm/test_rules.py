import math

import pytest
import torch

from ee_diffusion.dllm.rules import (
    ProphetCommit,
    SchEDCommit,
    ThresholdCommit,
    answer_window,
    mean_margin,
    prophet_threshold,
    resolve_early_commit,
    sched_threshold,
    top2_margin,
)


def logits_with_margin(margins: torch.Tensor, vocab: int = 6) -> torch.Tensor:
    """`(1, length, vocab)` logits whose top-1 minus top-2 gap at position i is `margins[i]`."""
    logits = torch.zeros(1, len(margins), vocab)
    logits[0, :, 2] = 1.0
    logits[0, torch.arange(len(margins)), 3] = 1.0 + margins
    return logits


def test_top2_margin_is_the_gap_between_the_two_largest_logits():
    logits = torch.tensor([[0.5, 3.0, -1.0, 2.25]])
    assert top2_margin(logits).item() == pytest.approx(0.75)


@pytest.mark.parametrize("progress, threshold", [(0.1, 8.0), (0.329, 8.0), (0.33, 5.0), (0.5, 5.0), (0.67, 3.5), (1.0, 3.5)])
def test_prophet_fires_exactly_when_the_gap_reaches_the_stage_threshold(progress, threshold):
    assert prophet_threshold(progress) == threshold
    span = torch.ones(1, 5, dtype=torch.bool)
    rule = ProphetCommit()
    assert rule(logits_with_margin(torch.full((5,), threshold)), span, progress).item()
    assert not rule(logits_with_margin(torch.full((5,), threshold - 1e-3)), span, progress).item()


def test_prophet_looks_at_its_answer_window_and_sched_at_the_whole_span():
    margins = torch.tensor([0.0, 9.0, 9.0, 9.0, 0.0, 0.0, 0.0, 0.0])  # confident only at span positions 1..3
    logits = logits_with_margin(torch.cat([torch.zeros(2), margins]))  # two prompt positions first
    span = torch.tensor([[False, False] + [True] * 8])
    assert answer_window(span, 1, 3).tolist() == [[False] * 3 + [True] * 3 + [False] * 4]
    assert ProphetCommit(answer_start=1, window=3)(logits, span, 0.1).item()
    assert not ProphetCommit(answer_start=0, window=5)(logits, span, 0.1).item()  # mean 27/5 < 8
    assert mean_margin(logits, span).item() == pytest.approx(27 / 8)
    assert not SchEDCommit(tau_high=7.5, tau_low=2.5)(logits, span, 0.1).item()
    assert SchEDCommit(tau_high=7.5, tau_low=2.5)(logits, span, 1.0).item()  # 3.375 >= tau(1) = 2.5


@pytest.mark.parametrize("shape", ["linear", "cosine", "exp"])
def test_sched_thresholds_fall_smoothly_from_tau_high(shape):
    values = [sched_threshold(p / 20, 7.5, 2.5, shape, k=4) for p in range(21)]
    assert values[0] == pytest.approx(7.5)
    assert all(b <= a for a, b in zip(values, values[1:]))
    assert min(values) >= 2.5
    if shape != "exp":
        assert values[-1] == pytest.approx(2.5)


def test_sched_threshold_formulas():
    assert sched_threshold(0.25, 8.0, 0.0, "linear") == pytest.approx(6.0)
    assert sched_threshold(0.5, 8.0, 0.0, "cosine") == pytest.approx(4.0)
    assert sched_threshold(0.5, 8.0, 2.0, "exp", k=4) == pytest.approx(2.0 + 6.0 * math.exp(-2.0))


def test_sched_fires_per_row_exactly_at_tau():
    tau = sched_threshold(0.4, 7.5, 2.5, "exp", k=8)
    logits = torch.cat([logits_with_margin(torch.full((4,), tau)), logits_with_margin(torch.full((4,), tau - 1e-3))])
    fired = SchEDCommit(shape="exp", k=8)(logits, torch.ones(2, 4, dtype=torch.bool), 0.4)
    assert fired.tolist() == [True, False]


def test_threshold_commit_counts_confident_masked_tokens_but_never_less_than_scheduled():
    confidence = torch.tensor([[0.95, 0.99, 0.2, 0.91], [0.1, 0.2, 0.3, 0.4]])
    masked = torch.tensor([[True, True, True, False], [True, True, True, True]])
    count = ThresholdCommit(0.9).num_tokens(confidence, masked, torch.tensor([1, 1]))
    assert count.tolist() == [2, 1]


def test_resolve_early_commit_and_bad_values():
    assert resolve_early_commit(None) is None
    assert resolve_early_commit("prophet") == ProphetCommit()
    assert resolve_early_commit("sched") == SchEDCommit()
    with pytest.raises(TypeError, match="'prophet', 'sched'"):
        resolve_early_commit("fast")
    with pytest.raises(ValueError, match="'linear', 'cosine', 'exp'"):
        SchEDCommit(shape="step")
    with pytest.raises(ValueError, match="one more threshold"):
        ProphetCommit(thresholds=(8.0, 5.0))
    with pytest.raises(ValueError, match="threshold"):
        ThresholdCommit(1.5)
