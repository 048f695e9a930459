"""The schedulers the bench samples with, by name, each built from a model's own scheduler config.

Named by their diffusers class (imported on first build), so the CLI can list `SCHEDULERS` without loading diffusers.
DDIM and DDPM default to `clip_sample=True`, which no other scheduler has and a model's config does not mention (a
DPM-Solver++ config has no such key): it cut `digits-dit` to 30% class accuracy. So they keep the config's own range
control, `thresholding`, and do not clip.

A flow-matching model (its scheduler config is a `FlowMatch...` one, as `digits-flux`'s is) is sampled by the
flow-matching form of a name, `FLOW_SCHEDULERS`: `euler` is `FlowMatchEulerDiscreteScheduler`, `dpm-solver++` is
DPM-Solver++ on flow sigmas predicting the flow, with the model's shift. DDIM and DDPM have no flow-matching form:
asking for them on such a model is a `ValueError`. `FlowMatchHeunDiscreteScheduler` is not offered: `FluxPipeline`
sets its schedulers' timesteps from sigmas and a shift `mu`, and its `set_timesteps` takes neither.
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
# The names that fit a flow-matching model, and what they build for it.
FLOW_SCHEDULERS: dict[str, tuple[str, dict[str, Any]]] = {
    "dpm-solver++": (
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "dpmsolver++", "use_flow_sigmas": True, "prediction_type": "flow_prediction"},
    ),
    "euler": ("FlowMatchEulerDiscreteScheduler", {}),
}
# Settings a flow DPM-Solver++ config carries that would change a FlowMatch scheduler built from it (`FluxPipeline`
# leaves the sigmas to any scheduler whose config says `use_flow_sigmas`).
_SOLVER_ONLY = ("use_flow_sigmas", "prediction_type", "algorithm_type", "flow_shift")


def is_flow_matching(config: Any) -> bool:
    """Whether a scheduler config is a flow-matching model's: a `FlowMatch...` class (by name, or by its keys when the
    config has no `_class_name`: a `shift` and no betas), or flow sigmas, or the flow as the prediction."""
    return (
        str(config.get("_class_name", "")).startswith("FlowMatch")
        or ("shift" in config and "beta_start" not in config)
        or bool(config.get("use_flow_sigmas", False))
        or config.get("prediction_type") == "flow_prediction"
    )


def schedulers_for(config: Any) -> list[str]:
    """The names of `SCHEDULERS` that fit a model with this scheduler config."""
    return list(FLOW_SCHEDULERS) if is_flow_matching(config) else list(SCHEDULERS)


def build_scheduler(name: str, config: Any) -> Any:
    """The scheduler `name` (one of `SCHEDULERS`) built from a model's scheduler `config`: its flow-matching form
    (`FLOW_SCHEDULERS`) when the config is a flow-matching model's."""
    import diffusers

    if name not in SCHEDULERS:
        raise ValueError(f"Unknown scheduler {name!r}; expected one of {', '.join(SCHEDULERS)}.")
    if not is_flow_matching(config):
        class_name, overrides = SCHEDULERS[name]
        return getattr(diffusers, class_name).from_config(config, **overrides)
    if name not in FLOW_SCHEDULERS:
        raise ValueError(
            f"The scheduler {name!r} samples DDPM-trained models, but this model is flow-matching (a scheduler config "
            f"of {config.get('_class_name', 'flow matching')}); expected one of {', '.join(FLOW_SCHEDULERS)}."
        )
    class_name, overrides = FLOW_SCHEDULERS[name]
    if class_name.startswith("FlowMatch"):
        config = {key: value for key, value in config.items() if key not in _SOLVER_ONLY}
    elif "shift" in config:  # a FlowMatch config's static shift is DPM-Solver's `flow_shift`
        overrides = {**overrides, "flow_shift": config["shift"]}
        config = {key: value for key, value in config.items() if key != "shift"}
    return getattr(diffusers, class_name).from_config(config, **overrides)
