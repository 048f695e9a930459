"""Apply an `ExitSchedule` to a denoiser as diffusers hooks (the pattern of `diffusers.hooks.apply_first_block_cache`).

`apply_exit_schedule` registers one hook on the denoiser, which reads the timestep from the denoiser's own forward
arguments and decides the depth of that call, and one hook on each skippable unit, which runs the unit or returns its
skip output. No pipeline cooperation is needed: a classifier-free-guidance batch, whose conditional and unconditional
halves share one call and one timestep, gets one depth. A batch whose samples carry different timesteps gets a depth
per sample: units are run up to the deepest sample and samples past their own depth keep their skip output. The
timestep is converted from what the model receives to the pipeline scheduler's timestep (`TimestepConvention`: Flux
receives `t / 1000`, Z-Image `(1000 - t) / 1000`), so a schedule always reads `s = t / num_train_timesteps` with
1 = noise, and a plan's steps are the scheduler's timesteps.

On a pipeline, every denoiser it holds gets the hooks: Wan 2.2's `transformer` (high noise) and `transformer_2` (low
noise) follow one schedule or plan over the whole trajectory and share one record (`get_exit_stats`).

The decision is made once per denoiser call, from the timestep, so nothing carries over from one call or one run to
the next except the record of what ran -- and, under a plan with `REUSE` steps, the work of the last computed call of
each *branch*, which a reuse call of that branch takes instead of running any unit (see `ExitArchitecture.reuse`). A
branch is one of the calls a pipeline makes per step: the name of diffusers' `cache_context` around the call (`"cond"`,
`"uncond"`: Flux's and Qwen-Image's true CFG, Wan's CFG), or without one, the call's place among the calls at the same
timestep; and each denoiser has its own branches (a reuse step with nothing cached for its denoiser and branch, such as
Wan 2.2's first low-noise step, or whose input changed shape, runs at full depth). The cached work is dropped when a
call's timestep is higher than the last one (a new sampling run) and by `reset_exit_stats`. `remove_exit_schedule`
restores the original forwards, and with them bit-identical outputs.

Host reads: applied to a pipeline, none inside a denoiser call. The hooks follow the pipeline's scheduler on the host
(`scheduler_steps.track_scheduler`: its timesteps are copied once per pipeline call, when it makes them, and each
solver step moves the run on), so a call's timestep is known without reading the tensor the model is handed; that
tensor is read after the run (`get_exit_stats`, or the next run's start), all calls at once, to check it. (Schedulers
without a `begin_index`, DDIM, DDPM and PNDM, cost one read at the first call of a run, to find the step it starts
at: their image-to-image pipelines slice the timesteps themselves.) Applied to
a bare denoiser (or on a scheduler set after the schedule, on a stock pipeline), the timestep is read on the host once
per call (none when it already lives on the CPU), after per-token timesteps are reduced per sample on the device.
"""

from __future__ import annotations

import contextlib
import dataclasses
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import torch
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.hooks.hooks import BaseState, StateManager
from diffusers.utils import BaseOutput

from ..schedules import DROP, ExitSchedule, describe_action, reuses_work
from ..schedules.exit_schedule import PLAN_TIMESTEP_TOLERANCE
from ..validation import as_flag, as_int
from .architectures import ExitArchitecture, TimestepConvention, _argument, get_exit_architecture
from .scheduler_steps import (
    SchedulerSteps,
    check_scheduler_steps_over,
    noisiest,
    release_scheduler,
    track_scheduler,
    tracked_steps,
)

_SCHEDULE_HOOK = "ee_exit_schedule"
_UNIT_HOOK = "ee_exit_unit"
UNCERTAINTY_HOOK = "ee_uncertainty_exit"  # the denoiser hook of `uncertainty.py`'s exits, which never share a model
# The pipeline attributes that hold a denoiser, in the order `denoiser_of` looks for one.
DENOISER_NAMES = ("transformer", "unet", "transformer_2")


@dataclasses.dataclass(frozen=True)
class ExitCall:
    """What one denoiser call ran: its timesteps and the depth of each, how many units actually executed, and which
    branch and denoiser made it.

    `timesteps` and `depths` have one entry per timestep value the denoiser received: one per sample when the
    pipeline passes a batch of timesteps (DiT, PixArt, SD3, Flux, Wan, ...), a single one when it passes a scalar (the
    U-Nets). Timesteps are the pipeline scheduler's (`t`), whatever the model receives (Flux's `t / 1000`).
    `branch` is the name of diffusers' `cache_context` around the call (`"cond"`, `"uncond"`), or without one the
    call's place among the calls at its timestep (0, 1, ...); `denoiser` is the pipeline attribute of the denoiser
    (`"transformer"`, `"transformer_2"`), `None` for a bare model.
    """

    timesteps: tuple[float, ...]
    depths: tuple[int, ...]
    units_executed: int
    branch: str | int = 0
    denoiser: str | None = None


@dataclasses.dataclass
class ExitStats:
    """The record of every denoiser call since the schedule was applied or the stats were reset.

    `steps_run` and `steps_dropped` count the solver steps of the runs made meanwhile that the pipeline's scheduler
    took and that a plan's `DROP` made it step over (both 0 on a bare denoiser, whose runs nothing follows): a dropped
    step makes no call, and counts as calls that ran no block.
    """

    num_blocks: int
    calls: list[ExitCall] = dataclasses.field(default_factory=list)
    steps_run: int = 0
    steps_dropped: int = 0

    @property
    def blocks_per_call(self) -> list[int]:
        """Units executed in each call, in call order."""
        return [call.units_executed for call in self.calls]

    @property
    def block_fraction(self) -> float:
        """Executed units over the units the same runs at full depth, without dropped steps, would have executed (1.0
        when nothing ran yet): a dropped step's calls are as many as a step's that ran."""
        if not self.calls:
            return 1.0
        full_calls = len(self.calls)
        if self.steps_dropped and self.steps_run:
            full_calls *= (self.steps_run + self.steps_dropped) / self.steps_run
        return sum(self.blocks_per_call) / (full_calls * self.num_blocks)


class _ExitState:
    """The decision of the denoiser call in flight, shared by the schedule hooks (one per denoiser) and their unit
    hooks, and the work a plan's reuse steps take (`cache`: per `(denoiser, branch)`, the input signature of the call
    that made it and its work)."""

    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self.stats = ExitStats(num_blocks=num_blocks)
        # per (denoiser, branch): the input signature of the call that made the work, and the work (the whole output;
        # or, per block index `k` a cached tail starts at, the change across the blocks from `k` on)
        self.cache: dict[tuple[int, str | int], tuple[Any, Any]] = {}
        self.last_timestep: float | None = None
        self.calls_in_step = 0  # calls made so far at `last_timestep`, less one
        self.tracked: weakref.ref | None = None  # the pipeline scheduler whose runs the hooks follow
        self.end_call()

    def end_call(self) -> None:
        """Forget the call in flight (its depths, its residual start, ...)."""
        self.depths: list[int] | None = None
        self.max_depth = self.min_depth = self.num_blocks
        self.device_depths: dict[torch.device, torch.Tensor] = {}  # `depths`, sent to each device once per call
        self.timesteps: tuple[float, ...] = ()
        self.units_executed = 0
        self.key: tuple[int, str | int] = (0, 0)
        self.signature: Any = None
        self.reusing = False
        self.tail_start = 0  # in a reuse call: the units before it run, the cached change of the rest is added
        self.applied = False  # a reuse call's cached residual reached its last unit
        self.starts: dict[int, Any] = {}  # skip outputs, at the units a cached tail starts at, in this call

    def depths_on(self, device: torch.device) -> torch.Tensor:
        """The call's depth per sample as a tensor on `device` (sent once per call, without waiting for the device)."""
        if device not in self.device_depths:
            self.device_depths[device] = on_device(self.depths, device)
        return self.device_depths[device]

    def forget(self) -> None:
        """Forget the cached work and where the sampling run was."""
        self.cache.clear()
        self.last_timestep, self.calls_in_step = None, 0


class _NoState(BaseState):
    def reset(self, *args: Any, **kwargs: Any) -> None:
        pass


class _BranchName(StateManager):
    """The name of diffusers' `cache_context` around the call in flight (`"cond"`, `"uncond"`), or `None`.

    A pipeline's `with transformer.cache_context(name)` hands its context to every `StateManager` of a stateful hook
    on the model (`diffusers.hooks.hooks._set_cache_context`); this one keeps the name only.
    """

    def __init__(self) -> None:
        super().__init__(_NoState)
        self.name: str | None = None

    def set_context(self, context: Any) -> None:
        super().set_context(context)
        self.name = None if context is None else getattr(context, "name", context)


class ExitScheduleHook(ModelHook):
    """Decides each call's depth from the timestep argument of the denoiser's forward."""

    _is_stateful = True  # so that diffusers' `cache_context` reaches `branch_name`

    def __init__(
        self,
        schedule: ExitSchedule,
        architecture: ExitArchitecture,
        state: _ExitState,
        num_train_timesteps: int,
        plan_steps_only: bool = True,
        convention: TimestepConvention | None = None,
        denoiser: int = 0,
        denoiser_name: str | None = None,
        scheduler_of: Callable[[], Any] | None = None,
    ) -> None:
        super().__init__()
        self.schedule = schedule
        self.architecture = architecture
        self.state = state
        self.num_train_timesteps = num_train_timesteps
        self.plan_steps_only = plan_steps_only
        self.convention = convention or TimestepConvention()
        self.denoiser, self.denoiser_name = denoiser, denoiser_name
        self.scheduler_of = scheduler_of  # the pipeline's scheduler now, when the hooks were put on through a pipeline
        self.branch_name = _BranchName()

    def pre_forward(self, module: torch.nn.Module, *args, **kwargs) -> tuple[tuple, dict]:
        timesteps = self.scheduler_timesteps(module, args, kwargs)
        if self.plan_steps_only:
            self.schedule.check_timesteps(set(timesteps), self.num_train_timesteps)
        depths = self.schedule.depths_for(timesteps, self.num_train_timesteps)
        if DROP in depths:
            raise ValueError(
                f"{type(module).__name__} was called at timestep {max(timesteps):g}, a step the plan drops: the "
                "pipeline's scheduler should have stepped over it. Apply the plan to the pipeline, after setting its "
                "scheduler (`apply_exit_schedule(pipe, plan)`), not to its denoiser alone."
            )
        runs_all_units = self.architecture.runs_all_units
        if runs_all_units is not None and runs_all_units(args, kwargs):
            depths = [self.state.num_blocks] * len(depths)
        state = self.state
        state.end_call()
        state.key = (self.denoiser, self._branch(max(timesteps)))
        if self.schedule.reuses:
            depths = self._reuse_or_compute(module, args, kwargs, timesteps, depths)
        state.depths, state.max_depth, state.min_depth = depths, max(depths), min(depths)
        state.timesteps = tuple(timesteps)
        return args, kwargs

    def scheduler_timesteps(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> list[float]:
        """The call's timesteps, one per sample, as the pipeline scheduler's `t`: the step its tracked scheduler is
        at (no host read; what the model was handed is checked after the run), or else read from the timestep
        argument (one host read), where under a plan a half-precision one is taken as the plan's step it was rounded
        from (`_snap_to_plan`)."""
        timestep = _argument(module, self.architecture.timestep_argument, args, kwargs)
        if timestep is None:
            raise ValueError(f"{type(module).__name__} was called with `timestep=None`; an exit schedule needs it.")
        steps = self._steps()
        t = None if steps is None else steps.current(lambda: max(self._read_scheduler_timesteps(timestep)[0]))
        if t is not None:
            timestep = torch.as_tensor(timestep)
            eps = torch.finfo(timestep.dtype).eps if timestep.dtype.is_floating_point else 0.0
            rounding = 2 * self._rounding(self.convention.to_model(t), eps)
            bound = max(PLAN_TIMESTEP_TOLERANCE * self.num_train_timesteps, rounding)
            steps.record(timestep, t, bound, self.convention.to_scheduler)
            return [t] * (timestep.shape[0] if timestep.ndim else 1)
        timesteps, values, dtype = self._read_scheduler_timesteps(timestep)
        if self.schedule.config.shape == "plan" and dtype.is_floating_point:
            eps = torch.finfo(dtype).eps
            if eps > torch.finfo(torch.float32).eps:
                timesteps = self._snap_to_plan(timesteps, values, eps)
        return timesteps

    def _read_scheduler_timesteps(self, timestep: Any) -> tuple[list[float], list[float], torch.dtype]:
        """The timestep argument read on the host: as the scheduler's `t`, as the model received it, and its dtype."""
        values, dtype = _read_timesteps(timestep)
        return [self.convention.to_scheduler(value) for value in values], values, dtype

    def _steps(self) -> SchedulerSteps | None:
        """The host record of the pipeline scheduler's run, while that scheduler is the tracked one."""
        scheduler = None if self.scheduler_of is None else self.scheduler_of()
        return tracked_steps(scheduler)

    def _snap_to_plan(self, timesteps: list[float], values: list[float], eps: float) -> list[float]:
        """A timestep that reached the model in half precision (Flux's and HunyuanVideo's pipelines cast it to the
        latents' dtype) is the plan's nearest step when it lies within that dtype's rounding of it."""
        config = self.schedule.config
        steps = [step * self.num_train_timesteps / config.num_train_timesteps for step in config.timesteps]
        snapped = []
        for t, value in zip(timesteps, values):
            nearest = min(steps, key=lambda step: abs(step - t))
            snapped.append(nearest if abs(nearest - t) <= self._rounding(value, eps) else t)
        return snapped

    def _rounding(self, value: float, eps: float) -> float:
        """How far from the scheduler's `t` a model's timestep `value`, rounded to a dtype of machine epsilon `eps`,
        may lie, in the scheduler's units."""
        return eps * self.convention.divisor * max(abs(value), 1.0)

    def _branch(self, timestep: float) -> str | int:
        """The branch of the call in flight; a timestep above the last one starts a new run (the cache is dropped)."""
        state = self.state
        if state.last_timestep is not None and timestep > state.last_timestep:
            state.forget()
        same_step = state.last_timestep is not None and timestep == state.last_timestep
        state.calls_in_step = state.calls_in_step + 1 if same_step else 0
        state.last_timestep = timestep
        name = self.branch_name.name
        return state.calls_in_step if name is None else name

    def _reuse_or_compute(
        self, module: torch.nn.Module, args: tuple, kwargs: dict, timesteps: list[float], depths: list[int]
    ) -> list[int]:
        """Under a plan: whether this call reuses (every sample at one `REUSE` or cached-tail step, and work cached for
        its denoiser, branch and input shape), and the depths it runs (the tail's first blocks; a reuse step with
        nothing to reuse runs at full depth)."""
        state = self.state
        state.signature = _layout(_argument(module, self.architecture.sample_argument, args, kwargs))
        if not any(reuses_work(depth) for depth in depths):
            state.cache.pop(state.key, None)  # this call makes the branch's work anew
            return depths
        if len(set(depths)) != 1:
            raise ValueError(
                f"This call's timesteps {timesteps} mix the plan's actions "
                f"{sorted(set(map(describe_action, depths)))}; a step that reuses work needs the whole batch at it."
            )
        cached = state.cache.get(state.key)
        if cached is None or cached[0] != state.signature:
            state.cache.pop(state.key, None)
            return [state.num_blocks] * len(depths)
        state.reusing, state.tail_start = True, -depths[0]
        return [state.tail_start] * len(depths)

    def new_forward(self, module: torch.nn.Module, *args, **kwargs) -> Any:
        state = self.state
        whole_output = self.architecture.reuse == "output" and self.schedule.reuses
        if whole_output and state.reusing:
            return state.cache[state.key][1]
        output = self.fn_ref.original_forward(*args, **kwargs)
        if whole_output:
            state.cache[state.key] = (state.signature, output)
        return output

    def post_forward(self, module: torch.nn.Module, output: Any) -> Any:
        state = self.state
        missed = state.reusing and self.architecture.reuse == "residual" and not state.applied
        state.stats.calls.append(
            ExitCall(state.timesteps, tuple(state.depths), state.units_executed, state.key[1], self.denoiser_name)
        )
        state.end_call()
        if missed:
            raise RuntimeError(
                f"{type(module).__name__}'s last exit unit was not called in a reuse call (a `skip_layers` that "
                "names it?): the cached residual could not be added. Run that call without reuse."
            )
        return output

    def reset_state(self, module: torch.nn.Module) -> torch.nn.Module:
        """diffusers' reset of stateful hooks: forget the cached work."""
        self.state.forget()
        return module


class ExitUnitHook(ModelHook):
    """Runs unit `index` of the denoiser, or returns its skip output when the call's depth does not reach it.

    Under a plan whose reuse is `"residual"`, each unit a cached tail starts at (the first unit for `REUSE`, unit `k`
    for `cached_tail(k)`) records its skip output (the span's start) and the last unit the change across each span
    (its output minus the start, carried to it by the architecture's `bridge` where the streams are joined between);
    at a reuse call the units before the tail run, the others are skipped, and the last one adds its branch's cached
    change across the tail to what it receives.
    """

    def __init__(
        self,
        index: int,
        architecture: ExitArchitecture,
        state: _ExitState,
        last: bool,
        residual: bool,
        bridge: Callable[[Any], Any] | None = None,
        tail_starts: tuple[int, ...] = (0,),
    ) -> None:
        super().__init__()
        self.index = index
        self.skip = architecture.skip
        self.state = state
        self.last = last
        self.residual = residual  # record the span's residual (a plan with reuse steps, on a residual architecture)
        self.bridge = bridge
        self.starts_tail = index in tail_starts
        self.tail_starts = tail_starts

    def new_forward(self, module: torch.nn.Module, *args, **kwargs) -> Any:
        state = self.state
        if state.depths is None:  # the unit was called on its own, outside a denoiser call
            return self.fn_ref.original_forward(*args, **kwargs)
        if not self.residual:
            return self._run_or_skip(module, args, kwargs)
        if state.reusing:
            if self.index < state.tail_start:
                return self._run_or_skip(module, args, kwargs)
            skipped = self.skip(module, args, kwargs)
            if not self.last:
                return skipped
            state.applied = True
            return _zip_map(torch.add, skipped, state.cache[state.key][1][state.tail_start])
        if self.starts_tail:
            state.starts[self.index] = self.skip(module, args, kwargs)
        output = self._run_or_skip(module, args, kwargs)
        if self.last and len(state.starts) == len(self.tail_starts):
            changes = {
                k: _zip_map(torch.sub, output, self._bridged(start, output)) for k, start in state.starts.items()
            }
            state.cache[state.key] = (state.signature, changes)
        return output

    def _bridged(self, start: Any, output: Any) -> Any:
        """A span's start as the last unit's output is laid out: through the architecture's `bridge` when it is laid
        out otherwise (the two streams of a double-stream block, before the model joins them)."""
        if self.bridge is None or _layout(start) == _layout(output):
            return start
        return self.bridge(start)

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
        return _zip_map(
            lambda ran, kept: torch.where(
                (state.depths_on(ran.device) > self.index).view(-1, *([1] * (ran.ndim - 1))), ran, kept
            ),
            output,
            skipped,
        )


def _layout(output: Any) -> Any:
    """The structure and shapes of a unit's output, or of a denoiser's sample argument (a tensor, or Z-Image's list
    of per-sample tensors): reused work is only added to an input laid out as the one it was made for."""
    if isinstance(output, torch.Tensor):
        return tuple(output.shape)
    if isinstance(output, (list, tuple)):
        return type(output), tuple(_layout(item) for item in output)
    if isinstance(output, BaseOutput):
        return type(output), tuple((key, _layout(value)) for key, value in output.items())
    return None


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


def on_device(values: list[int], device: torch.device) -> torch.Tensor:
    """Integers decided on the host (depths, sample indices) as a tensor on `device`, sent without waiting for the
    device's queue (through pinned memory on CUDA)."""
    tensor = torch.tensor(values, dtype=torch.long)
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def _named_denoisers(pipe_or_model: Any) -> list[tuple[str | None, torch.nn.Module]]:
    """`(attribute, module)` of each denoiser: the model itself (attribute `None`), or a pipeline's."""
    if isinstance(pipe_or_model, torch.nn.Module):
        return [(None, pipe_or_model)]
    found = []
    for name in DENOISER_NAMES:
        denoiser = getattr(pipe_or_model, name, None)
        if isinstance(denoiser, torch.nn.Module):
            found.append((name, denoiser))
    return found


def denoisers_of(pipe_or_model: Any) -> list[torch.nn.Module]:
    """Every module exit hooks go on: the model itself, or each of a pipeline's `transformer`, `unet` and
    `transformer_2` (Wan 2.2's low-noise expert) that is set."""
    return [denoiser for _, denoiser in _named_denoisers(pipe_or_model)]


def denoiser_of(pipe_or_model: Any) -> torch.nn.Module | None:
    """The module exit hooks go on: the model itself, or a pipeline's `transformer` or `unet` (or `transformer_2`
    when it holds only that one); `None` without one. `denoisers_of` lists them all."""
    denoisers = denoisers_of(pipe_or_model)
    return denoisers[0] if denoisers else None


def _resolve_all(pipe_or_model: Any) -> tuple[list[tuple[str | None, torch.nn.Module]], int]:
    """The denoisers of a pipeline (or the model itself) and the training timestep count to normalise with."""
    denoisers = _named_denoisers(pipe_or_model)
    if not denoisers:
        raise TypeError(
            "Expected a denoiser model or a diffusers pipeline with a "
            f"{' or '.join(f'`{name}`' for name in DENOISER_NAMES)}, got {type(pipe_or_model).__name__}."
        )
    if isinstance(pipe_or_model, torch.nn.Module):
        return denoisers, 1000
    scheduler = getattr(pipe_or_model, "scheduler", None)
    num_train_timesteps = getattr(getattr(scheduler, "config", None), "num_train_timesteps", None) or 1000
    return denoisers, int(num_train_timesteps)


def _resolve(pipe_or_model: Any) -> tuple[torch.nn.Module, int]:
    """The (first) denoiser of a pipeline (or the model itself) and the training timestep count to normalise with."""
    denoisers, num_train_timesteps = _resolve_all(pipe_or_model)
    return denoisers[0][1], num_train_timesteps


def _schedule_hook(model: torch.nn.Module) -> ExitScheduleHook | None:
    registry = getattr(model, "_diffusers_hook", None)
    return None if registry is None else registry.get_hook(_SCHEDULE_HOOK)


def exit_units(pipe_or_model: Any) -> list[torch.nn.Module]:
    """The units an exit schedule counts as blocks for this denoiser (a pipeline's first), in execution order."""
    model, _ = _resolve(pipe_or_model)
    return get_exit_architecture(model).units(model)


def num_exit_blocks(pipe_or_model: Any) -> int:
    """The `num_blocks` an `ExitSchedule` must have to apply to this denoiser."""
    return len(exit_units(pipe_or_model))


def _read_timesteps(timestep: Any) -> tuple[list[float], torch.dtype]:
    """A denoiser's timestep argument as one value per sample (one host read; per-token timesteps, Wan 2.2 TI2V's and
    LTX's conditioning, give each sample its noisiest token's), and the dtype it came in."""
    tensor = noisiest(timestep).detach()
    return tensor.float().tolist(), tensor.dtype


def scheduler_timesteps(model: torch.nn.Module, args: tuple, kwargs: dict) -> list[float]:
    """The pipeline scheduler's timesteps of one call `model(*args, **kwargs)` of a supported denoiser, one per
    sample, whatever the model receives (Flux's `t / 1000`, Z-Image's `(1000 - t) / 1000`): what a plan's steps are
    made of, for code that watches a denoiser's calls with its own torch hooks (a calibrator recording the steps)."""
    architecture = get_exit_architecture(model)
    timestep = _argument(model, architecture.timestep_argument, args, kwargs)
    if timestep is None:
        raise ValueError(f"{type(model).__name__} was called with `timestep=None`.")
    convention = architecture.convention_of(model)
    return [convention.to_scheduler(value) for value in _read_timesteps(timestep)[0]]


def apply_exit_schedule(
    pipe_or_model: Any, schedule: ExitSchedule, num_train_timesteps: int | None = None, plan_steps_only: bool = True
) -> None:
    """Make a denoiser run `schedule.blocks_at(t)` of its blocks at timestep `t`.

    Args:
        pipe_or_model: A supported denoiser (see `register_exit_architecture`) or a diffusers pipeline holding one as
            `transformer` or `unet` -- any stock pipeline of a supported denoiser, no drop-in class needed. A
            pipeline's `transformer_2` (Wan 2.2) gets the same schedule: one plan covers the whole trajectory across
            both experts. A schedule already applied is replaced.
        schedule: The exit schedule; its `num_blocks` must equal `num_exit_blocks(pipe_or_model)`.
        num_train_timesteps: Scale of the pipeline scheduler's timesteps. Defaults to the pipeline scheduler's
            `num_train_timesteps`, or 1000 for a bare model.
        plan_steps_only: Under a plan, refuse a call whose timestep is not one of the plan's steps (a run of another
            scheduler or step count); `False` takes the nearest step's action (ASE fine-tuning at random timesteps).

    Example:
        ```python
        >>> pipe = FluxPipeline.from_pretrained("black-forest-labs/FLUX.1-dev", torch_dtype=torch.bfloat16)
        >>> apply_exit_schedule(pipe, ExitSchedule.linear(num_blocks=num_exit_blocks(pipe), min_blocks=40))
        >>> image = pipe("a cat", num_inference_steps=28).images[0]
        >>> get_exit_stats(pipe).block_fraction
        ```
    """
    if not isinstance(schedule, ExitSchedule):
        raise TypeError(f"`schedule` must be an ExitSchedule, got {type(schedule).__name__}.")
    plan_steps_only = as_flag("plan_steps_only", plan_steps_only)
    denoisers, timestep_scale = _resolve_all(pipe_or_model)
    if num_train_timesteps is not None:
        timestep_scale = as_int("num_train_timesteps", num_train_timesteps, low=1)
    planned = []
    for name, model in denoisers:
        registry = getattr(model, "_diffusers_hook", None)
        if registry is not None and registry.get_hook(UNCERTAINTY_HOOK) is not None:
            raise ValueError(
                f"This {type(model).__name__} carries uncertainty exits; remove them (`remove_uncertainty_exit`) "
                "before applying an exit schedule: one decides each call's depth ahead of time, the other at run time."
            )
        schedule.check_denoiser(model)
        architecture = get_exit_architecture(model)
        units = architecture.units(model)
        if schedule.config.num_blocks != len(units):
            where = f"this {type(model).__name__}" + ("" if name is None else f" (`{name}`)")
            raise ValueError(
                f"The schedule is for num_blocks={schedule.config.num_blocks}, but {where} has {len(units)} skippable "
                f"blocks; build the schedule with num_blocks={len(units)}."
            )
        planned.append((name, model, architecture, units))
    tail_starts = schedule.tail_starts
    if any(tail_starts) and any(architecture.reuse != "residual" for _, _, architecture, _ in planned):
        raise ValueError(
            "The plan has cached-tail steps, which add the change across the last blocks; the decoder units of "
            f"{', '.join(type(model).__name__ for _, model, _, _ in planned)} change shape, so only whole-step "
            "`REUSE` applies to them."
        )
    scheduler = _scheduler_to_track(pipe_or_model, schedule, plan_steps_only)
    scheduler_of = None
    if scheduler is not None:
        pipe = weakref.ref(pipe_or_model)
        scheduler_of = lambda: getattr(pipe(), "scheduler", None)  # noqa: E731
    for _, model, _, _ in planned:
        _remove_hooks(model)
    state = _ExitState(schedule.config.num_blocks)
    residual = schedule.reuses
    for index, (name, model, architecture, units) in enumerate(planned):
        convention = architecture.convention_of(model)
        registry = HookRegistry.check_if_exists_or_initialize(model)
        registry.register_hook(
            ExitScheduleHook(
                schedule, architecture, state, timestep_scale, plan_steps_only, convention, index, name, scheduler_of
            ),
            _SCHEDULE_HOOK,
        )
        bridge = None if architecture.bridge is None else _bound(architecture.bridge, model)
        for i, unit in enumerate(units):
            HookRegistry.check_if_exists_or_initialize(unit).register_hook(
                ExitUnitHook(
                    i,
                    architecture,
                    state,
                    last=i == len(units) - 1,
                    residual=residual and architecture.reuse == "residual",
                    bridge=bridge,
                    tail_starts=tail_starts,
                ),
                _UNIT_HOOK,
            )
        registry.invalidate_child_registries_cache()
    if scheduler is not None:
        track_scheduler(scheduler, schedule, timestep_scale, state.stats)
        state.tracked = weakref.ref(scheduler)
    _keep_pipeline_component(pipe_or_model, schedule)


def _scheduler_to_track(pipe_or_model: Any, schedule: ExitSchedule, plan_steps_only: bool) -> Any:
    """The pipeline's scheduler, whose runs the hooks follow on the host (`None` for a bare model), checked before any
    hook is put on: a plan that drops steps needs one that can step over them, and needs the pipeline, except to train
    (where the denoiser is called at any timestep and the trainer leaves the dropped ones out)."""
    scheduler = None if isinstance(pipe_or_model, torch.nn.Module) else getattr(pipe_or_model, "scheduler", None)
    if scheduler is None or not callable(getattr(scheduler, "set_timesteps", None)):
        if schedule.drops and plan_steps_only:
            raise ValueError(
                "The plan drops steps, which the pipeline's scheduler steps over: apply it to the pipeline "
                f"(`apply_exit_schedule(pipe, plan)`), not to its {type(pipe_or_model).__name__} alone."
            )
        return None
    if schedule.drops:
        check_scheduler_steps_over(scheduler)
    return scheduler


def _bound(bridge: Callable[[torch.nn.Module, Any], Any], model: torch.nn.Module) -> Callable[[Any], Any]:
    return lambda start: bridge(model, start)


def _remove_hooks(model: torch.nn.Module) -> None:
    """Take the exit hooks off `model`, and the tracking off the pipeline scheduler they followed (the scheduler would
    go on stepping over a plan's dropped steps)."""
    hook = _schedule_hook(model)
    if hook is None:
        return
    if hook.state.tracked is not None:
        release_scheduler(hook.state.tracked())
    registry = HookRegistry.check_if_exists_or_initialize(model)
    registry.remove_hook(_SCHEDULE_HOOK, recurse=False)
    registry.remove_hook(_UNIT_HOOK, recurse=True)
    registry.invalidate_child_registries_cache()


def remove_exit_schedule(pipe_or_model: Any) -> None:
    """Remove the exit hooks from the denoiser (every denoiser of a pipeline), restoring the original forwards (a
    no-op when none is applied)."""
    denoisers, _ = _resolve_all(pipe_or_model)
    _keep_pipeline_component(pipe_or_model, None)
    for _, model in denoisers:
        _remove_hooks(model)


def _keep_pipeline_component(pipe_or_model: Any, schedule: ExitSchedule | None) -> None:
    """A pipeline that carries an `exit_schedule` component (the drop-in ones) records what its hooks apply."""
    config = getattr(pipe_or_model, "config", None)
    if not isinstance(pipe_or_model, torch.nn.Module) and config is not None and "exit_schedule" in config:
        pipe_or_model.register_modules(exit_schedule=schedule)


def _schedule_hooks(pipe_or_model: Any) -> list[ExitScheduleHook]:
    denoisers, _ = _resolve_all(pipe_or_model)
    return [hook for _, model in denoisers if (hook := _schedule_hook(model)) is not None]


def get_exit_schedule(pipe_or_model: Any) -> ExitSchedule | None:
    """The schedule applied to this denoiser (a pipeline's), or `None`."""
    hooks = _schedule_hooks(pipe_or_model)
    return hooks[0].schedule if hooks else None


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
    num_train_timesteps = as_int("num_train_timesteps", num_train_timesteps, low=1)
    _require_hook(pipe_or_model)
    for hook in _schedule_hooks(pipe_or_model):
        hook.num_train_timesteps = num_train_timesteps


def get_exit_stats(pipe_or_model: Any) -> ExitStats:
    """A copy of what the exit hooks executed: per denoiser call (of every denoiser of a pipeline, in call order),
    the timesteps, depths, units run and branch."""
    _check_tracked_calls(pipe_or_model)
    stats = _require_hook(pipe_or_model).state.stats
    return dataclasses.replace(stats, calls=list(stats.calls))


def _check_tracked_calls(pipe_or_model: Any) -> None:
    """Check that the calls whose timestep was taken from the tracked scheduler were handed that timestep."""
    for hook in _schedule_hooks(pipe_or_model):
        steps = hook._steps()
        if steps is not None:
            steps.check()


def reset_exit_stats(pipe_or_model: Any) -> None:
    """Forget the recorded calls, and the work a plan's reuse steps would take (the drop-in pipelines do this at the
    start of every `__call__`)."""
    _require_hook(pipe_or_model)
    _check_tracked_calls(pipe_or_model)
    for state in {id(hook.state): hook.state for hook in _schedule_hooks(pipe_or_model)}.values():
        state.stats.calls.clear()
        state.stats.steps_run = state.stats.steps_dropped = 0
        state.forget()


def _require_hook(pipe_or_model: Any) -> ExitScheduleHook:
    hooks = _schedule_hooks(pipe_or_model)
    if not hooks:
        model, _ = _resolve(pipe_or_model)
        raise ValueError(f"No exit schedule is applied to this {type(model).__name__}; call `apply_exit_schedule`.")
    return hooks[0]
