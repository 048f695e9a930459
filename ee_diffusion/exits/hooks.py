"""Apply an `ExitSchedule` to a denoiser as diffusers hooks (the pattern of `diffusers.hooks.apply_first_block_cache`).

`apply_exit_schedule` registers one hook on the denoiser, which reads the timestep from the denoiser's own forward
arguments and decides the depth of that call, and one hook on each skippable unit, which runs the unit or returns its
skip output. No pipeline cooperation is needed: a classifier-free-guidance batch, whose conditional and unconditional
halves share one call and one timestep, gets one depth. A batch whose samples carry different timesteps gets a depth
per sample: units are run up to the deepest sample and samples past their own depth keep their skip output.

The decision is made once per denoiser call, from the timestep, so nothing carries over from one call or one run to
the next except the record of what ran (`get_exit_stats`) -- and, under a plan with `REUSE` steps, the work of the last
computed call, which a reuse call takes instead of running any unit (see `ExitArchitecture.reuse`). That cache is
dropped when a call's timestep is higher than the last one (a new sampling run) and by `reset_exit_stats`; a reuse step
with nothing cached for its batch runs at full depth. `remove_exit_schedule` restores the original forwards, and with
them bit-identical outputs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.utils import BaseOutput

from ..schedules import REUSE, ExitSchedule
from ..validation import as_int
from .architectures import ExitArchitecture, _argument, get_exit_architecture

_SCHEDULE_HOOK = "ee_exit_schedule"
_UNIT_HOOK = "ee_exit_unit"


@dataclass(frozen=True)
class ExitCall:
    """What one denoiser call ran: its timestep values and the depth of each, and how many units actually executed.

    `timesteps` and `depths` have one entry per timestep value the denoiser received: one per sample when the
    pipeline passes a batch of timesteps (DiT, PixArt, SD3), a single one when it passes a scalar (the U-Nets).
    """

    timesteps: tuple[float, ...]
    depths: tuple[int, ...]
    units_executed: int


@dataclass
class ExitStats:
    """The record of every denoiser call since the schedule was applied or the stats were reset."""

    num_blocks: int
    calls: list[ExitCall] = field(default_factory=list)

    @property
    def blocks_per_call(self) -> list[int]:
        """Units executed in each call, in call order."""
        return [call.units_executed for call in self.calls]

    @property
    def block_fraction(self) -> float:
        """Executed units over the units a full-depth run would have executed (1.0 when nothing ran yet)."""
        if not self.calls:
            return 1.0
        return sum(self.blocks_per_call) / (len(self.calls) * self.num_blocks)


class _ExitState:
    """The decision of the denoiser call in flight, shared by the schedule hook and its unit hooks, and the work a
    plan's reuse steps take (`cached`, made by a call on `cached_batch` samples at timestep `last_timestep`)."""

    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self.depths: list[int] | None = None
        self.max_depth = num_blocks
        self.min_depth = num_blocks
        self.depth_tensor: torch.Tensor | None = None
        self.timesteps: tuple[float, ...] = ()
        self.units_executed = 0
        self.stats = ExitStats(num_blocks=num_blocks)
        self.reusing = False
        self.start: Any = None  # the first unit's skip output in this call (residual reuse)
        self.batch = 0  # samples in the call in flight (under a plan with reuse steps)
        self.cached: Any = None
        self.cached_batch: int | None = None
        self.last_timestep: float | None = None

    def forget_cache(self) -> None:
        self.cached, self.cached_batch, self.last_timestep = None, None, None


class ExitScheduleHook(ModelHook):
    """Decides each call's depth from the timestep argument of the denoiser's forward."""

    def __init__(
        self,
        schedule: ExitSchedule,
        architecture: ExitArchitecture,
        state: _ExitState,
        num_train_timesteps: int,
        plan_steps_only: bool = True,
    ) -> None:
        super().__init__()
        self.schedule = schedule
        self.architecture = architecture
        self.state = state
        self.num_train_timesteps = num_train_timesteps
        self.plan_steps_only = plan_steps_only

    def pre_forward(self, module: torch.nn.Module, *args, **kwargs) -> tuple[tuple, dict]:
        timestep = _argument(module, self.architecture.timestep_argument, args, kwargs)
        if timestep is None:
            raise ValueError(f"{type(module).__name__} was called with `timestep=None`; an exit schedule needs it.")
        # One host read of the timestep per call (none when it already lives on the CPU).
        timesteps = torch.as_tensor(timestep).detach().reshape(-1).float().cpu().tolist()
        if self.plan_steps_only:
            self.schedule.check_timesteps(set(timesteps), self.num_train_timesteps)
        depths = self.schedule.depths_for(timesteps, self.num_train_timesteps)
        state = self.state
        state.reusing = False
        if self.schedule.reuses:
            depths = self._reuse_or_compute(module, args, kwargs, timesteps, depths)
        state.depths, state.max_depth, state.min_depth = depths, max(depths), min(depths)
        state.depth_tensor = torch.tensor(depths) if state.min_depth != state.max_depth else None
        state.timesteps, state.units_executed = tuple(timesteps), 0
        return args, kwargs

    def _reuse_or_compute(
        self, module: torch.nn.Module, args: tuple, kwargs: dict, timesteps: list[float], depths: list[int]
    ) -> list[int]:
        """Under a plan: whether this call reuses (every sample at a `REUSE` step, and work cached for its batch),
        and the depths it runs otherwise (a reuse step with nothing to reuse runs at full depth)."""
        state = self.state
        if state.last_timestep is not None and max(timesteps) > state.last_timestep:
            state.forget_cache()  # the timestep went up: a new sampling run
        state.last_timestep = max(timesteps)
        state.batch = _argument(module, self.architecture.sample_argument, args, kwargs).shape[0]
        if REUSE not in depths:
            return depths
        if any(depth != REUSE for depth in depths):
            raise ValueError(
                f"This call's timesteps {timesteps} mix the plan's reuse steps with computed ones; a "
                "reuse step needs the whole batch at it."
            )
        if state.cached is None or state.cached_batch != state.batch:
            return [state.num_blocks] * len(depths)
        state.reusing = True
        return depths

    def new_forward(self, module: torch.nn.Module, *args, **kwargs) -> Any:
        state = self.state
        whole_output = self.architecture.reuse == "output" and self.schedule.reuses
        if whole_output and state.reusing:
            return state.cached
        output = self.fn_ref.original_forward(*args, **kwargs)
        if whole_output:
            state.cached, state.cached_batch = output, state.batch
        return output

    def post_forward(self, module: torch.nn.Module, output: Any) -> Any:
        state = self.state
        state.stats.calls.append(ExitCall(state.timesteps, tuple(state.depths), state.units_executed))
        state.depths, state.depth_tensor = None, None
        return output


class ExitUnitHook(ModelHook):
    """Runs unit `index` of the denoiser, or returns its skip output when the call's depth does not reach it.

    Under a plan whose reuse is `"residual"`, the first unit also records its skip output (the span's start) and the
    last unit the span's end, whose difference reuse steps add to their own start instead of running any unit.
    """

    def __init__(
        self, index: int, architecture: ExitArchitecture, state: _ExitState, last: bool, residual: bool
    ) -> None:
        super().__init__()
        self.index = index
        self.skip = architecture.skip
        self.state = state
        self.last = last
        self.residual = residual  # record the span's residual (a plan with reuse steps, on a residual architecture)

    def new_forward(self, module: torch.nn.Module, *args, **kwargs) -> Any:
        state = self.state
        if state.depths is None:  # the unit was called on its own, outside a denoiser call
            return self.fn_ref.original_forward(*args, **kwargs)
        if not self.residual:
            return self._run_or_skip(module, args, kwargs)
        if self.index == 0:
            state.start = self.skip(module, args, kwargs)
            if state.reusing:
                return _zip_map(torch.add, state.start, state.cached)
        output = self._run_or_skip(module, args, kwargs)
        if self.last and not state.reusing:
            state.cached, state.cached_batch = _zip_map(torch.sub, output, state.start), state.batch
        return output

    def _run_or_skip(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> Any:
        state = self.state
        if state.min_depth > self.index:  # every sample of the batch reaches this unit
            state.units_executed += 1
            return self.fn_ref.original_forward(*args, **kwargs)
        skipped = self.skip(module, args, kwargs)
        if state.max_depth <= self.index:
            return skipped
        state.units_executed += 1
        output = self.fn_ref.original_forward(*args, **kwargs)
        return _select(state.depth_tensor > self.index, output, skipped)


def _zip_map(fn: Any, a: Any, b: Any) -> Any:
    """`fn(x, y)` on each pair of tensors of two unit outputs of one structure (tensors, tuples, diffusers outputs);
    where either side has no tensor (None, e.g. the encoder states of SD3's context_pre_only last block), `a`'s
    part."""
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return fn(a, b)
    if isinstance(a, BaseOutput):
        return type(a)(**{key: _zip_map(fn, value, b[key]) for key, value in a.items()})
    if isinstance(a, tuple):
        return tuple(_zip_map(fn, x, y) for x, y in zip(a, b))
    return a


def _select(keep: torch.Tensor, run: Any, skipped: Any) -> Any:
    """Per sample of the batch: `run` where `keep`, else `skipped`."""
    return _zip_map(lambda r, s: torch.where(keep.to(r.device).view(-1, *([1] * (r.ndim - 1))), r, s), run, skipped)


def denoiser_of(pipe_or_model: Any) -> torch.nn.Module | None:
    """The module exit hooks go on: the model itself, or a pipeline's `transformer` or `unet` (`None` without one)."""
    if isinstance(pipe_or_model, torch.nn.Module):
        return pipe_or_model
    for name in ("transformer", "unet"):
        denoiser = getattr(pipe_or_model, name, None)
        if isinstance(denoiser, torch.nn.Module):
            return denoiser
    return None


def _resolve(pipe_or_model: Any) -> tuple[torch.nn.Module, int]:
    """The denoiser of a pipeline (or the model itself) and the training timestep count to normalise with."""
    denoiser = denoiser_of(pipe_or_model)
    if denoiser is pipe_or_model:
        return denoiser, 1000
    if denoiser is not None:
        scheduler = getattr(pipe_or_model, "scheduler", None)
        num_train_timesteps = getattr(getattr(scheduler, "config", None), "num_train_timesteps", None) or 1000
        return denoiser, int(num_train_timesteps)
    raise TypeError(
        "Expected a denoiser model or a diffusers pipeline with a `transformer` or `unet`, got "
        f"{type(pipe_or_model).__name__}."
    )


def _schedule_hook(model: torch.nn.Module) -> ExitScheduleHook | None:
    registry = getattr(model, "_diffusers_hook", None)
    return None if registry is None else registry.get_hook(_SCHEDULE_HOOK)


def exit_units(pipe_or_model: Any) -> list[torch.nn.Module]:
    """The units an exit schedule counts as blocks for this denoiser, in execution order."""
    model, _ = _resolve(pipe_or_model)
    return get_exit_architecture(model).units(model)


def num_exit_blocks(pipe_or_model: Any) -> int:
    """The `num_blocks` an `ExitSchedule` must have to apply to this denoiser."""
    return len(exit_units(pipe_or_model))


def apply_exit_schedule(
    pipe_or_model: Any, schedule: ExitSchedule, num_train_timesteps: int | None = None, plan_steps_only: bool = True
) -> None:
    """Make a denoiser run `schedule.blocks_at(t)` of its blocks at timestep `t`.

    Args:
        pipe_or_model: A supported denoiser (see `register_exit_architecture`) or a diffusers pipeline holding one as
            `transformer` or `unet`. A schedule already applied is replaced.
        schedule: The exit schedule; its `num_blocks` must equal `num_exit_blocks(pipe_or_model)`.
        num_train_timesteps: Scale of the timesteps the denoiser receives. Defaults to the pipeline scheduler's
            `num_train_timesteps`, or 1000 for a bare model.
        plan_steps_only: Under a plan, refuse a call whose timestep is not one of the plan's steps (a run of another
            scheduler or step count); `False` takes the nearest step's action (ASE fine-tuning at random timesteps).

    Example:
        ```python
        >>> pipe = DiTPipeline.from_pretrained("facebook/DiT-XL-2-256")
        >>> apply_exit_schedule(pipe, ExitSchedule.linear(num_blocks=28, min_blocks=14))
        >>> images = pipe(class_labels=[207], num_inference_steps=25).images
        >>> get_exit_stats(pipe).block_fraction
        ```
    """
    if not isinstance(schedule, ExitSchedule):
        raise TypeError(f"`schedule` must be an ExitSchedule, got {type(schedule).__name__}.")
    model, timestep_scale = _resolve(pipe_or_model)
    architecture = get_exit_architecture(model)
    units = architecture.units(model)
    if schedule.config.num_blocks != len(units):
        raise ValueError(
            f"The schedule is for num_blocks={schedule.config.num_blocks}, but this {type(model).__name__} has "
            f"{len(units)} skippable blocks; build the schedule with num_blocks={len(units)}."
        )
    remove_exit_schedule(model)
    state = _ExitState(len(units))
    if num_train_timesteps is not None:
        timestep_scale = as_int("num_train_timesteps", num_train_timesteps, low=1)
    HookRegistry.check_if_exists_or_initialize(model).register_hook(
        ExitScheduleHook(schedule, architecture, state, timestep_scale, plan_steps_only), _SCHEDULE_HOOK
    )
    residual = schedule.reuses and architecture.reuse == "residual"
    for index, unit in enumerate(units):
        HookRegistry.check_if_exists_or_initialize(unit).register_hook(
            ExitUnitHook(index, architecture, state, last=index == len(units) - 1, residual=residual), _UNIT_HOOK
        )
    HookRegistry.check_if_exists_or_initialize(model).invalidate_child_registries_cache()
    _keep_pipeline_component(pipe_or_model, schedule)


def remove_exit_schedule(pipe_or_model: Any) -> None:
    """Remove the exit hooks, restoring the denoiser's original forwards (a no-op when none is applied)."""
    model, _ = _resolve(pipe_or_model)
    _keep_pipeline_component(pipe_or_model, None)
    if _schedule_hook(model) is None:
        return
    registry = HookRegistry.check_if_exists_or_initialize(model)
    registry.remove_hook(_SCHEDULE_HOOK, recurse=False)
    registry.remove_hook(_UNIT_HOOK, recurse=True)
    registry.invalidate_child_registries_cache()


def _keep_pipeline_component(pipe_or_model: Any, schedule: ExitSchedule | None) -> None:
    """A pipeline that carries an `exit_schedule` component (the drop-in ones) records what its hooks apply."""
    config = getattr(pipe_or_model, "config", None)
    if not isinstance(pipe_or_model, torch.nn.Module) and config is not None and "exit_schedule" in config:
        pipe_or_model.register_modules(exit_schedule=schedule)


def get_exit_schedule(pipe_or_model: Any) -> ExitSchedule | None:
    """The schedule applied to this denoiser, or `None`."""
    hook = _schedule_hook(_resolve(pipe_or_model)[0])
    return None if hook is None else hook.schedule


def own_exit_schedule(pipe_or_model: Any) -> ExitSchedule | None:
    """The exit schedule `pipe_or_model` samples with as it is: a drop-in pipeline's `exit_schedule` component, or
    the one applied to the denoiser of a stock pipeline or a bare model."""
    if hasattr(pipe_or_model, "set_exit_schedule"):
        return pipe_or_model.exit_schedule
    return get_exit_schedule(pipe_or_model)


@contextlib.contextmanager
def exit_schedule_in_force(
    pipe_or_model: Any, schedule: ExitSchedule | None
) -> Iterator[Callable[[ExitSchedule | None], None]]:
    """Inside: `schedule` on `pipe_or_model` (`None`: the full model), and `use(other)`, which it yields, puts another
    on; after: the schedule it had before (a fine-tuned model's own, say), whatever happened inside.

    Works on the drop-in pipelines (through their `exit_schedule` component), on stock diffusers pipelines and on bare
    denoisers (through the hooks).
    """
    drop_in = hasattr(pipe_or_model, "set_exit_schedule")
    own = own_exit_schedule(pipe_or_model)

    def use(other: ExitSchedule | None) -> None:
        if drop_in:
            pipe_or_model.exit_schedule = other
        elif other is None:
            remove_exit_schedule(pipe_or_model)
        else:
            apply_exit_schedule(pipe_or_model, other)

    use(schedule)
    try:
        yield use
    finally:
        use(own)


def set_exit_timestep_scale(pipe_or_model: Any, num_train_timesteps: int) -> None:
    """Change the training timestep count the applied schedule normalises timesteps with."""
    hook = _require_hook(pipe_or_model)
    hook.num_train_timesteps = as_int("num_train_timesteps", num_train_timesteps, low=1)


def get_exit_stats(pipe_or_model: Any) -> ExitStats:
    """A copy of what the exit hooks executed: per denoiser call, the timesteps, depths and units run."""
    stats = _require_hook(pipe_or_model).state.stats
    return ExitStats(num_blocks=stats.num_blocks, calls=list(stats.calls))


def reset_exit_stats(pipe_or_model: Any) -> None:
    """Forget the recorded calls, and the work a plan's reuse steps would take (the drop-in pipelines do this at the
    start of every `__call__`)."""
    state = _require_hook(pipe_or_model).state
    state.stats.calls.clear()
    state.forget_cache()


def _require_hook(pipe_or_model: Any) -> ExitScheduleHook:
    model, _ = _resolve(pipe_or_model)
    hook = _schedule_hook(model)
    if hook is None:
        raise ValueError(f"No exit schedule is applied to this {type(model).__name__}; call `apply_exit_schedule`.")
    return hook
