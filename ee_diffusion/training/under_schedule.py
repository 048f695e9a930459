"""Training under an exit schedule (ASE, Moon et al., Algorithm 1), whatever the objective: the part the DDPM denoiser
loop and the flow-matching loop share.

Each sample's prediction comes from its timestep's depth: the schedule's hooks sit on the model for the run, and a
batch is grouped by depth so that each group runs only its own blocks (the released code runs every block and then
picks the exit output; here a training step costs what the schedule says it should). A plan's reuse, cached-tail and
dropped steps train nothing: no block of the model makes their output. The timestep embedding is frozen.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator

import torch

from ..exits import apply_exit_schedule, remove_exit_schedule, reset_exit_stats
from ..schedules import DROP, REUSE, ExitSchedule

# Parameter names of the timestep embeddings of diffusers' DiT (per block), Flux (`time_text_embed`) and UNet2DModel.
_TIMESTEP_EMBEDDING_NAMES = ("timestep_embedder", "time_embedding")


def freeze_timestep_embedding(model: torch.nn.Module) -> list[str]:
    """Stop gradients into the timestep embedding of a DiT, Flux transformer or UNet2DModel; returns the frozen
    parameter names."""
    frozen = [name for name, p in model.named_parameters() if any(k in name for k in _TIMESTEP_EMBEDDING_NAMES)]
    if not frozen:
        raise ValueError(
            f"Found no timestep-embedding parameters ({_TIMESTEP_EMBEDDING_NAMES}) in {type(model).__name__}."
        )
    for name, parameter in model.named_parameters():
        if name in frozen:
            parameter.requires_grad_(False)
    return frozen


def frozen_teacher(model: torch.nn.Module, target: str) -> torch.nn.Module | None:
    """For `target="teacher"`, a frozen copy of `model` as it is now, in eval mode, made before the schedule's hooks go
    on the student, whose full-depth output the student learns; `None` for `"data"`."""
    if target != "teacher":
        return None
    return copy.deepcopy(model).eval().requires_grad_(False)


def _trained_depth(action: int | str) -> int:
    """The depth a plan's action trains: its own for a depth; `REUSE` (nothing: the step takes cached work, or is
    dropped) otherwise."""
    return REUSE if action == DROP or action <= REUSE else action


def depth_groups(depths: list[int]) -> dict[int, torch.Tensor]:
    """Indices of the samples at each depth, so that each group runs only the blocks it uses."""
    by_depth = torch.tensor(depths)
    return {int(depth): torch.nonzero(by_depth == depth).flatten() for depth in torch.unique(by_depth)}


def trained_groups(
    exit_schedule: ExitSchedule | None, timesteps: torch.Tensor, num_train_timesteps: int
) -> list[torch.Tensor]:
    """The indices of a batch at `timesteps` (of a `num_train_timesteps` schedule) that share a depth, one group per
    depth the schedule trains there (all of them in one group without a schedule)."""
    if exit_schedule is None:
        return [torch.arange(len(timesteps))]
    depths = [_trained_depth(action) for action in exit_schedule.depths_for(timesteps, num_train_timesteps)]
    return [members for depth, members in depth_groups(depths).items() if depth != REUSE]


@contextlib.contextmanager
def trained_under(
    model: torch.nn.Module, exit_schedule: ExitSchedule | None, num_train_timesteps: int, freeze: bool
) -> Iterator[Callable[[], None] | None]:
    """Put `exit_schedule`'s hooks on `model` (and freeze its timestep embedding if `freeze`) for a training run;
    yields what the loop calls after each step (`None` without a schedule). On exit the hooks are removed and every
    parameter requires grad again."""
    if freeze:
        freeze_timestep_embedding(model)
    if exit_schedule is not None:
        apply_exit_schedule(model, exit_schedule, num_train_timesteps, plan_steps_only=False)
    try:
        yield None if exit_schedule is None else lambda: reset_exit_stats(model)
    finally:
        if exit_schedule is not None:
            remove_exit_schedule(model)
        for parameter in model.parameters():
            parameter.requires_grad_(True)
