import math

import pytest
import torch

from ee_diffusion.dllm.rules import (
    ProphetCommit,
    SchEDCommit,
    ThresholdCommit,
    answer_window,
    marker_end,
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


# the released code's thresholds (pixeli99/Prophet), the defaults
@pytest.mark.parametrize(
    "progress, threshold", [(0.1, 7.5), (0.329, 7.5), (0.33, 5.0), (0.5, 5.0), (0.67, 2.5), (1.0, 2.5)]
)
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
    assert not ProphetCommit(answer_start=0, window=5)(logits, span, 0.1).item()  # mean 27/5 < 7.5
    assert mean_margin(logits, span).item() == pytest.approx(27 / 8)
    assert not SchEDCommit(tau_high=7.5, tau_low=2.5)(logits, span, 0.1).item()
    assert SchEDCommit(tau_high=7.5, tau_low=2.5)(logits, span, 1.0).item()  # 3.375 >= tau(1) = 2.5
    # a window that starts past the span's end is empty: nothing to judge, even at a threshold of 0
    assert not ProphetCommit(thresholds=(0.0, 0.0, 0.0), answer_start=8)(logits, span, 0.1).item()
    assert ProphetCommit(thresholds=(0.0, 0.0, 0.0), answer_start=7)(logits, span, 0.1).item()


MARKER = (41, 42)  # stands in for the ids of "The answer is"


def test_prophet_window_follows_the_last_marker_in_the_span():
    # two prompt positions, then a span of 10 whose answer (confident, gap 9) follows the second marker
    tokens = torch.tensor([[41, 42, 5, 41, 42, 6, 7, 41, 42, 8, 9, 1]])
    logits = logits_with_margin(torch.tensor([0.0] * 9 + [9.0] * 3))
    span = torch.tensor([[False, False] + [True] * 10])
    assert marker_end(tokens, span, MARKER).tolist() == [9]
    assert ProphetCommit(marker=MARKER, window=3)(logits, span, 0.1, tokens=tokens).item()
    assert ProphetCommit(marker=[41, 42], answer_start=1)(logits, span, 0.1, tokens=tokens).item()  # 2 positions left
    assert not ProphetCommit(window=3)(logits, span, 0.1).item()  # without the marker: the first three, gap 0
    assert not ProphetCommit(marker=MARKER, answer_start=3)(logits, span, 0.1, tokens=tokens).item()  # nothing left
    first_only = tokens.clone()
    first_only[0, 7:9] = 1  # the second marker is still masked: the window follows the first one
    assert marker_end(first_only, span, MARKER).tolist() == [5]
    assert not ProphetCommit(marker=MARKER, window=3)(logits, first_only, 0.1, tokens=first_only).item()
    in_prompt_only = torch.tensor([[41, 42] + [1] * 10])  # a marker in the prompt does not count
    assert marker_end(in_prompt_only, span, MARKER).tolist() == [-1]
    never_found = ProphetCommit(marker=MARKER, thresholds=(0.0, 0.0, 0.0))  # would fire at any gap, if found
    assert not never_found(logits, span, 0.1, tokens=in_prompt_only).item()
    with pytest.raises(ValueError, match="needs the current `tokens`"):
        ProphetCommit(marker=MARKER)(logits, span, 0.1)


def test_answer_window_counts_from_after():
    span = torch.tensor([[False, True, True, True, True, True], [True] * 6])
    window = answer_window(span, 1, 2, after=torch.tensor([3, 0]))
    assert window.tolist() == [[False] * 4 + [True] * 2, [False, True, True, False, False, False]]


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (
            {"marker": "The answer is"},
            TypeError,
            r"`marker` must be None or a sequence of token ids, got 'The answer is'",
        ),
        ({"marker": 41}, TypeError, r"`marker` must be None or a sequence of token ids, got 41"),
        ({"marker": []}, ValueError, r"`marker` must hold at least one token id"),
        ({"marker": [41, 4.5]}, TypeError, r"`marker\[1\]` must be an integer, got 4.5"),
        ({"marker": [-1]}, ValueError, r"`marker\[0\]` must be an integer >= 0, got -1"),
        ({"answer_start": -1}, ValueError, r"`answer_start` must be an integer >= 0, got -1"),
        ({"answer_start": 1.5}, TypeError, r"`answer_start` must be an integer, got 1.5"),
        ({"window": 0}, ValueError, r"`window` must be an integer >= 1, got 0"),
    ],
)
def test_prophet_bad_window_arguments_raise(kwargs, error, match):
    with pytest.raises(error, match=match):
        ProphetCommit(**kwargs)


@pytest.mark.parametrize(
    "rule, error, match",
    [
        (lambda: SchEDCommit(tau_high=float("nan")), ValueError, r"`tau_high` must be a finite number, got nan"),
        (lambda: SchEDCommit(tau_low=float("nan")), ValueError, r"`tau_low` must be a finite number"),
        (lambda: SchEDCommit(shape="exp", k=float("inf")), ValueError, r"`k` must be a finite number, got inf"),
        (lambda: SchEDCommit(tau_high="7"), TypeError, r"`tau_high` must be a number, got '7'"),
        (lambda: ProphetCommit(thresholds="abc"), TypeError, r"`thresholds` must be a sequence of numbers"),
        (lambda: ProphetCommit(thresholds=("7", "5", "2")), TypeError, r"`thresholds\[0\]` must be a number"),
        (lambda: ProphetCommit(thresholds=(float("nan"), 5, 2)), ValueError, r"`thresholds\[0\]` must be a finite"),
        (lambda: ProphetCommit(boundaries=(2, 3)), ValueError, r"`boundaries` are progress values in \(0, 1\)"),
        (lambda: ProphetCommit(boundaries=(0.5, 0.5)), ValueError, r"`boundaries` must be increasing"),
        (lambda: ThresholdCommit(float("nan")), ValueError, r"`threshold` must be a finite number, got nan"),
    ],
)
def test_rules_refuse_values_that_would_never_fire(rule, error, match):
    with pytest.raises(error, match=match):
        rule()


def test_prophet_marker_is_kept_as_a_tuple():
    rule = ProphetCommit(marker=[41, 42])
    assert rule.marker == MARKER and rule == ProphetCommit(marker=MARKER)
    assert hash(rule) == hash(ProphetCommit(marker=MARKER))


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
    confidence = torch.tensor([[0.95, 0.99, 0.2, 0.91], [0.1, 0.2, 0.3, 0.4], [0.5, 0.5, 0.5, 0.5]])
    masked = torch.tensor([[True, True, True, False], [True, True, True, True], [True, True, True, True]])
    count = ThresholdCommit(0.9).num_tokens(confidence, masked, torch.tensor([1, 1, 3]))
    assert count.tolist() == [2, 1, 3]
    # a probability exactly at the threshold is committed, as in the released code (`< threshold` is left out)
    confidence, masked, none_scheduled = (
        torch.tensor([[0.5, 0.25]]),
        torch.ones(1, 2, dtype=torch.bool),
        torch.tensor([0]),
    )
    assert ThresholdCommit(0.5).num_tokens(confidence, masked, none_scheduled).tolist() == [1]
    assert ThresholdCommit(0.25).num_tokens(confidence, masked, none_scheduled).tolist() == [2]


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
