"""How the methods `ee-diffusion bench` compares run: one builder per kind of method (`BUILDERS`; how each kind is
written and its arguments checked: `ee_diffusion.bench.method_specs`).

A method spec is `kind` or `kind:argument`, optionally followed by `@N`: the method at N scheduler steps instead of the
cell's (`baseline@8` in a 10-step cell is the fewer-steps baseline, timed interleaved with the rest of the cell; its
block fraction counts against the full model at the cell's steps, so it reads 80%). Each kind builds a `Method` from
its checked argument; a `Method` knows the model it runs on and, as a context manager (`Method.session`), how to put
itself on the shared pipeline for the calls made inside and take itself off again, so methods sharing one pipeline
never leak into each other. Adding a method is one entry in `METHOD_KINDS` and one in `BUILDERS`.

Kinds (arguments in brackets are optional):
- `baseline`: the model at full depth.
- `ase:<schedule>`: the model under an exit schedule (`linear:M`, `cosine:M`, `step:d1,d2,...` or a schedule folder).
- `finetuned:<model>[:<schedule>]`: another model (typically ASE fine-tuned) with the exit schedule saved in its
  folder, or under `<schedule>` (any `ase:` schedule, e.g. a plan calibrated on that model; a folder path may be
  relative to the model's folder: `finetuned:digits-dit-ase:plans/dpm-solver++-10`).
- `deediff[:<threshold>[:<policy>]]`: DeeDiff's uncertainty exits with the model's exit heads (its `exit_heads`
  component, or the `exit_heads/` folder inside the model's folder, which `ee-diffusion train-uem` writes): a sample
  leaves after the first head whose uncertainty is at or below the threshold (default: the heads' own), `per_batch`
  (default) or `per_sample`. Its block fraction counts the heads' work.
- `fbcache[:<threshold>]`: diffusers' FirstBlockCache (default threshold 0.05): all blocks after the first are
  skipped while the first block's residual changes by less than the threshold (relative mean absolute change).
- `layerskip[:<i,j,...>]`: diffusers' LayerSkip: the listed transformer blocks (0-based) are skipped at every step
  (default: the middle block).
- `taylorseer[:<interval>[:<order>]]`: diffusers' TaylorSeer cache on the attention modules of the blocks
  (`<name>blocks.<i>.attn<j>`): computed
  every `interval` steps (default 5) after 3 warm-up steps, predicted in between by a Taylor series of `order`
  (default 1).
- `magcache[:<threshold>[:<max skips>]]`: diffusers' MagCache (default 0.06, at most 3 consecutive skips); its
  magnitude ratios are calibrated on the model by one untimed 2-image call at the bench's scheduler and steps.
- `pab[:<range>[:<lo>-<hi>]]`: diffusers' PyramidAttentionBroadcast: self-attention is recomputed every `range`
  calls (default 2) while the timestep lies in (lo, hi) (default 100-800), and broadcast from the cache otherwise.

The diffusers accelerators are applied to the denoiser with `diffusers.hooks` on the same model as `baseline`. Where
one does not apply to the model (a U-Net, a block class diffusers has no metadata for, no attention it recognises),
the method's row carries the reason (`Method.unsupported`) and no numbers. Their block fraction is measured by torch
forward hooks on the `nn.Linear` layers of the attention and feed-forward modules in the denoiser's block lists: the
weight-count-weighted share of those layers that ran per denoiser call (these counting hooks cost a little time, so
accelerator speedups are, if anything, understated).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from diffusers.hooks import (
    FirstBlockCacheConfig,
    HookRegistry,
    LayerSkipConfig,
    MagCacheConfig,
    ModelHook,
    PyramidAttentionBroadcastConfig,
    TaylorSeerCacheConfig,
    apply_first_block_cache,
    apply_layer_skip,
    apply_mag_cache,
    apply_pyramid_attention_broadcast,
    apply_taylorseer_cache,
)
from diffusers.models.attention import FeedForward
from diffusers.models.attention_processor import Attention
from diffusers.models.cache_utils import CacheMixin

from ..exits import denoiser_of, exit_schedule_in_force, num_exit_blocks
from ..schedules import ExitSchedule
from .method_specs import METHOD_KINDS, kind_of


@dataclass(frozen=True)
class Work:
    """What a method's session yields. Called, it returns the share of the full model's block work that the denoiser
    calls made inside the session ran; `depths()` gives each of those calls' blocks' worth of work (the mean over the
    batch), or `None` where the method always runs every block."""

    fraction: Callable[[], float]
    depths: Callable[[], list[float] | None] = lambda: None

    def __call__(self) -> float:
        return self.fraction()


Session = Callable[[Any], contextlib.AbstractContextManager[Work]]


def _scheduled(schedule: ExitSchedule | None) -> Session:
    """The model under `schedule`; `None`: at full depth, whatever schedule its folder carries."""

    @contextlib.contextmanager
    def session(pipe: Any) -> Iterator[Work]:
        with exit_schedule_in_force(pipe, schedule):
            yield Work(lambda: 1.0) if schedule is None else _exit_work(pipe)

    return session


def _exit_work(pipe: Any) -> Work:
    """The work of the calls made under the pipeline's exit schedule or exit heads, from its `exit_stats`."""
    return Work(
        lambda: pipe.exit_stats.block_fraction,
        lambda: [sum(call.depths) / len(call.depths) for call in pipe.exit_stats.calls],
    )


@dataclass
class Method:
    """One row of the bench.

    Args:
        name: The spec it was built from.
        model: The model it runs on (a key of the bench's pipelines).
        session: `session(pipe)` is a context manager that applies the method to `pipe`, yields the `Work` done by
            the calls made inside (called: their block fraction), and leaves `pipe` as it found it on exit.
        unsupported: Why the method cannot run on this model (then it is never run).
        steps: Scheduler steps it samples with (`None`: the cell's).
    """

    name: str
    model: str
    session: Session = _scheduled(None)
    unsupported: str | None = None
    steps: int | None = None


@dataclass
class Target:
    """What a method is built for: the bench's model, its pipeline loader, and the cell's scheduler steps."""

    model: str
    pipe_of: Callable[[str], Any]
    steps: int
    labels: list[int] = field(default_factory=lambda: [0, 1])


def _baseline(parsed: None, spec: str, target: Target) -> Method:
    return Method("baseline", target.model)


def _fitted(schedule: ExitSchedule, pipe: Any, target: Target) -> ExitSchedule:
    """`schedule`, checked to run in the cell: a plan only at its own scheduler and step count."""
    schedule.check_run(type(pipe.scheduler).__name__, target.steps)
    return schedule


def _ase(schedule_spec: str, spec: str, target: Target) -> Method:
    pipe = target.pipe_of(target.model)
    schedule = ExitSchedule.from_spec(schedule_spec, num_exit_blocks(pipe))
    return Method(spec, target.model, _scheduled(_fitted(schedule, pipe, target)))


def _finetuned(parsed: tuple[str, str], spec: str, target: Target) -> Method:
    model, schedule_spec = parsed
    pipe = target.pipe_of(model)
    if not schedule_spec:
        return Method(spec, model, _scheduled(pipe.exit_schedule))
    schedule = ExitSchedule.from_spec(schedule_spec, num_exit_blocks(pipe))
    return Method(spec, model, _scheduled(_fitted(schedule, pipe, target)))


def _deediff(parsed: tuple[float | None, str | None], spec: str, target: Target) -> Method:
    from ..exits import ExitHeads
    from ..exits.uncertainty import SUPPORTED
    from ..pipelines.loading import resolve_pretrained

    threshold, policy = parsed
    pipe = target.pipe_of(target.model)
    if not isinstance(denoiser_of(pipe), SUPPORTED):
        return Method(
            spec,
            target.model,
            unsupported=f"uncertainty exits need a transformer of "
            f"{', '.join(cls.__name__ for cls in SUPPORTED)}, not {type(denoiser_of(pipe)).__name__}",
        )
    heads = getattr(pipe, "exit_heads", None)
    folder = None if target.model.startswith("random:") else Path(resolve_pretrained(target.model)) / "exit_heads"
    if heads is None and folder is not None and (folder / "config.json").is_file():
        heads = ExitHeads.from_pretrained(folder).to(pipe.device)
    if heads is None:
        return Method(
            spec,
            target.model,
            unsupported=f"{target.model} has no exit heads (train them with "
            "`ee-diffusion train-uem` and save them in its folder as exit_heads/)",
        )

    @contextlib.contextmanager
    def session(pipe: Any) -> Iterator[Work]:
        rule = {name: heads.config[name] for name in ("threshold", "policy")}
        own = (pipe.exit_schedule, getattr(pipe, "exit_heads", None))
        heads.set_exit_rule(threshold=threshold, policy=policy)
        pipe.exit_schedule, pipe.exit_heads = None, heads
        try:
            yield _exit_work(pipe)
        finally:
            pipe.exit_heads, pipe.exit_schedule = own[1], own[0]
            heads.set_exit_rule(**rule)

    return Method(spec, target.model, session)


class _RunCounter(ModelHook):
    """Adds its module's `nn.Linear` weight count to a tally each time the module's own forward really runs."""

    def __init__(self, tally: _BlockWork, weights: int) -> None:
        super().__init__()
        self.tally, self.weights = tally, weights

    def new_forward(self, module: torch.nn.Module, *args, **kwargs) -> Any:
        self.tally.done += self.weights
        return self.fn_ref.original_forward(*args, **kwargs)


class _BlockWork:
    """Share of the attention and feed-forward work of the denoiser's block lists that ran per call, weighted by the
    `nn.Linear` weights of each `Attention` and `FeedForward` module (the blocks' conditioning layers are left out:
    DiT also calls the first block's outside it).

    Put on before an accelerator, its counters are the innermost hooks of those modules: an accelerator hook that
    answers from a cache, or skips the block around them, keeps them from counting. They run in Python around the
    module's forward, so they count the same when the bench has compiled those forwards (`--compile`).
    """

    NAME = "ee_block_work"

    def __init__(self, denoiser: torch.nn.Module) -> None:
        blocks = [child for child in denoiser.children() if isinstance(child, torch.nn.ModuleList)]
        self.layers = [
            layer for block in blocks for layer in block.modules() if isinstance(layer, (Attention, FeedForward))
        ]
        self.total = self.done = 0  # `done`: the work of the denoiser call under way
        self.per_call: list[float] = []  # the share of the work each finished denoiser call ran
        for layer in self.layers:
            weights = sum(linear.weight.numel() for linear in layer.modules() if isinstance(linear, torch.nn.Linear))
            HookRegistry.check_if_exists_or_initialize(layer).register_hook(_RunCounter(self, weights), self.NAME)
            self.total += weights
        self.handle = denoiser.register_forward_hook(self._called)

    def _called(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        self.per_call.append(self.done / self.total if self.total else 1.0)
        self.done = 0

    def fraction(self) -> float:
        return sum(self.per_call) / len(self.per_call) if self.per_call else 1.0

    def remove(self) -> None:
        self.handle.remove()
        for layer in self.layers:
            HookRegistry.check_if_exists_or_initialize(layer).remove_hook(self.NAME, recurse=False)


# The names diffusers registers each accelerator's hooks under (what `CacheMixin.disable_cache` removes).
_HOOK_NAMES = {
    "fbcache": ("fbc_leader_block_hook", "fbc_block_hook"),
    "layerskip": ("layer_skip_hook",),
    "taylorseer": ("taylorseer_cache",),
    "magcache": ("mag_cache_leader_block_hook", "mag_cache_block_hook"),
    "pab": ("pyramid_attention_broadcast",),
}


def _remove_hooks(denoiser: torch.nn.Module, kind: str, handles: list) -> None:
    for handle in handles:
        handle.remove()
    registry = HookRegistry.check_if_exists_or_initialize(denoiser)
    for name in _HOOK_NAMES[kind]:
        registry.remove_hook(name, recurse=True)
    registry.invalidate_child_registries_cache()


def _count_hooks(denoiser: torch.nn.Module, kind: str) -> int:
    registries = [getattr(module, "_diffusers_hook", None) for module in denoiser.modules()]
    return sum(name in registry.hooks for registry in registries if registry is not None for name in _HOOK_NAMES[kind])


def _accelerator(kind: str, label: str, apply: Callable[[torch.nn.Module], Any], spec: str, target: Target) -> Method:
    """A diffusers hook-based accelerator as a method; `apply(denoiser)` puts its hooks on and returns the torch hook
    handles it added besides (or `None`)."""

    @contextlib.contextmanager
    def session(pipe: Any) -> Iterator[Work]:
        denoiser = denoiser_of(pipe)
        with exit_schedule_in_force(pipe, None):  # the accelerator alone, on the model at full depth
            work = _BlockWork(denoiser)  # first: its counters sit beneath the accelerator's hooks
            handles = []
            try:
                handles = apply(denoiser) or []
                HookRegistry.check_if_exists_or_initialize(denoiser).invalidate_child_registries_cache()
                # Our denoisers are not CacheMixin models; the stateful hooks read their state under diffusers'
                # context.
                with CacheMixin.cache_context(denoiser, "cond"):
                    blocks = num_exit_blocks(denoiser)
                    yield Work(work.fraction, lambda: [share * blocks for share in work.per_call])
            finally:
                _remove_hooks(denoiser, kind, handles)
                work.remove()

    denoiser = denoiser_of(target.pipe_of(target.model))
    handles = []
    try:  # a trial application on the real denoiser tells whether the accelerator supports it
        handles = apply(denoiser) or []
        applied = _count_hooks(denoiser, kind)
    except (ValueError, TypeError, IndexError, KeyError, AttributeError) as error:
        reason = f"diffusers' {label} does not apply to {type(denoiser).__name__}: {error or type(error).__name__}"
        return Method(spec, target.model, unsupported=reason)
    finally:
        _remove_hooks(denoiser, kind, handles)
    if not applied:
        reason = f"diffusers' {label} found no module of {type(denoiser).__name__} to hook"
        return Method(spec, target.model, unsupported=reason)
    return Method(spec, target.model, session)


def _fbcache(threshold: float, spec: str, target: Target) -> Method:
    config = FirstBlockCacheConfig(threshold=threshold)
    return _accelerator(
        "fbcache", "FirstBlockCache", lambda denoiser: apply_first_block_cache(denoiser, config), spec, target
    )


def _block_list(denoiser: torch.nn.Module) -> torch.nn.ModuleList | list:
    return next((c for c in denoiser.children() if isinstance(c, torch.nn.ModuleList)), [])


def _layerskip(indices: list[int] | None, spec: str, target: Target) -> Method:
    blocks = len(_block_list(denoiser_of(target.pipe_of(target.model))))
    if indices is not None and blocks and max(indices) >= blocks:
        raise ValueError(f"Bad method {spec!r}: {target.model} has blocks 0 to {blocks - 1}, got {max(indices)}.")

    def apply(denoiser: torch.nn.Module) -> None:
        apply_layer_skip(denoiser, LayerSkipConfig(indices=indices or [len(_block_list(denoiser)) // 2]))

    return _accelerator("layerskip", "LayerSkip", apply, spec, target)


# The attention modules of a block list (`transformer_blocks.3.attn1`); diffusers' default patterns miss DiT's `attn1`.
_BLOCK_ATTENTION = r"[^.]*blocks\.\d+\.attn\d*"


def _taylorseer(parsed: tuple[int, int], spec: str, target: Target) -> Method:
    interval, order = parsed

    def apply(denoiser: torch.nn.Module) -> None:
        config = TaylorSeerCacheConfig(
            cache_interval=interval,
            max_order=order,
            taylor_factors_dtype=denoiser.dtype,
            cache_identifiers=[_BLOCK_ATTENTION],
        )
        apply_taylorseer_cache(denoiser, config)

    return _accelerator("taylorseer", "TaylorSeer", apply, spec, target)


def _magcache(parsed: tuple[float, int], spec: str, target: Target) -> Method:
    threshold, max_skips = parsed
    configs = [MagCacheConfig(calibrate=True, num_inference_steps=target.steps)]  # for the trial application
    method = _accelerator(
        "magcache", "MagCache", lambda denoiser: apply_mag_cache(denoiser, configs[-1]), spec, target
    )
    if method.unsupported is None:
        ratios = _magnitude_ratios(target.pipe_of(target.model), target)
        configs.append(
            MagCacheConfig(
                threshold=threshold, max_skip_steps=max_skips, num_inference_steps=target.steps, mag_ratios=ratios
            )
        )
    return method


def _magnitude_ratios(pipe: Any, target: Target) -> list[float]:
    """MagCache's calibration: per step, the mean over tokens of |residual_t| / |residual_t-1|, where the residual
    is the last block's output minus the first block's input; measured on one 2-image call."""
    blocks = next(c for c in denoiser_of(pipe).children() if isinstance(c, torch.nn.ModuleList))
    inputs: list[torch.Tensor] = []
    residuals: list[torch.Tensor] = []
    head = blocks[0].register_forward_pre_hook(
        lambda module, args, kwargs: inputs.append(args[0] if args else kwargs["hidden_states"]), with_kwargs=True
    )
    tail = blocks[-1].register_forward_hook(
        lambda module, args, output: residuals.append(
            (output[0] if isinstance(output, tuple) else output).float() - inputs[-1].float()
        )
    )
    try:
        pipe(
            class_labels=target.labels,
            guidance_scale=1.0,
            num_inference_steps=target.steps,
            output_type="pt",
            generator=torch.Generator(pipe.device).manual_seed(0),
        )
    finally:
        head.remove()
        tail.remove()
    norms = [residual.norm(dim=-1) for residual in residuals]
    return [1.0] + [(now / (before + 1e-8)).mean().item() for before, now in zip(norms, norms[1:])]


def _pab(parsed: tuple[int, int, int], spec: str, target: Target) -> Method:
    skip_range, low, high = parsed

    def apply(denoiser: torch.nn.Module) -> list:
        timestep = _TimestepProbe(denoiser)
        config = PyramidAttentionBroadcastConfig(
            spatial_attention_block_skip_range=skip_range,
            spatial_attention_timestep_skip_range=(low, high),
            current_timestep_callback=timestep,
        )
        apply_pyramid_attention_broadcast(denoiser, config)
        return [timestep.handle]

    return _accelerator("pab", "PyramidAttentionBroadcast", apply, spec, target)


class _TimestepProbe:
    """The timestep of the denoiser's current call (PAB asks for it), read by a forward pre-hook on the denoiser."""

    def __init__(self, denoiser: torch.nn.Module) -> None:
        self.timestep: torch.Tensor | None = None
        self.handle = denoiser.register_forward_pre_hook(self._record, with_kwargs=True)

    def _record(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        self.timestep = args[1] if len(args) > 1 else kwargs["timestep"]

    def __call__(self) -> int:
        return int(torch.as_tensor(self.timestep).flatten()[0])


BUILDERS: dict[str, Callable[[Any, str, Target], Method]] = {
    "baseline": _baseline,
    "ase": _ase,
    "finetuned": _finetuned,
    "deediff": _deediff,
    "fbcache": _fbcache,
    "layerskip": _layerskip,
    "taylorseer": _taylorseer,
    "magcache": _magcache,
    "pab": _pab,
}


def build_method(spec: str, target: Target) -> Method:
    """The method a spec names (see the module docstring), built for `target`."""
    kind, argument, steps = kind_of(spec)
    parsed = METHOD_KINDS[kind].parse(argument, spec)
    if steps is None:
        return BUILDERS[kind](parsed, spec, target)
    method = BUILDERS[kind](parsed, spec, dataclasses.replace(target, steps=steps))  # MagCache calibrates at N steps
    return dataclasses.replace(method, name=spec, steps=steps)
