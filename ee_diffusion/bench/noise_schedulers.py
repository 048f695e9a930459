"""The schedulers the bench samples with, by name, each built from a model's own scheduler config.

Named by their diffusers class (imported on first build), so the CLI can list `SCHEDULERS` without loading diffusers.
DDIM and DDPM default to `clip_sample=True`, which no other scheduler has and a model's config does not mention (a
DPM-Solver++ config has no such key): it cut `digits-dit` to 30% class accuracy. So they keep the config's own range
control, `thresholding`, and do not clip.
"""

from __future__ import annotations

from typing import Any

# name -> (diffusers scheduler class, settings that override the model's config)
SCHEDULERS: dict[str, tuple[str, dict[str, Any]]] = {
    "dpm-solver++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    "ddim": ("DDIMScheduler", {"clip_sample": False}),
    "ddpm": ("DDPMScheduler", {"clip_sample": False}),
    "euler": ("EulerDiscreteScheduler", {}),
}


def build_scheduler(name: str, config: Any) -> Any:
    """The scheduler `name` (one of `SCHEDULERS`) built from a model's scheduler `config`."""
    import diffusers

    if name not in SCHEDULERS:
        raise ValueError(f"Unknown scheduler {name!r}; expected one of {', '.join(SCHEDULERS)}.")
    class_name, overrides = SCHEDULERS[name]
    return getattr(diffusers, class_name).from_config(config, **overrides)
