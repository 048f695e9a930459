"""The decoding methods `dllm-bench` compares, by name, and the call settings each one means.

torch-free to import (the rules are imported when settings are asked for), so the CLI can list `METHODS`.
"""

from __future__ import annotations

METHODS = ("full", "halfsteps", "threshold", "prophet", "sched-linear", "sched-exp")


def method_settings(method: str, steps: int) -> dict:
    """Call settings of a method, for a model whose full decoding takes `steps` steps."""
    from .rules import ProphetCommit, SchEDCommit, ThresholdCommit

    settings = {
        "full": {},
        "halfsteps": {"steps": max(steps // 2, 1)},
        "threshold": {"parallel": ThresholdCommit(0.9)},
        "prophet": {"early_commit": ProphetCommit()},
        "sched-linear": {"early_commit": SchEDCommit(tau_high=7.5, tau_low=2.5, shape="linear")},
        "sched-exp": {"early_commit": SchEDCommit(tau_high=7.5, tau_low=2.5, shape="exp", k=4.0)},
    }
    if method not in settings:
        raise ValueError(f"Unknown method {method!r}; expected some of {METHODS}.")
    return {"steps": steps, **settings[method]}
