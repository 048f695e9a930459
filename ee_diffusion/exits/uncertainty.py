"""DeeDiff's dynamic exit as diffusers hooks: a denoiser stops after the first block whose head is sure enough.

`apply_uncertainty_exit(pipe_or_model, heads)` registers one hook on the denoiser, which embeds the call's timestep
for the heads and records what ran, and one hook on each block. The blocks run in order; after a block with an exit
point (`heads.exit_blocks`), its UEM estimates each sample's uncertainty, and a sample whose uncertainty is at or below
`threshold` exits: its hidden state goes through the exit point's adapter and is held until the last block, which
hands the whole batch to the model's own output layer. Blocks after a sample's exit do not run for it:

- `per_batch` (DeeDiff's released code): the batch exits together, when every sample may;
- `per_sample`: the samples that exit leave the batch, and the blocks after run on the others only (their inputs are
  compacted: the hidden states, and every argument of the block that carries one row per sample, like DiT's timestep
  and class labels). A classifier-free-guidance batch (conditional half, then unconditional half, as diffusers'
  pipelines build it) exits by pairs when `paired` is set (the drop-in pipelines set it from `guidance_scale`).

When the exits are decided (the heads' `decision`):

- `"previous_step"` (default): before a call runs, from the uncertainties its samples had at the previous call of the
  sampling run. Each call evaluates the UEMs of the exit points its samples reach (on the device), and copies them to
  the host without waiting (pinned memory and an event on CUDA); the next call reads that copy, which the device
  finished long before. So a call makes no host read: Python knows every sample's exit block before the first block
  runs, and the GPU queue never drains inside a call. What changes in DeeDiff's rule: a step exits where the previous
  step's uncertainty allowed it (the uncertainties move little from one step to the next), and where none of the
  points a sample reached allowed it, the sample runs every block and every point is evaluated again. The first call
  of a run (and a call whose batch size changed) runs every block. The drop-in pipelines start each run afresh;
  with a stock pipeline or a bare model, call `reset_uncertainty_exit_stats` between runs.
- `"per_block"` (DeeDiff's released rule): at each checked exit point, from the call's own uncertainties, read on the
  host there: one GPU synchronisation per checked point (`check_every=k` checks every k-th point only).

Either way the record of a call (its timesteps, each sample's depth, the heads' work) is read on the host when the
stats are asked for (`get_uncertainty_exit_stats`), after the pipeline call, not during it.

Threshold 0 never exits (an uncertainty is a sigmoid, above 0): every block runs and the output is bit-identical to the
model's without hooks. `remove_uncertainty_exit` restores the original forwards. Supported denoisers: the transformer
classes of the exits registry whose blocks take and return one hidden-states tensor (DiT, PixArt-alpha).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers import DiTTransformer2DModel, PixArtTransformer2DModel
from diffusers.hooks import HookRegistry, ModelHook

from ..validation import as_flag
from .architectures import _argument, get_exit_architecture
from .heads import ExitHeads
from .hooks import UNCERTAINTY_HOOK as _DENOISER_HOOK
from .hooks import _resolve, on_device

_UNIT_HOOK = "ee_uncertainty_exit_unit"
SUPPORTED = (DiTTransformer2DModel, PixArtTransformer2DModel)


@dataclass(frozen=True)
class UncertaintyExitCall:
    """One denoiser call: its timestep values, the blocks each sample ran, and the heads' work in blocks."""

    timesteps: tuple[float, ...]
    depths: tuple[int, ...]
    head_blocks: float


@dataclass
class UncertaintyExitStats:
    """What the dynamic exit ran, call by call, since it was applied or reset."""

    num_blocks: int
    calls: list[UncertaintyExitCall] = field(default_factory=list)

    @property
    def block_fraction(self) -> float:
        """Blocks run plus the heads' work (UEMs evaluated, adapters of the exits taken), over a full-depth run's
        blocks (1.0 when nothing ran yet)."""
        samples = sum(len(call.depths) for call in self.calls)
        if not samples:
            return 1.0
        work = sum(sum(call.depths) + call.head_blocks for call in self.calls)
        return work / (samples * self.num_blocks)

    @property
    def mean_depth_per_call(self) -> list[float]:
        """The mean exit depth (blocks run) of each call's samples, in call order: the depth profile over steps."""
        return [sum(call.depths) / len(call.depths) for call in self.calls]


class HostCopy:
    """A tensor on its way to the host, copied without waiting for the device (pinned memory and an event on CUDA),
    to be read a call later, when the device has long finished it. `values()` is the only place that reads it."""

    def __init__(self, tensor: torch.Tensor) -> None:
        tensor = tensor.detach()
        self.event = None
        if tensor.device.type == "cuda":
            self.host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
            self.host.copy_(tensor, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()
        else:
            self.host = tensor.to("cpu", non_blocking=True).clone()

    def values(self) -> list:
        """The tensor's values as (nested) Python lists."""
        if self.event is not None:
            self.event.synchronize()
        return self.host.tolist()


@dataclass
class _Record:
    """A call as recorded while it runs: its timesteps still on the device, the depths on the host."""

    timesteps: torch.Tensor
    depths: list[int]
    head_blocks: float


class _State:
    """The call in flight, shared by the denoiser hook and the block hooks."""

    def __init__(self, heads: ExitHeads, num_blocks: int, unit_costs: tuple[float, float]) -> None:
        self.heads, self.num_blocks = heads, num_blocks
        self.uem_cost, self.adapter_cost = unit_costs
        self.threshold, self.policy, self.check_every, self.paired = 0.0, "per_batch", 1, False  # set per call
        self.decision = "previous_step"
        self.point_of = {count - 1: point for point, count in enumerate(heads.exit_blocks)}  # block index -> point
        self.records: list[_Record] = []
        self.in_call = False
        self.batch = 0
        self.embedding: torch.Tensor | None = None
        self.timesteps: torch.Tensor | None = None
        self.active: torch.Tensor | None = None  # samples still running, on the device (None: all of them)
        self.active_rows: list[int] = []  # the same on the host
        self.exited: torch.Tensor | None = None  # the adapted hidden states of the samples that exited
        self.depths: list[int] = []  # per sample: the blocks it ran
        self.head_blocks = 0.0
        self.done = False
        # "previous_step": the previous call's uncertainties on their way to the host, and this call's plan
        self.previous: HostCopy | None = None
        self.previous_batch = 0
        self.uncertainties: torch.Tensor | None = None  # this call's, exit points x batch (inf: not evaluated)
        self.exit_block: list[int] = []  # per sample: the block count after which it exits (num_blocks: none)
        self.running: list[list[int]] = []  # per block: the samples that run it

    def forget_previous(self) -> None:
        self.previous, self.previous_batch = None, 0

    def checked(self, point: int) -> bool:
        return point % self.check_every == 0

    def plan(self, batch: int) -> list[int]:
        """Each sample's exit block for this call, from the previous call's uncertainties (see the module docstring):
        the first checked exit point where its uncertainty (its pair's too, when paired; the whole batch's under
        `per_batch`) was at or below the threshold."""
        full = [self.num_blocks] * batch
        if self.previous is None or self.previous_batch != batch:
            return full
        values = self.previous.values()  # exit points x batch, inf where a sample did not reach a point
        points = [p for p in range(len(values)) if self.checked(p)]
        sure = [[value <= self.threshold for value in row] for row in values]
        blocks = self.heads.exit_blocks
        if self.policy == "per_batch":
            first = next((p for p in points if all(sure[p])), None)
            return full if first is None else [blocks[first]] * batch
        if self.paired:
            half = batch // 2
            sure = [[row[i] and row[(i + half) % batch] for i in range(batch)] for row in sure]
        return [next((blocks[p] for p in points if sure[p][i]), self.num_blocks) for i in range(batch)]


class UncertaintyExitHook(ModelHook):
    """On the denoiser: embeds the call's timestep for the heads, plans the exits (`previous_step`), and records the
    call when it returns."""

    def __init__(self, state: _State, timestep_argument: str, sample_argument: str) -> None:
        super().__init__()
        self.state, self.timestep_argument, self.sample_argument = state, timestep_argument, sample_argument

    def pre_forward(self, module: torch.nn.Module, *args, **kwargs) -> tuple[tuple, dict]:
        state = self.state
        batch = _argument(module, self.sample_argument, args, kwargs).shape[0]
        timestep = _argument(module, self.timestep_argument, args, kwargs)
        if timestep is None:
            raise ValueError(f"{type(module).__name__} was called with `timestep=None`; uncertainty exits need it.")
        timesteps = torch.as_tensor(timestep).reshape(-1).to(state.heads.device)
        timesteps = timesteps.expand(batch) if timesteps.numel() == 1 else timesteps
        rule = state.heads.config
        state.threshold, state.policy, state.check_every = rule.threshold, rule.policy, rule.check_every
        state.decision = rule.get("decision", "previous_step")
        if state.paired and state.policy == "per_sample" and batch % 2:
            raise ValueError(f"A paired (classifier-free guidance) batch must have an even size, got {batch}.")
        state.in_call, state.batch, state.done = True, batch, False
        state.timesteps, state.embedding = timesteps, state.heads.embed(timesteps)
        state.active, state.active_rows, state.exited, state.head_blocks = None, list(range(batch)), None, 0.0
        if state.decision == "per_block":
            state.depths = [state.num_blocks] * batch
            return args, kwargs
        state.exit_block = state.plan(batch)
        state.depths = list(state.exit_block)
        state.running = [[i for i in range(batch) if state.exit_block[i] > b] for b in range(state.num_blocks)]
        points = len(state.heads.exit_blocks)
        state.uncertainties = torch.full((points, batch), float("inf"), device=state.embedding.device)
        return args, kwargs

    def post_forward(self, module: torch.nn.Module, output: Any) -> Any:
        state = self.state
        state.in_call = False
        state.records.append(_Record(state.timesteps.detach(), list(state.depths), state.head_blocks))
        if state.decision == "previous_step":
            state.previous, state.previous_batch = HostCopy(state.uncertainties), state.batch
        state.embedding = state.exited = state.active = state.uncertainties = None
        return output


class UncertaintyUnitHook(ModelHook):
    """On block `index`: runs it on the samples still running, then lets those that exit at its exit point go."""

    def __init__(self, index: int, state: _State) -> None:
        super().__init__()
        self.index, self.state = index, state
        self.last = index == state.num_blocks - 1

    def new_forward(self, module: torch.nn.Module, *args, **kwargs) -> Any:
        state = self.state
        if not state.in_call:  # the block was called on its own, outside a denoiser call
            return self.fn_ref.original_forward(*args, **kwargs)
        if state.done:  # every sample has exited: nothing runs, the last block hands their states on
            return state.exited
        if state.active is not None:
            args, kwargs = _rows(args, state.active, state.batch), _rows(kwargs, state.active, state.batch)
        hidden = self.fn_ref.original_forward(*args, **kwargs)
        point = state.point_of.get(self.index)
        if point is not None and state.checked(point):
            hidden = self._exit(point, hidden) if state.decision == "per_block" else self._planned_exit(point, hidden)
        if not self.last or state.exited is None:
            return hidden
        if not state.done:
            state.exited[state.active] = hidden
        return state.exited

    def _planned_exit(self, point: int, hidden: torch.Tensor) -> torch.Tensor:
        """`previous_step`: record this point's uncertainties for the next call, and let go the samples planned to
        exit here (known on the host before the call)."""
        state = self.state
        running = state.running[self.index]
        rows = None if len(running) == state.batch else on_device(running, hidden.device)
        embedding = state.embedding if rows is None else state.embedding[rows]
        uncertainty = state.heads.uncertainty(point, hidden, embedding)
        state.head_blocks += len(running) * state.uem_cost
        if rows is None:
            state.uncertainties[point] = uncertainty
        else:
            state.uncertainties[point, rows] = uncertainty
        leaving = [i for i, sample in enumerate(running) if state.exit_block[sample] == self.index + 1]
        return self._let_go(point, hidden, embedding, running, leaving)

    def _exit(self, point: int, hidden: torch.Tensor) -> torch.Tensor:
        """`per_block`: the samples of `hidden` that stay; those whose uncertainty allows it leave, with their adapted
        state (one host read: which samples leave)."""
        state = self.state
        running, rows = state.active_rows, state.active
        embedding = state.embedding if rows is None else state.embedding[rows]
        uncertainty = state.heads.uncertainty(point, hidden, embedding)
        state.head_blocks += len(running) * state.uem_cost
        leave = uncertainty <= state.threshold
        if state.policy == "per_batch":
            leave = leave.all().expand(len(running))
        elif state.paired:  # a pair leaves when both halves may: partner of sample i is i +- batch / 2
            everyone = leave
            if rows is not None:
                everyone = torch.zeros(state.batch, dtype=torch.bool, device=hidden.device).index_put_((rows,), leave)
            both = everyone & everyone.roll(state.batch // 2)
            leave = both if rows is None else both[rows]
        leaving = [i for i, out in enumerate(leave.tolist()) if out]  # the host read of this exit point
        for i in leaving:
            state.depths[running[i]] = self.index + 1
        return self._let_go(point, hidden, embedding, running, leaving)

    def _let_go(
        self, point: int, hidden: torch.Tensor, embedding: torch.Tensor, running: list[int], leaving: list[int]
    ) -> torch.Tensor:
        """Let the samples at positions `leaving` of `hidden` (whose rows are the samples `running`) exit here with
        their adapted states; the rows of those that stay, which the next blocks run. Indices are decided on the host
        and sent to the device without waiting for it."""
        if not leaving:
            return hidden
        state = self.state
        if state.exited is None:
            state.exited = hidden.new_empty((state.batch, *hidden.shape[1:]))
        local = on_device(leaving, hidden.device)
        state.exited[on_device([running[i] for i in leaving], hidden.device)] = state.heads.adapt(
            point, hidden[local], embedding[local]
        )
        state.head_blocks += len(leaving) * state.adapter_cost
        if len(leaving) == len(running):
            state.done = True
            return state.exited
        gone = set(leaving)
        kept = [i for i in range(len(running)) if i not in gone]
        state.active_rows = [running[i] for i in kept]
        state.active = on_device(state.active_rows, hidden.device)
        return hidden[on_device(kept, hidden.device)]


def _rows(value: Any, rows: torch.Tensor, batch: int) -> Any:
    """`value` (an argument of a block) with only `rows` of each tensor that has one row per sample of the batch."""
    if isinstance(value, torch.Tensor):
        return value[rows] if value.ndim and value.shape[0] == batch else value
    if isinstance(value, dict):
        return {key: _rows(item, rows, batch) for key, item in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(_rows(item, rows, batch) for item in value)
    return value


def _denoiser_hook(model: torch.nn.Module) -> UncertaintyExitHook | None:
    registry = getattr(model, "_diffusers_hook", None)
    return None if registry is None else registry.get_hook(_DENOISER_HOOK)


def apply_uncertainty_exit(pipe_or_model: Any, heads: ExitHeads, paired: bool = False) -> None:
    """Make a denoiser exit after the first exit point whose uncertainty is at or below the heads' threshold.

    The exit rule is the heads' (`heads.set_exit_rule`: threshold, policy, check_every), read at every denoiser call.

    Args:
        pipe_or_model: A DiT or PixArt-alpha transformer, or a pipeline holding one as `transformer`. Exit hooks
            already on it (an exit schedule, a cache) must be removed first.
        heads: Exit heads trained for this denoiser (`ee-diffusion train-uem`).
        paired: The batches are classifier-free-guidance batches (two halves) whose pairs exit together under the
            `per_sample` policy (`set_uncertainty_exit_paired` changes it).

    Example:
        ```python
        >>> heads = ExitHeads.from_pretrained("ee_diffusion/assets/digits-dit/exit_heads")
        >>> heads.set_exit_rule(threshold=0.1, policy="per_sample")
        >>> apply_uncertainty_exit(pipe, heads, paired=True)
        >>> images = pipe(class_labels=[3, 7], guidance_scale=2.0).images
        >>> get_uncertainty_exit_stats(pipe).block_fraction
        ```
    """
    if not isinstance(heads, ExitHeads):
        raise TypeError(f"`heads` must be ExitHeads, got {type(heads).__name__}.")
    model, _ = _resolve(pipe_or_model)
    if not isinstance(model, SUPPORTED):
        raise TypeError(
            f"Uncertainty exits do not support {type(model).__name__}; supported: "
            f"{', '.join(cls.__name__ for cls in SUPPORTED)} (transformers whose blocks pass one "
            "hidden-states tensor)."
        )
    architecture = get_exit_architecture(model)
    units = architecture.units(model)
    heads.check_fits(
        len(units), int(model.config.num_attention_heads * model.config.attention_head_dim), type(model).__name__
    )
    registry = HookRegistry.check_if_exists_or_initialize(model)
    if registry.hooks and _denoiser_hook(model) is None:
        raise ValueError(
            f"This {type(model).__name__} already carries hooks ({', '.join(registry.hooks)}); remove "
            "them (an exit schedule, a cache) before applying uncertainty exits."
        )
    remove_uncertainty_exit(model)
    state = _State(heads, len(units), heads.cost_in_blocks(units[0]))
    state.paired = as_flag("paired", paired)
    registry.register_hook(
        UncertaintyExitHook(state, architecture.timestep_argument, architecture.sample_argument), _DENOISER_HOOK
    )
    for index, unit in enumerate(units):
        HookRegistry.check_if_exists_or_initialize(unit).register_hook(UncertaintyUnitHook(index, state), _UNIT_HOOK)
    registry.invalidate_child_registries_cache()


def set_uncertainty_exit_paired(pipe_or_model: Any, paired: bool) -> None:
    """Whether the next calls' batches are classifier-free-guidance pairs (see `apply_uncertainty_exit`)."""
    _require(pipe_or_model).state.paired = as_flag("paired", paired)


def remove_uncertainty_exit(pipe_or_model: Any) -> None:
    """Remove the uncertainty-exit hooks, restoring the original forwards (a no-op when none are applied)."""
    model, _ = _resolve(pipe_or_model)
    if _denoiser_hook(model) is None:
        return
    registry = HookRegistry.check_if_exists_or_initialize(model)
    registry.remove_hook(_DENOISER_HOOK, recurse=False)
    registry.remove_hook(_UNIT_HOOK, recurse=True)
    registry.invalidate_child_registries_cache()


def get_uncertainty_exit_heads(pipe_or_model: Any) -> ExitHeads | None:
    """The heads applied to this denoiser, or `None`."""
    hook = _denoiser_hook(_resolve(pipe_or_model)[0])
    return None if hook is None else hook.state.heads


def get_uncertainty_exit_stats(pipe_or_model: Any) -> UncertaintyExitStats:
    """What the dynamic exit ran: per denoiser call, the timesteps, each sample's depth, the heads' work (read on the
    host here, once, not during the calls)."""
    state = _require(pipe_or_model).state
    calls = [
        UncertaintyExitCall(
            tuple(record.timesteps.float().cpu().tolist()),
            tuple(record.depths),
            record.head_blocks,
        )
        for record in state.records
    ]
    return UncertaintyExitStats(state.num_blocks, calls)


def reset_uncertainty_exit_stats(pipe_or_model: Any) -> None:
    """Forget the recorded calls, and start a new sampling run (`previous_step` decisions plan its first call at full
    depth)."""
    state = _require(pipe_or_model).state
    state.records.clear()
    state.forget_previous()


def _require(pipe_or_model: Any) -> UncertaintyExitHook:
    model, _ = _resolve(pipe_or_model)
    hook = _denoiser_hook(model)
    if hook is None:
        raise ValueError(
            f"No uncertainty exit is applied to this {type(model).__name__}; call `apply_uncertainty_exit`."
        )
    return hook
