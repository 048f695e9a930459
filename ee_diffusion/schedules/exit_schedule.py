"""`ExitSchedule`: how many denoiser blocks to run at each timestep (the ASE exit schedule), or what to do at each step
of one sampling run (a plan): run the first blocks, reuse the last computed step's work for some or all of them, or
drop the step."""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from diffusers import SchedulerMixin
from diffusers.configuration_utils import ConfigMixin, register_to_config

from ..outputs import refuse_shipped
from ..validation import as_flag, as_int, as_number

SHAPES = ("constant", "linear", "cosine", "step", "table", "plan")
REUSE = 0  # a plan's action for a step that runs no block and reuses the last computed step's work
DROP = "drop"  # a plan's action for a step the denoiser is not called at: the solver steps over it
# How far (a share of `num_train_timesteps`) a timestep may lie from a plan's step and still be that step: float noise
# in sigma x 1000 timesteps, never a neighbouring step of another step count.
PLAN_TIMESTEP_TOLERANCE = 1e-4


def cached_tail(blocks: int) -> int:
    """A plan's action for a step that runs its first `blocks` blocks and adds the last computed step's change across
    the others (DBCache's shape: the first blocks see this step's input, the tail's work is reused). Written `-blocks`
    in a plan; `REUSE` is the tail of every block, `cached_tail(0)`."""
    blocks = as_int("blocks", blocks, low=0)
    return -blocks


def action_blocks(action: int | str) -> int:
    """The blocks a plan's action runs: a depth's own count, a cached tail's first blocks, none for `REUSE` and
    `DROP`."""
    if action == DROP:
        return 0
    return abs(action)


def reuses_work(action: int | str) -> bool:
    """Whether an action takes the last computed step's work: `REUSE` and the cached tails."""
    return action != DROP and action <= 0


def describe_action(action: int | str) -> str:
    """An action as the command line prints it: `8`, `reuse`, `tail:2`, `drop`."""
    if action == DROP:
        return "drop"
    if action == REUSE:
        return "reuse"
    return f"tail:{-action}" if action < 0 else str(action)


def _as_float_list(timesteps: float | Iterable[float] | torch.Tensor, name: str = "timesteps") -> list[float]:
    """Timesteps (a number, a sequence or a tensor of any shape, read flat) as finite Python floats; else a
    `TypeError` or `ValueError` naming `name`."""
    if isinstance(timesteps, torch.Tensor):
        values = timesteps.detach().reshape(-1).cpu().tolist()
    elif isinstance(timesteps, numbers.Real) and not isinstance(timesteps, bool):
        values = [timesteps]
    elif isinstance(timesteps, Iterable) and not isinstance(timesteps, (str, bytes)):
        values = list(timesteps)
    else:
        raise TypeError(f"`{name}` must be a number, a sequence of numbers or a tensor, got {timesteps!r}.")
    if not all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in values):
        raise TypeError(f"`{name}` must hold numbers, got {values!r}.")
    floats = [float(v) for v in values]
    if not all(math.isfinite(v) for v in floats):
        raise ValueError(f"`{name}` must be finite numbers, got {floats}.")
    return floats


def _as_int_list(name: str, values: Any) -> list[Any]:
    """A sequence argument (`table`, `depths`, `actions`) as a list; a `TypeError` naming it when it is not one."""
    if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
        raise TypeError(f"`{name}` must be a sequence of integers, got {values!r}.")
    return list(values)


def _sorted_points(
    timesteps: Sequence[float] | torch.Tensor, values: Sequence[int], name: str
) -> tuple[list[float], list[int]]:
    """`(timesteps, values)` as parallel lists sorted by timestep, each value an integer."""
    timesteps = _as_float_list(timesteps)
    values = _as_int_list(name, values)
    if len(timesteps) != len(values):
        raise ValueError(
            f"`timesteps` and `{name}` must have the same length, got {len(timesteps)} and {len(values)}."
        )
    values = [value if value == DROP and name == "actions" else as_int(name, value) for value in values]
    points = sorted(zip(timesteps, values), key=lambda point: point[0])
    return [t for t, _ in points], [value for _, value in points]


def _parse_spec(spec: str) -> tuple[str, list[int | float]]:
    """`(shape, depths)` of a command-line schedule, each depth a block count (int >= 1) or a fraction of the model's
    blocks (float in (0, 1]); `("folder", [])` for a folder, whose `exit_schedule.json` is read to check it."""
    if os.path.isdir(spec):
        ExitSchedule.from_pretrained(spec)
        return "folder", []
    shape, _, value = spec.partition(":")
    if shape not in ("linear", "cosine", "constant", "step") or not value or (shape != "step" and "," in value):
        raise ValueError(
            f"Bad exit schedule {spec!r}: expected linear:M, cosine:M, constant:M, step:d1,d2,... or a "
            "folder holding exit_schedule.json."
        )
    depths: list[int | float] = []
    for part in value.split(","):
        try:
            depth = float(part) if "." in part else int(part)
        except ValueError:
            raise ValueError(
                f"Bad exit schedule {spec!r}: {part!r} is not a depth (a block count, or a fraction of "
                "the model's blocks written with a '.')."
            ) from None
        if isinstance(depth, float) and not 0.0 < depth <= 1.0:
            raise ValueError(
                f"Bad exit schedule {spec!r}: a depth written as a fraction of the model's depth must "
                f"lie in (0, 1], got {part}."
            )
        if isinstance(depth, int) and depth < 1:
            raise ValueError(f"Bad exit schedule {spec!r}: a depth is at least 1 block, got {part}.")
        depths.append(depth)
    return shape, depths


class ExitSchedule(SchedulerMixin, ConfigMixin):
    r"""
    A time-dependent exit schedule: it maps a timestep to the number of denoiser blocks to run.

    The schedule is a function of the normalised position `s = t / num_train_timesteps` in `[0, 1]`, where `s = 0` is
    the clean-data end and `s = 1` is pure noise. Build one with a constructor (`constant`, `linear`, `cosine`, `step`,
    `from_table`, `plan`) rather than calling `__init__` directly.

    A *plan* (`ExitSchedule.plan`) is the per-step form, made for the timesteps of one sampling run (a scheduler and a
    step count): each step gets an action, one of
    - a depth `d` in `[1, num_blocks]`: run the first `d` blocks (the exit);
    - `REUSE` (0): run no block and reuse the last computed step's work (the block residual of transformers, as
      diffusers' FirstBlockCache and MagCache do; the whole prediction of U-Nets, whose decoder has no residual span);
    - `cached_tail(k)` (written `-k`, `0 < k < num_blocks`): run the first `k` blocks and add the last computed step's
      change across the rest (DBCache's shape; transformers only);
    - `DROP`: do not call the denoiser at this step; the solver goes from the step before straight to the step after,
      as it would in a run without that timestep (`apply_exit_schedule` makes the pipeline's scheduler skip it), so
      fewer steps is a plan too. It is the same class, so every consumer of a schedule (the hooks, the
    drop-in pipelines' `exit_schedule` component, `from_pretrained`, the bench's `ase:<folder>`, `finetune-ase`)
    takes a plan unchanged.

    It is a diffusers `ConfigMixin`, so `save_pretrained(dir)` writes `exit_schedule.json` and
    `ExitSchedule.from_pretrained(dir)` / `from_config` read it back. It also derives from `SchedulerMixin`, which is
    what lets a diffusers pipeline carry it as a component that `save_pretrained` writes and `from_pretrained`
    restores (diffusers only saves components whose class derives from one of its known base classes).

    Args:
        num_blocks (`int`): Number of skippable blocks of the denoiser the schedule is made for.
        shape (`str`): One of `"constant"`, `"linear"`, `"cosine"`, `"step"`, `"table"`, `"plan"`.
        min_blocks (`int`, *optional*): Depth at `s = 1` (`linear`, `cosine`) or everywhere (`constant`).
        table (`list[int]`, *optional*): Depths of equal-width buckets of `s`, from the data end to the noise end
            (`step`).
        timesteps (`list[float]`, *optional*): Increasing timesteps, in units of `num_train_timesteps` (`table`,
            `plan`).
        depths (`list[int]`, *optional*): The depth at each of `timesteps`. `table`: linearly interpolated in
            between and rounded up, held constant beyond the ends. `plan`: an action per step (a depth, `REUSE`, a
            cached tail or `DROP`); a timestep between steps takes the nearest step's.
        num_train_timesteps (`int`, defaults to 1000): Scale of `timesteps` in a `table` schedule or a plan.
        allow_increasing (`bool`, defaults to `False`): Accept a `step` or `table` schedule whose depth increases
            with noise. Without it such a table raises, since it is almost always a reversed table.
        scheduler_class (`str`, *optional*): A plan's scheduler, by class name (`DPMSolverMultistepScheduler`): the
            drop-in pipelines refuse to run the plan under another, or at another step count (`check_run`).
        denoiser_class (`str`, *optional*): A plan's denoiser, by class name (`DiTTransformer2DModel`): the plan is
            refused on a denoiser of another class (`check_denoiser`), whose blocks it was not measured on.
    """

    config_name = "exit_schedule.json"
    has_compatibles = False

    @register_to_config
    def __init__(
        self,
        num_blocks: int,
        shape: str = "constant",
        min_blocks: int | None = None,
        table: list[int] | None = None,
        timesteps: list[float] | None = None,
        depths: list[int] | None = None,
        num_train_timesteps: int = 1000,
        allow_increasing: bool = False,
        scheduler_class: str | None = None,
        denoiser_class: str | None = None,
    ):
        num_blocks = as_int("num_blocks", num_blocks, low=1)
        num_train_timesteps = as_int("num_train_timesteps", num_train_timesteps, low=1)
        allow_increasing = as_flag("allow_increasing", allow_increasing)
        if shape not in SHAPES:
            raise ValueError(f"`shape` must be one of {SHAPES}, got {shape!r}.")
        for name, value in (("scheduler_class", scheduler_class), ("denoiser_class", denoiser_class)):
            if value is not None and (shape != "plan" or not isinstance(value, str)):
                raise ValueError(
                    f"`{name}` is a plan's {name.split('_')[0]} class name, got {value!r} for a {shape!r} schedule."
                )
        # numpy / torch integers are accepted; the config (and its JSON) holds plain ints
        min_blocks = None if min_blocks is None else as_int("min_blocks", min_blocks)
        table = None if table is None else [as_int("table", depth) for depth in _as_int_list("table", table)]
        if depths is not None:
            depths = [
                depth if depth == DROP and shape == "plan" else as_int("depths", depth)
                for depth in _as_int_list("depths", depths)
            ]
        if timesteps is not None:
            timesteps = _as_float_list(timesteps)
        self.register_to_config(
            num_blocks=num_blocks,
            min_blocks=min_blocks,
            table=table,
            timesteps=timesteps,
            depths=depths,
            num_train_timesteps=num_train_timesteps,
        )

        if shape in ("constant", "linear", "cosine"):
            if min_blocks is None:
                raise ValueError(f"A {shape!r} schedule needs `min_blocks`.")
            self._check_depth("min_blocks", min_blocks, num_blocks)
        elif shape == "step":
            if not table:
                raise ValueError("A 'step' schedule needs a non-empty `table` of depths.")
            for depth in table:
                self._check_depth("table", depth, num_blocks)
            self._check_not_increasing("table", list(table), allow_increasing)
        else:
            if not timesteps or depths is None or len(timesteps) != len(depths):
                raise ValueError(
                    f"A {shape!r} schedule needs `timesteps` and `depths` of the same non-zero length, got "
                    f"{0 if not timesteps else len(timesteps)} timesteps and {0 if depths is None else len(depths)} "
                    "depths."
                )
            if any(b <= a for a, b in zip(timesteps, timesteps[1:])):
                raise ValueError(f"`timesteps` must be strictly increasing, got {list(timesteps)}.")
            if timesteps[0] < 0 or timesteps[-1] > num_train_timesteps:
                raise ValueError(
                    f"`timesteps` must lie in [0, num_train_timesteps={num_train_timesteps}], got {list(timesteps)}."
                )
            if shape == "plan":
                for depth in depths:
                    if depth != DROP and depth > -num_blocks:  # a depth, or a cached tail of 0 .. num_blocks - 1
                        if depth > 0:
                            self._check_depth("depths", depth, num_blocks)
                    elif depth != DROP:
                        raise ValueError(
                            f"`depths`: cached tails must be integers k in [0, {num_blocks - 1}] (written -k in a "
                            f"plan; num_blocks={num_blocks}), got {-depth}."
                        )
                if depths[-1] == DROP or reuses_work(depths[-1]):
                    raise ValueError(
                        "A plan's first sampling step (its highest timestep) cannot reuse, add a cached tail or be "
                        "dropped: the run starts from noise there, and nothing has been computed before it; got "
                        f"{describe_action(depths[-1])}."
                    )
            else:
                for depth in depths:
                    self._check_depth("depths", depth, num_blocks)
                self._check_not_increasing("depths", list(depths), allow_increasing)

    # ------------------------------------------------------------------ constructors
    @classmethod
    def constant(cls, num_blocks: int, blocks: int) -> ExitSchedule:
        """Run `blocks` of `num_blocks` blocks at every timestep."""
        return cls(num_blocks=num_blocks, shape="constant", min_blocks=blocks)

    @classmethod
    def linear(cls, num_blocks: int, min_blocks: int) -> ExitSchedule:
        """All blocks at the data end (`s = 0`), falling linearly to `min_blocks` at pure noise (`s = 1`)."""
        return cls(num_blocks=num_blocks, shape="linear", min_blocks=min_blocks)

    @classmethod
    def cosine(cls, num_blocks: int, min_blocks: int) -> ExitSchedule:
        """All blocks at `s = 0`, `min_blocks` at `s = 1`, following half a cosine (flat at both ends)."""
        return cls(num_blocks=num_blocks, shape="cosine", min_blocks=min_blocks)

    @classmethod
    def step(cls, num_blocks: int, table: Sequence[int], allow_increasing: bool = False) -> ExitSchedule:
        """One depth per equal-width bucket of `s`, from the data end to the noise end.

        This is the released ASE code's form: `ExitSchedule.step(28, [28, 28, 24, 24, 20, 20, 16, 16, 12, 12])`.
        """
        return cls(num_blocks=num_blocks, shape="step", table=table, allow_increasing=allow_increasing)

    @classmethod
    def from_table(
        cls,
        num_blocks: int,
        timesteps: Sequence[float] | torch.Tensor,
        depths: Sequence[int],
        num_train_timesteps: int = 1000,
        allow_increasing: bool = False,
    ) -> ExitSchedule:
        """Any measured or calibrated schedule: `depths[i]` blocks at `timesteps[i]`.

        Points may be given in any order; they are sorted by timestep. Between points the depth is linearly
        interpolated and rounded up; beyond the first and last point it is held constant.
        """
        timesteps, depths = _sorted_points(timesteps, depths, "depths")
        return cls(
            num_blocks=num_blocks,
            shape="table",
            timesteps=timesteps,
            depths=depths,
            num_train_timesteps=num_train_timesteps,
            allow_increasing=allow_increasing,
        )

    @classmethod
    def plan(
        cls,
        num_blocks: int,
        timesteps: Sequence[float] | torch.Tensor,
        actions: Sequence[int],
        num_train_timesteps: int = 1000,
        scheduler_class: str | None = None,
        denoiser_class: str | None = None,
    ) -> ExitSchedule:
        """A per-step plan for one sampling run: `actions[i]` at the step of `timesteps[i]` (e.g.
        `scheduler.timesteps`), each a depth in `[1, num_blocks]` or `REUSE` (0). The first step cannot reuse.
        `scheduler_class` names the run's scheduler (`type(scheduler).__name__`); the run's step count is the number
        of timesteps. A plan runs only in such a run: a drop-in pipeline refuses another step count or scheduler, and
        the hooks refuse a timestep that is not one of the plan's. `denoiser_class` names the denoiser it was made
        for (`type(pipe.transformer).__name__`): it is refused on another.

        Example: `ExitSchedule.plan(12, scheduler.timesteps, [12, REUSE, 8, 8, REUSE, 12, 12, 12])`.
        """
        timesteps, actions = _sorted_points(timesteps, actions, "actions")
        if len(set(timesteps)) != len(timesteps):
            raise ValueError(f"A plan has one action per step: `timesteps` must be distinct, got {timesteps}.")
        return cls(
            num_blocks=num_blocks,
            shape="plan",
            timesteps=timesteps,
            depths=actions,
            num_train_timesteps=num_train_timesteps,
            scheduler_class=scheduler_class,
            denoiser_class=denoiser_class,
        )

    @property
    def reuses(self) -> bool:
        """Whether some step reuses the last computed step's work (a plan with `REUSE` or cached-tail steps)."""
        return self.config.shape == "plan" and any(reuses_work(action) for action in self.config.depths)

    @property
    def tail_starts(self) -> tuple[int, ...]:
        """The blocks after which some step of a plan adds cached work, sorted: 0 for `REUSE`, `k` for
        `cached_tail(k)`."""
        if self.config.shape != "plan":
            return ()
        return tuple(sorted({-action for action in self.config.depths if reuses_work(action)}))

    @property
    def drops(self) -> bool:
        """Whether some step of a plan is dropped (`DROP`)."""
        return self.config.shape == "plan" and DROP in self.config.depths

    @classmethod
    def check_spec(cls, spec: str) -> None:
        """Raise a `ValueError` unless `spec` is a schedule `from_spec` can build for some model: checked before any
        model is loaded (a depth above the model's block count is found by `from_spec` itself)."""
        _parse_spec(spec)

    @classmethod
    def from_spec(cls, spec: str, num_blocks: int) -> ExitSchedule:
        """Parse a command-line schedule: `linear:M`, `cosine:M`, `constant:M`, `step:d1,d2,...`, or a saved folder.

        Each depth is a block count (`linear:6`) or, written with a decimal point, a fraction of `num_blocks`
        (`linear:0.5` is `min_blocks = round(0.5 * num_blocks)`; `step:1.0,0.5` is `[num_blocks, num_blocks / 2]`).
        """
        shape, values = _parse_spec(spec)
        if shape == "folder":
            return cls.from_pretrained(spec)
        depths = [
            value if isinstance(value, int) else max(1, math.floor(value * num_blocks + 0.5)) for value in values
        ]
        try:
            if shape == "step":
                return cls.step(num_blocks, depths)
            return cls(num_blocks=num_blocks, shape=shape, min_blocks=depths[0])
        except (ValueError, TypeError) as error:
            raise ValueError(f"Bad exit schedule {spec!r}: {error}") from None

    def check_run(self, scheduler: str, num_inference_steps: int) -> None:
        """Raise a `ValueError` if this is a plan made for another step count or scheduler class than a run of
        `num_inference_steps` steps of `scheduler` (its class name). Other schedules run at any step count."""
        config = self.config
        if config.shape != "plan":
            return
        made_for = len(config.timesteps)
        made_with = config.get("scheduler_class")
        if num_inference_steps != made_for or (made_with is not None and scheduler != made_with):
            raise ValueError(
                f"This plan was made for {made_for} steps of {made_with or 'its scheduler'}; the run asks for "
                f"{num_inference_steps} steps of {scheduler}. A plan holds one action per step of one run: calibrate "
                f"one for this run (`ee-diffusion calibrate --steps {num_inference_steps}`) or run it at its own."
            )

    def check_denoiser(self, denoiser: torch.nn.Module) -> None:
        """Raise a `ValueError` if this is a plan made for a denoiser of another class (one that records its
        `denoiser_class`) than `denoiser`."""
        made_for = self.config.get("denoiser_class")
        if made_for is not None and made_for not in {cls.__name__ for cls in type(denoiser).__mro__}:
            raise ValueError(
                f"This plan was made for a {made_for}; this denoiser is a {type(denoiser).__name__}, whose blocks it "
                "was not measured on. Calibrate a plan for this model (`ee-diffusion calibrate`)."
            )

    # ------------------------------------------------------------------ evaluation
    def depth_at_position(self, s: float) -> int | str:
        """The depth at normalised timestep position `s` in `[0, 1]` (values outside are clamped); a plan's action
        (`REUSE`, a cached tail, `DROP`) at its steps that are not depths."""
        s = min(max(as_number("s", s), 0.0), 1.0)
        config = self.config
        full, shape = config.num_blocks, config.shape
        if shape == "constant":
            return config.min_blocks
        if shape == "linear":
            depth = full - (full - config.min_blocks) * s
        elif shape == "cosine":
            depth = config.min_blocks + (full - config.min_blocks) * (1.0 + math.cos(math.pi * s)) / 2.0
        elif shape == "step":
            table = config.table
            return table[min(int(s * len(table)), len(table) - 1)]
        elif shape == "plan":
            t = s * config.num_train_timesteps
            nearest = min(range(len(config.timesteps)), key=lambda i: (abs(config.timesteps[i] - t), -i))
            return config.depths[nearest]
        else:
            return self._table_depth(s * config.num_train_timesteps)
        return min(max(math.floor(depth + 0.5), 1), full)

    def blocks_at(self, t: float | torch.Tensor, num_train_timesteps: int = 1000) -> int:
        """Number of blocks to run at timestep `t` of a `num_train_timesteps` training schedule."""
        values = _as_float_list(t, "t")
        if len(values) != 1:
            raise ValueError(f"`blocks_at` takes one timestep, got {len(values)}; use `depths_for` for a batch.")
        return self.depth_at_position(values[0] / _timestep_scale(num_train_timesteps))

    def depths_for(self, timesteps: Iterable[float] | torch.Tensor, num_train_timesteps: int = 1000) -> list[int]:
        """The depth at each timestep of `timesteps` (a list or a tensor of any shape, read flat)."""
        scale = _timestep_scale(num_train_timesteps)
        return [self.depth_at_position(t / scale) for t in _as_float_list(timesteps)]

    def check_timesteps(self, timesteps: Iterable[float] | torch.Tensor, num_train_timesteps: int = 1000) -> None:
        """Raise a `ValueError` if this is a plan and one of `timesteps` is not one of its steps (a run of another
        scheduler or step count). Other schedules take any timestep."""
        config = self.config
        if config.shape != "plan":
            return
        tolerance = PLAN_TIMESTEP_TOLERANCE * config.num_train_timesteps
        scale = _timestep_scale(num_train_timesteps)
        for t in _as_float_list(timesteps):
            t = t / scale * config.num_train_timesteps
            if min(abs(step - t) for step in config.timesteps) > tolerance:
                raise ValueError(
                    f"Timestep {t:g} is not a step of this plan, made for the {len(config.timesteps)} timesteps "
                    f"{[round(v, 3) for v in reversed(config.timesteps)]} of "
                    f"{config.get('scheduler_class') or 'its scheduler'}; calibrate a plan for this run."
                )

    def compute_fraction(self, timesteps: Iterable[float] | torch.Tensor, num_train_timesteps: int = 1000) -> float:
        """Expected fraction of block compute over a sampling run, e.g. `compute_fraction(scheduler.timesteps)`."""
        depths = self.depths_for(timesteps, num_train_timesteps)
        if not depths:
            raise ValueError("`compute_fraction` needs at least one timestep.")
        return sum(map(action_blocks, depths)) / (len(depths) * self.config.num_blocks)

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs: Any) -> None:
        """diffusers' `save_pretrained` (`exit_schedule.json` in `save_directory`), refusing the shipped models'
        folders."""
        refuse_shipped(save_directory)
        super().save_pretrained(save_directory, **kwargs)

    def describe(self) -> str:
        """The schedule in a few words, as the command line writes it where it can (`linear:6`, `step:12,10,8`,
        `plan of 10 steps`)."""
        config = self.config
        if config.shape == "step":
            return "step:" + ",".join(map(str, config.table))
        if config.shape in ("table", "plan"):
            return f"{config.shape} of {len(config.depths)} {'points' if config.shape == 'table' else 'steps'}"
        return f"{config.shape}:{config.min_blocks}"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ExitSchedule) and _comparable(self.config) == _comparable(other.config)

    __hash__ = None

    # ------------------------------------------------------------------ helpers
    def _table_depth(self, t: float) -> int:
        timesteps, depths = self.config.timesteps, self.config.depths
        if t <= timesteps[0]:
            return depths[0]
        if t >= timesteps[-1]:
            return depths[-1]
        for (t0, d0), (t1, d1) in zip(zip(timesteps, depths), zip(timesteps[1:], depths[1:])):
            if t0 <= t <= t1:
                return math.ceil(d0 + (d1 - d0) * (t - t0) / (t1 - t0) - 1e-9)
        raise AssertionError("unreachable: timesteps are sorted")

    @staticmethod
    def _check_depth(name: str, depth: int, num_blocks: int) -> None:
        if isinstance(depth, bool) or not isinstance(depth, int) or not 1 <= depth <= num_blocks:
            raise ValueError(f"`{name}` depths must be integers in [1, num_blocks={num_blocks}], got {depth!r}.")

    @staticmethod
    def _check_not_increasing(name: str, depths: list[int], allow_increasing: bool) -> None:
        if allow_increasing:
            return
        for i, (a, b) in enumerate(zip(depths, depths[1:])):
            if b > a:
                raise ValueError(
                    f"`{name}` depth increases with noise ({a} -> {b} at entry {i + 1} of {depths}); tables run from "
                    "the data end to the noise end. Pass `allow_increasing=True` if this is on purpose."
                )


def _timestep_scale(num_train_timesteps: Any) -> int:
    return as_int("num_train_timesteps", num_train_timesteps, low=1)


def _comparable(config) -> dict:
    return {k: v for k, v in dict(config).items() if not k.startswith("_")}
