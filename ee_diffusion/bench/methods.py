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
- `seacache[:<threshold>[:<skips>[:<order>]]]`: diffusers' SeaCache: the block stack is replaced by its last residual
  (order 0) or a linear extrapolation of the last two (order 1, default) while the accumulated change of the
  spectrally filtered latents stays below the threshold (default 0.25), at most `skips` steps in a row (default 2);
  the first and last steps run in full. It needs each call's step and noise level, which a probe on the denoiser
  gives it (the step counted from the timesteps, the noise level from the pipeline's scheduler).
- `fastercache[:<range>[:<lo>-<hi>[:<cfg>]]]`: diffusers' FasterCache: self-attention is computed every `range` calls
  (default 2) while the timestep lies in (lo, hi) (default -1-681) and extrapolated from the last two otherwise;
  under guidance the unconditional half of the batch is computed every `cfg` calls (default 5, while the timestep is
  below 641) and estimated from the conditional half in between (see `_FasterCacheCalls`).

Peers (the `peers` extra: `pip install 'ee-diffusion[peers]'`; without it their rows say so):
- `dbcache[:<threshold>[:<Fn>[:<Bn>[:<warmup>]]]]`: cache-dit's DBCache: the first `Fn` blocks (default 1) always
  run; when their residual changed by less than the threshold (default 0.08) since the last full step, the middle
  blocks are replaced by their cached residual and the last `Bn` (default 0) run on it; the first `warmup` steps
  (default 4) run in full.
- `dbcache-taylorseer[:<order>[:<dbcache args>]]`: DBCache with cache-dit's TaylorSeer calibrator of `order`
  (default 1) forecasting the cached residual.
- `dbcache-scm[:<mask>[:<dbcache args>]]`: DBCache under cache-dit's predefined step computation mask for the cell's
  step count (`slow`, `medium`, `fast`, `ultra`): masked steps cache when DBCache's threshold allows, or always with
  `-static`.
- `deepcache[:<interval>[:<branch>]]`: DeepCache (`DeepCacheSDHelper`) on a pipeline's U-Net: everything below the
  skip branch (default 0, the shallowest) is cached and recomputed every `interval` steps (default 3).

The diffusers accelerators are applied to the denoiser with `diffusers.hooks` on the same model as `baseline`, and
cache-dit to the denoiser alone (a `BlockAdapter` without the pipeline, so the pipeline class is not patched); each is
taken off after every batch, and whatever cache-dit or DeepCache leave on the modules (a patched `forward`, stats, the
order of the children) is put back as it was. Where one does not apply to the model (a U-Net, a block class it has no
adapter or metadata for, no attention it recognises), the method's row carries the reason (`Method.unsupported`) and
no numbers. Their block fraction is measured by hooks beneath theirs on the attention and feed-forward modules in the
denoiser's block lists: the share of those modules' `nn.Linear` weights that ran per denoiser call, a module run on
part of the call's batch counting that part (these counting hooks cost a little time, so accelerator speedups are, if
anything, understated). DeepCache's, on a U-Net, counts the U-Net's exit units that ran, the axis of our U-Net rows
(its savings in the encoder are not on that axis).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import torch
from diffusers.hooks import (
    FasterCacheConfig,
    FirstBlockCacheConfig,
    HookRegistry,
    LayerSkipConfig,
    MagCacheConfig,
    ModelHook,
    PyramidAttentionBroadcastConfig,
    SeaCacheConfig,
    TaylorSeerCacheConfig,
    apply_faster_cache,
    apply_first_block_cache,
    apply_layer_skip,
    apply_mag_cache,
    apply_pyramid_attention_broadcast,
    apply_sea_cache,
    apply_taylorseer_cache,
)
from diffusers.hooks._helpers import TransformerBlockRegistry
from diffusers.hooks.hooks import CacheContext
from diffusers.models.attention import AttentionModuleMixin, FeedForward
from diffusers.models.attention_processor import Attention
from diffusers.models.cache_utils import CacheMixin

from ..exits import denoiser_of, exit_schedule_in_force, exit_units, num_exit_blocks
from ..exits.scheduler_steps import check_scheduler_steps_over
from ..pipelines.class_conditional import null_class_label
from ..schedules import ExitSchedule
from .method_specs import METHOD_KINDS, DBCacheArguments, kind_of


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
    """The work of the calls made under the pipeline's exit schedule or exit heads, from its `exit_stats` (a plan's
    dropped steps, which make no call, count there as steps that ran no block)."""
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
    """What a method is built for: the bench's model, its pipeline loader, the cell's scheduler steps, and the
    arguments of a small call of the model (besides steps, generator and output type) for the methods that calibrate
    on the model (MagCache): two of the bench's own class labels or prompts, at its sizes."""

    model: str
    pipe_of: Callable[[str], Any]
    steps: int
    call_kwargs: dict[str, Any] = field(default_factory=lambda: {"class_labels": [0, 1], "guidance_scale": 1.0})


def _baseline(parsed: None, spec: str, target: Target) -> Method:
    return Method("baseline", target.model)


def _fitted(schedule: ExitSchedule, pipe: Any, target: Target) -> ExitSchedule:
    """`schedule`, checked to run in the cell: a plan only at its own scheduler and step count, and one that drops
    steps only under a scheduler that can step over them."""
    schedule.check_run(type(pipe.scheduler).__name__, target.steps)
    if schedule.drops:
        check_scheduler_steps_over(pipe.scheduler)
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


def _deediff(parsed: tuple[float | None, str | None, str | None], spec: str, target: Target) -> Method:
    from ..exits import ExitHeads
    from ..exits.uncertainty import SUPPORTED
    from ..pipelines.loading import resolve_pretrained

    threshold, policy, decision = parsed
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
        rule = {name: heads.config.get(name) for name in ("threshold", "policy", "decision")}
        own = (pipe.exit_schedule, getattr(pipe, "exit_heads", None))
        heads.set_exit_rule(threshold=threshold, policy=policy, decision=decision)
        pipe.exit_schedule, pipe.exit_heads = None, heads
        try:
            yield _exit_work(pipe)
        finally:
            pipe.exit_heads, pipe.exit_schedule = own[1], own[0]
            heads.set_exit_rule(**rule)

    return Method(spec, target.model, session)


def batch_rows(args: tuple, kwargs: dict) -> int | None:
    """The batch size of a module call: the first dimension of its first tensor argument."""
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return value.shape[0]
    return None


class _RunCounter(ModelHook):
    """Adds its module's weight to a tally each time the module's own forward really runs, in the share of the
    denoiser call's batch that it ran on (FasterCache runs the blocks on the conditional half only)."""

    def __init__(self, tally: BlockWork, weights: float) -> None:
        super().__init__()
        self.tally, self.weights = tally, weights

    def new_forward(self, module: torch.nn.Module, *args, **kwargs) -> Any:
        self.count(batch_rows(args, kwargs))
        return self.fn_ref.original_forward(*args, **kwargs)

    def count(self, rows: int | None) -> None:
        """Tally one run of the module on `rows` rows of the call's batch (`None`: all of it)."""
        self.tally.done += self.weights * self.tally.share(rows)


# The modules whose work the accelerators' rows count inside a block: attention (diffusers' `Attention` and the newer
# attention classes of Flux and others), feed-forward, and the block's own linear layers (the MLP of Flux's
# single-stream blocks).
_COUNTED = (Attention, AttentionModuleMixin, FeedForward)


def _block_parts(block: torch.nn.Module) -> list[tuple[torch.nn.Module, float]]:
    """The parts of one block whose runs are counted, each with its share of the block: its attention and
    feed-forward modules and the linear layers that are the block's own children, in proportion to their `nn.Linear`
    weights (the conditioning layers inside its norms are left out: DiT also calls the first block's outside it)."""
    parts = [module for module in block.modules() if isinstance(module, _COUNTED)]
    parts += [child for child in block.children() if isinstance(child, torch.nn.Linear)]
    sizes = [sum(m.weight.numel() for m in part.modules() if isinstance(m, torch.nn.Linear)) for part in parts]
    total = sum(sizes)
    return [(part, Fraction(size, total)) for part, size in zip(parts, sizes) if size]  # exact: a block adds up to 1


class BlockWork:
    """Share of the work of the denoiser's block lists that ran per call, in blocks: each block of its block lists
    counts one, shared among its parts (`_block_parts`) -- the axis of the exit units, where a block is a block, so
    that the accelerators' rows and ours stand on one scale. (Weighting the parts across blocks by their weights
    would not do: a double-stream block holds a weight per stream, each stream working on its own tokens only.)
    `units`: count these modules instead, one unit each (a U-Net's exit units, the axis of our U-Net rows).

    Put on before an accelerator, its counters are the innermost hooks of those modules: an accelerator hook that
    answers from a cache, or skips the block around them, keeps them from counting. They run in Python around the
    module's forward; under `--compile` a compiled block counts its modules' runs for them, outside its graph
    (`ee_diffusion.bench.harness.compile_blocks`). A module run on part of the call's batch counts that part.
    """

    NAME = "ee_block_work"

    def __init__(self, denoiser: torch.nn.Module, units: list[torch.nn.Module] | None = None) -> None:
        if units is None:
            lists = [child for child in denoiser.children() if isinstance(child, torch.nn.ModuleList)]
            parts = [part for blocks in lists for block in blocks for part in _block_parts(block)]
            layers, weights = [part for part, _ in parts], [share for _, share in parts]
        else:
            layers, weights = list(units), [1] * len(units)
        self.layers = layers
        self.total = self.done = 0  # `done`: the work of the denoiser call under way
        self.rows: int | None = None  # the batch size of the denoiser call under way
        self.per_call: list[float] = []  # the share of the work each finished denoiser call ran
        for layer, weight in zip(layers, weights):
            HookRegistry.check_if_exists_or_initialize(layer).register_hook(_RunCounter(self, weight), self.NAME)
            self.total += weight
        self.handles = [
            denoiser.register_forward_pre_hook(self._started, with_kwargs=True),
            denoiser.register_forward_hook(self._called),
        ]

    def _started(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        self.rows = batch_rows(args, kwargs)

    def share(self, rows: int | None) -> Fraction:
        return Fraction(1) if not rows or not self.rows else min(Fraction(1), Fraction(rows, self.rows))

    def _called(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        self.per_call.append(float(self.done / self.total) if self.total else 1.0)
        self.done = 0

    def fraction(self) -> float:
        return sum(self.per_call) / len(self.per_call) if self.per_call else 1.0

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        for layer in self.layers:
            HookRegistry.check_if_exists_or_initialize(layer).remove_hook(self.NAME, recurse=False)


def _work_of(work: BlockWork, denoiser: torch.nn.Module) -> Work:
    """The `Work` a session yields from its counters: each call's share, and in blocks' worth of the model's depth."""
    try:
        blocks = num_exit_blocks(denoiser)
    except TypeError:  # a denoiser early exit does not know: the blocks of its block lists
        blocks = sum(len(c) for c in denoiser.children() if isinstance(c, torch.nn.ModuleList))
    return Work(work.fraction, lambda: [share * blocks for share in work.per_call])


# The names diffusers registers each accelerator's hooks under (what `CacheMixin.disable_cache` removes).
_HOOK_NAMES = {
    "fbcache": ("fbc_leader_block_hook", "fbc_block_hook"),
    "layerskip": ("layer_skip_hook",),
    "taylorseer": ("taylorseer_cache",),
    "magcache": ("mag_cache_leader_block_hook", "mag_cache_block_hook"),
    "pab": ("pyramid_attention_broadcast",),
    "seacache": ("sea_cache_root", "sea_cache_leader_block", "sea_cache_block", "sea_cache_post_norm"),
    "fastercache": ("faster_cache_denoiser", "faster_cache_block"),
}
# The hooks that show an accelerator found something to work on (default: any of its hooks). FasterCache always hooks
# the denoiser itself, whether or not it finds an attention module to cache.
_WORKING_HOOKS = {"fastercache": ("faster_cache_block",)}


def _registries(denoiser: torch.nn.Module) -> Iterator[HookRegistry]:
    for module in denoiser.modules():
        registry = getattr(module, "_diffusers_hook", None)
        if registry is not None:
            yield registry


def _remove_hooks(denoiser: torch.nn.Module, kind: str, handles: list) -> None:
    """Take an accelerator's hooks off, on each module the last registered first: diffusers' `remove_hook` of a hook
    registered before another on the same module loses that other's forward."""
    for handle in handles:
        handle.remove()
    for registry in _registries(denoiser):
        for name in reversed(list(registry.hooks)):
            if name in _HOOK_NAMES[kind]:
                registry.remove_hook(name, recurse=False)
    HookRegistry.check_if_exists_or_initialize(denoiser).invalidate_child_registries_cache()


def _count_hooks(denoiser: torch.nn.Module, kind: str) -> int:
    names = _WORKING_HOOKS.get(kind, _HOOK_NAMES[kind])
    return sum(name in registry.hooks for registry in _registries(denoiser) for name in names)


def _accelerator(
    kind: str, label: str, apply: Callable[[torch.nn.Module, Any], Any], spec: str, target: Target
) -> Method:
    """A diffusers hook-based accelerator as a method; `apply(denoiser, pipe)` puts its hooks on and returns the torch
    hook handles it added besides (or `None`)."""

    @contextlib.contextmanager
    def session(pipe: Any) -> Iterator[Work]:
        denoiser = denoiser_of(pipe)
        with exit_schedule_in_force(pipe, None):  # the accelerator alone, on the model at full depth
            work = BlockWork(denoiser)  # first: its counters sit beneath the accelerator's hooks
            handles = []
            try:
                handles = apply(denoiser, pipe) or []
                HookRegistry.check_if_exists_or_initialize(denoiser).invalidate_child_registries_cache()
                # Our denoisers are not CacheMixin models; the stateful hooks read their state under diffusers'
                # context.
                with CacheMixin.cache_context(denoiser, "cond"):
                    yield _work_of(work, denoiser)
            finally:
                _remove_hooks(denoiser, kind, handles)
                work.remove()

    pipe = target.pipe_of(target.model)
    denoiser = denoiser_of(pipe)
    handles = []
    try:  # a trial application on the real denoiser tells whether the accelerator supports it
        handles = apply(denoiser, pipe) or []
        applied = _count_hooks(denoiser, kind)
    except (ValueError, TypeError) as error:  # diffusers' own refusal, which says why
        reason = f"diffusers' {label} does not apply to {type(denoiser).__name__}: {error or type(error).__name__}"
        return Method(spec, target.model, unsupported=reason)
    except (IndexError, KeyError, AttributeError) as error:  # it broke on a layout it does not know
        name = type(denoiser).__name__
        reason = (
            f"diffusers' {label} does not apply to {name}: it hooks a transformer's stack of blocks, which {name} "
            f"does not have in a form it knows ({type(error).__name__}: {error})"
        )
        return Method(spec, target.model, unsupported=reason)
    finally:
        _remove_hooks(denoiser, kind, handles)
    if not applied:
        reason = f"diffusers' {label} found no module of {type(denoiser).__name__} to hook"
        return Method(spec, target.model, unsupported=reason)
    return Method(spec, target.model, session)


def _text_stream_dropped(spec: str, target: Target, label: str, consequence: str) -> Method | None:
    """A row refused where the denoiser's last block returns no text stream (SD3's, `context_pre_only`), which
    diffusers' FirstBlockCache and SeaCache take from the block stack's output."""
    denoiser = denoiser_of(target.pipe_of(target.model))
    blocks = _block_list(denoiser)
    if not len(blocks) or not getattr(blocks[-1], "context_pre_only", False):
        return None
    reason = (
        f"diffusers' {label} does not apply to {type(denoiser).__name__}: its last block returns no text stream "
        f"(context_pre_only), {consequence}"
    )
    return Method(spec, target.model, unsupported=reason)


def _fbcache(threshold: float, spec: str, target: Target) -> Method:
    refused = _text_stream_dropped(spec, target, "FirstBlockCache", "from which it subtracts (a TypeError at a call)")
    if refused is not None:
        return refused
    config = FirstBlockCacheConfig(threshold=threshold)
    return _accelerator(
        "fbcache", "FirstBlockCache", lambda denoiser, pipe: apply_first_block_cache(denoiser, config), spec, target
    )


def _block_list(denoiser: torch.nn.Module) -> torch.nn.ModuleList | list:
    return next((c for c in denoiser.children() if isinstance(c, torch.nn.ModuleList)), [])


def _layerskip(indices: list[int] | None, spec: str, target: Target) -> Method:
    blocks = len(_block_list(denoiser_of(target.pipe_of(target.model))))
    if indices is not None and blocks and max(indices) >= blocks:
        raise ValueError(f"Bad method {spec!r}: {target.model} has blocks 0 to {blocks - 1}, got {max(indices)}.")

    def apply(denoiser: torch.nn.Module, pipe: Any) -> None:
        apply_layer_skip(denoiser, LayerSkipConfig(indices=indices or [len(_block_list(denoiser)) // 2]))

    return _accelerator("layerskip", "LayerSkip", apply, spec, target)


# The attention modules of a block list (`transformer_blocks.3.attn1`); diffusers' default patterns miss DiT's `attn1`.
_BLOCK_ATTENTION = r"[^.]*blocks\.\d+\.attn\d*"


def _taylorseer(parsed: tuple[int, int], spec: str, target: Target) -> Method:
    interval, order = parsed

    def apply(denoiser: torch.nn.Module, pipe: Any) -> None:
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
        "magcache", "MagCache", lambda denoiser, pipe: apply_mag_cache(denoiser, configs[-1]), spec, target
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
    try:
        blocks = exit_units(pipe)  # a double- then single-stream model's blocks, in order
    except TypeError:
        blocks = next(c for c in denoiser_of(pipe).children() if isinstance(c, torch.nn.ModuleList))
    inputs: list[torch.Tensor] = []
    residuals: list[torch.Tensor] = []
    head = blocks[0].register_forward_pre_hook(
        lambda module, args, kwargs: inputs.append(args[0] if args else kwargs["hidden_states"]), with_kwargs=True
    )
    tail = blocks[-1].register_forward_hook(
        lambda module, args, output: residuals.append(_image_stream(module, output).float() - inputs[-1].float())
    )
    try:
        pipe(
            **target.call_kwargs,
            num_inference_steps=target.steps,
            output_type="pt",
            generator=torch.Generator(pipe.device).manual_seed(0),
        )
    finally:
        head.remove()
        tail.remove()
    norms = [residual.norm(dim=-1) for residual in residuals]
    return [1.0] + [(now / (before + 1e-8)).mean().item() for before, now in zip(norms, norms[1:])]


def _image_stream(block: torch.nn.Module, output: Any) -> torch.Tensor:
    """The hidden states a transformer block returns: the image stream of a block that returns both streams (where
    diffusers' block registry says it is; the first output otherwise)."""
    if not isinstance(output, tuple):
        return output
    try:
        index = TransformerBlockRegistry.get(type(block)).return_hidden_states_index
    except ValueError:
        index = None
    return output[index if index is not None else 0]


def _pab(parsed: tuple[int, int, int], spec: str, target: Target) -> Method:
    skip_range, low, high = parsed

    def apply(denoiser: torch.nn.Module, pipe: Any) -> list:
        # The scheduler's timestep, which the window is written in (Flux's pipeline hands its denoiser `t / 1000`).
        probe = _StepProbe(denoiser, pipe)
        config = PyramidAttentionBroadcastConfig(
            spatial_attention_block_skip_range=skip_range,
            spatial_attention_timestep_skip_range=(low, high),
            current_timestep_callback=probe.scheduler_timestep,
        )
        apply_pyramid_attention_broadcast(denoiser, config)
        return [probe.handle]

    return _accelerator("pab", "PyramidAttentionBroadcast", apply, spec, target)


class _TimestepProbe:
    """The timestep of the denoiser's current call, read by a forward pre-hook on the denoiser."""

    def __init__(self, denoiser: torch.nn.Module) -> None:
        self.timestep: torch.Tensor | None = None
        self.handle = denoiser.register_forward_pre_hook(self._record, with_kwargs=True)

    def _record(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        self.timestep = args[1] if len(args) > 1 else kwargs["timestep"]

    def __call__(self) -> int:
        return int(torch.as_tensor(self.timestep).flatten()[0])


class _StepProbe(_TimestepProbe):
    """Where the sampling loop stands at the denoiser's current call: its step (counted from the calls' timesteps: a
    timestep above the last one starts a new trajectory, an equal one is the same step), and the pipeline scheduler's
    timestep and noise level there. `on_call(probe)` runs after each record."""

    def __init__(
        self, denoiser: torch.nn.Module, pipe: Any, on_call: Callable[[_StepProbe], Any] | None = None
    ) -> None:
        self.pipe, self.on_call = pipe, on_call
        self.step, self.calls, self.last = -1, 0, None
        super().__init__(denoiser)

    def _record(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> Any:
        super()._record(module, args, kwargs)
        now = float(torch.as_tensor(self.timestep).flatten()[0])
        self.step = 0 if self.last is None or now > self.last else self.step + (now < self.last)
        self.calls, self.last = self.calls + 1, now
        return self.on_call(self) if self.on_call is not None else None

    def _timesteps(self) -> torch.Tensor | None:
        timesteps = getattr(getattr(self.pipe, "scheduler", None), "timesteps", None)
        return timesteps if timesteps is not None and 0 <= self.step < len(timesteps) else None

    def scheduler_timestep(self) -> float:
        """The pipeline scheduler's `t` of this step (Flux's pipeline hands its denoiser `t / 1000`)."""
        timesteps = self._timesteps()
        return float(timesteps[self.step]) if timesteps is not None else float(self())

    def sigma(self) -> float | None:
        """The noise level of this step as the share of noise in the sample, in [0, 1]: a flow-matching scheduler's
        sigma, or sqrt(1 - a) / (sqrt(a) + sqrt(1 - a)) at the cumulative alpha a of a variance-preserving one."""
        scheduler, timesteps = getattr(self.pipe, "scheduler", None), self._timesteps()
        if timesteps is None:
            return None
        sigmas, alphas = getattr(scheduler, "sigmas", None), getattr(scheduler, "alphas_cumprod", None)
        if _flow_matching(scheduler) or alphas is None:
            if sigmas is not None and self.step < len(sigmas) and 0 <= float(sigmas[self.step]) <= 1:
                return float(sigmas[self.step])
            return None
        alpha = float(alphas[min(max(round(float(timesteps[self.step])), 0), len(alphas) - 1)])
        return math.sqrt(1 - alpha) / (math.sqrt(alpha) + math.sqrt(1 - alpha))

    def context(self) -> CacheContext:
        timesteps = self._timesteps()
        return CacheContext(
            "cond",
            step_index=self.step,
            num_inference_steps=None if timesteps is None else len(timesteps),
            timestep=self.scheduler_timestep(),
            sigma=self.sigma(),
        )


def _flow_matching(scheduler: Any) -> bool:
    """A flow-matching scheduler (its sigmas are the noise share; a DPM-Solver with flow sigmas keeps meaningless
    `alphas_cumprod` of its default betas)."""
    config = getattr(scheduler, "config", {})
    return type(scheduler).__name__.startswith("FlowMatch") or bool(config.get("use_flow_sigmas", False))


def _noise_level_known(scheduler: Any) -> bool:
    if _flow_matching(scheduler):
        return getattr(scheduler, "sigmas", None) is not None
    return getattr(scheduler, "alphas_cumprod", None) is not None or getattr(scheduler, "sigmas", None) is not None


def _image_latents(module: torch.nn.Module, args: tuple, kwargs: dict) -> list[torch.Tensor] | None:
    """SeaCache's indicator input: the latents of a denoiser call, one (C, 1, H, W) tensor per sample, from an image
    batch (B, C, H, W) or from Flux's packed tokens (B, H * W, C) laid out by `img_ids`; `None` otherwise (SeaCache
    then runs the call in full)."""
    latents = args[0] if args else kwargs.get("hidden_states", kwargs.get("sample"))
    if not isinstance(latents, torch.Tensor):
        return None
    ids = kwargs.get("img_ids")
    if latents.dim() == 3 and isinstance(ids, torch.Tensor) and ids.dim() == 2 and len(ids) == latents.shape[1]:
        height, width = int(ids[:, 1].max()) + 1, int(ids[:, 2].max()) + 1
        if height * width == latents.shape[1]:
            latents = latents.reshape(latents.shape[0], height, width, -1).permute(0, 3, 1, 2)
    return [sample.unsqueeze(1) for sample in latents] if latents.dim() == 4 else None


# The denoisers SeaCache reads the latents of itself (its own adapters): ours would replace them.
_SEA_CACHE_ADAPTED = ("Cosmos3OmniTransformer", "WanTransformer3DModel")


def _seacache(parsed: tuple[float, int, int], spec: str, target: Target) -> Method:
    threshold, skips, order = parsed

    def apply(denoiser: torch.nn.Module, pipe: Any) -> list:
        managers = []
        probe = _StepProbe(denoiser, pipe, on_call=lambda probe: managers[0].set_context(probe.context()))
        config = SeaCacheConfig(
            threshold=threshold,
            max_consecutive_cached=skips,
            residual_order=order,
            raw_vision_callback=None if type(denoiser).__name__ in _SEA_CACHE_ADAPTED else _image_latents,
        )
        try:
            apply_sea_cache(denoiser, config)
        except BaseException:
            probe.handle.remove()
            raise
        # Each call carries the step, the step count and the noise level SeaCache gates on (its pipelines pass them to
        # `cache_context`; ours do not), set by the probe on the hooks' shared state before the call runs.
        managers.append(HookRegistry.check_if_exists_or_initialize(denoiser).get_hook("sea_cache_root").state_manager)
        return [probe.handle]

    refused = _text_stream_dropped(spec, target, "SeaCache", "so it never records a residual to reuse")
    if refused is not None:
        return refused
    method = _accelerator("seacache", "SeaCache", apply, spec, target)
    scheduler = target.pipe_of(target.model).scheduler
    if method.unsupported is None and not _noise_level_known(scheduler):
        reason = f"diffusers' SeaCache needs each step's noise level: {type(scheduler).__name__} gives none"
        return dataclasses.replace(method, unsupported=reason)
    if method.unsupported is None and target.steps < 3:
        reason = f"diffusers' SeaCache computes the first step and the last in full: at {target.steps} it reuses none"
        return dataclasses.replace(method, unsupported=reason)
    return method


# What FasterCache splits into the unconditional and conditional halves of a guided call (diffusers' list, the
# class-conditional denoisers' labels and SD3's pooled text embeddings).
_GUIDED_INPUTS = [
    "hidden_states",
    "encoder_hidden_states",
    "timestep",
    "attention_mask",
    "encoder_attention_mask",
    "class_labels",
    "pooled_projections",
]


class _FasterCacheCalls(_StepProbe):
    """What FasterCache needs of each denoiser call and the pipelines do not give it as it expects.

    - Whether the call is guided, which FasterCache's hooks are told per call (`is_guidance_distilled` is its name for
      "not guided"; without guidance they only cache attention): a class-conditional call whose batch ends in a half
      of null class labels, or a call of a pipeline that says `do_classifier_free_guidance` (SD3's).
    - FasterCache computes the second half of a guided batch and estimates the first (diffusers' text pipelines put
      the unconditional half first): a class-conditional call, conditional half first, is handed to it swapped, and
      its output put back in the pipeline's order.
    - Its timestep is the scheduler's, and on the first call of a trajectory one outside every window: diffusers'
      FasterCache (0.42) reads an empty attention cache there when the first timestep lies inside the window and
      the call is not guided (a `TypeError`), where it means to compute.
    """

    def __init__(self, denoiser: torch.nn.Module, pipe: Any) -> None:
        super().__init__(denoiser, pipe, on_call=self._prepare)
        try:
            self.null = null_class_label(denoiser)
        except TypeError:
            self.null = None
        self.guided = self.swapped = False
        self.hooks: list[ModelHook] | None = None  # FasterCache's, found at the first call
        self.output_handle = denoiser.register_forward_hook(self._restore_order)
        self.handles = [self.handle, self.output_handle]

    def current_timestep(self) -> float:
        return math.inf if self.step == 0 else self.scheduler_timestep()

    def _prepare(self, probe: _StepProbe) -> tuple[tuple, dict] | None:
        args, kwargs = self._call
        labels, rows = kwargs.get("class_labels"), batch_rows(args, kwargs) or 0
        half = rows // 2 if rows % 2 == 0 else 0
        self.swapped = bool(
            half
            and isinstance(labels, torch.Tensor)
            and len(labels) == rows
            and self.null is not None
            and (labels[half:] == self.null).all()
        )
        self.guided = self.swapped or bool(half and getattr(self.pipe, "do_classifier_free_guidance", False) is True)
        if self.hooks is None:
            names = _HOOK_NAMES["fastercache"]
            self.hooks = [hook for r in _registries(self.denoiser) for name, hook in r.hooks.items() if name in names]
        for hook in self.hooks:
            hook.is_guidance_distilled = not self.guided
        if not self.swapped:
            return None
        return tuple(self._swap(a, rows) for a in args), {k: self._swap(v, rows) for k, v in kwargs.items()}

    @staticmethod
    def _swap(value: Any, rows: int) -> Any:
        if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == rows:
            return torch.cat([value[rows // 2 :], value[: rows // 2]])
        return value

    def _record(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> Any:
        self.denoiser, self._call = module, (args, kwargs)
        return super()._record(module, args, kwargs)

    def _restore_order(self, module: torch.nn.Module, args: Any, output: Any) -> Any:
        if not self.swapped:
            return None
        if isinstance(output, tuple):
            return (self._swap(output[0], len(output[0])), *output[1:])
        output.sample = self._swap(output.sample, len(output.sample))
        return output


@contextlib.contextmanager
def _quiet(*prefixes: str) -> Iterator[None]:
    """The loggers named with these prefixes at ERROR for a while (the peers report every application at INFO or
    WARNING: the FasterCache is experimental notice, cache-dit's enable and disable lines on stdout)."""
    loggers = [logging.getLogger(name) for name in list(logging.root.manager.loggerDict) if name.startswith(prefixes)]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def _fastercache(parsed: tuple[int, tuple[int, int], int], spec: str, target: Target) -> Method:
    attention_range, window, unconditional_range = parsed

    def apply(denoiser: torch.nn.Module, pipe: Any) -> list:
        calls = _FasterCacheCalls(denoiser, pipe)
        config = FasterCacheConfig(
            spatial_attention_block_skip_range=attention_range,
            spatial_attention_timestep_skip_range=window,
            unconditional_batch_skip_range=unconditional_range,
            current_timestep_callback=calls.current_timestep,
            attention_weight_callback=lambda module: 0.5,  # diffusers' default, given to silence its notice
            tensor_format="BCHW",
            is_guidance_distilled=True,  # per call: see `_FasterCacheCalls`
            _unconditional_conditional_input_kwargs_identifiers=_GUIDED_INPUTS,
        )
        try:
            with _quiet("diffusers.hooks.faster_cache"):
                apply_faster_cache(denoiser, config)
        except BaseException:
            for handle in calls.handles:
                handle.remove()
            raise
        return calls.handles

    return _accelerator("fastercache", "FasterCache", apply, spec, target)


_MISSING = object()


class _ModuleState:
    """What a peer that patches modules by hand may leave on them, taken before it is applied and put back after it is
    removed: each module's instance attributes (a patched `forward`, flags, stats) and its children, in their order."""

    def __init__(self, root: torch.nn.Module) -> None:
        self.saved = [
            (module, set(vars(module)), vars(module).get("forward", _MISSING), list(module._modules.items()))
            for module in root.modules()
        ]

    def restore(self) -> None:
        for module, keys, forward, children in self.saved:
            attributes = vars(module)
            for key in set(attributes) - keys:
                del attributes[key]
            if forward is _MISSING:
                attributes.pop("forward", None)
            else:
                attributes["forward"] = forward
            if list(module._modules.items()) != children:
                module._modules.clear()
                module._modules.update(children)


def _not_installed(package: str, spec: str, target: Target) -> Method:
    reason = f"{package} is not installed (pip install 'ee-diffusion[peers]')"
    return Method(spec, target.model, unsupported=reason)


def _cache_dit_adapter(denoiser: torch.nn.Module, **kwargs: Any) -> Any:
    """cache-dit's block adapter of the denoiser alone (no pipeline: cache-dit then keeps one cache context for the
    denoiser's calls instead of patching the pipeline class's `__call__`), or `None` where it has none."""
    from cache_dit import BlockAdapter, ForwardPattern
    from cache_dit.caching.block_adapters import BlockAdapterRegister
    from diffusers import SD3Transformer2DModel

    if BlockAdapterRegister.is_supported(denoiser):  # by class name: DiT*, PixArt*, Flux*, ...
        return BlockAdapterRegister.get_adapter(denoiser, **kwargs)
    if isinstance(denoiser, SD3Transformer2DModel):  # registered under its pipeline's name, StableDiffusion3
        return BlockAdapter(
            transformer=denoiser,
            blocks=denoiser.transformer_blocks,
            forward_pattern=ForwardPattern.Pattern_1,
            check_forward_pattern=True,
            **kwargs,
        )
    return None


def _dbcache(arguments: DBCacheArguments, spec: str, target: Target) -> Method:
    """cache-dit's DBCache (with its TaylorSeer calibrator, or under a step computation mask) on the denoiser."""
    try:
        import cache_dit
    except ImportError:
        return _not_installed("cache-dit", spec, target)
    pipe = target.pipe_of(target.model)
    denoiser = denoiser_of(pipe)
    name = type(denoiser).__name__
    try:
        adapter = _cache_dit_adapter(denoiser, skip_post_init=True)  # its blocks, nothing patched yet
    except AssertionError as error:
        adapter, refusal = None, f": {error}"
    else:
        refusal = ""
    if adapter is None:
        reason = f"cache-dit has no block adapter for {name}{refusal} (it caches the blocks of DiT-style transformers)"
        return Method(spec, target.model, unsupported=reason)
    lists = adapter.blocks if isinstance(adapter.blocks, list) else [adapter.blocks]
    depth = min(len(blocks) for blocks in adapter.flatten(lists))  # Fn and Bn apply to each list
    if arguments.fn + arguments.bn >= depth:
        raise ValueError(
            f"Bad method {spec!r}: {target.model} has {depth} blocks, so Fn + Bn must be at most {depth - 1} to leave "
            f"a block to cache, got {arguments.fn} + {arguments.bn}."
        )
    steps = target.steps
    if arguments.mask is None and max(arguments.warmup, 1) >= steps:  # the first step has nothing to compare with
        reason = f"cache-dit DBCache computes its {arguments.warmup} warmup steps in full: at {steps} it caches none"
        return Method(spec, target.model, unsupported=reason)
    if arguments.mask is not None and steps < 8 and steps not in (4, 6):
        reason = f"cache-dit's predefined step masks are made for 4, 6 or at least 8 steps, not {steps}"
        return Method(spec, target.model, unsupported=reason)

    def configs() -> dict:
        mask = None if arguments.mask is None else cache_dit.steps_mask(mask_policy=arguments.mask, total_steps=steps)
        cache_config = cache_dit.DBCacheConfig(
            Fn_compute_blocks=arguments.fn,
            Bn_compute_blocks=arguments.bn,
            residual_diff_threshold=arguments.threshold,
            max_warmup_steps=arguments.warmup,
            enable_separate_cfg=False,  # the bench's pipelines batch the guided halves in one call
            num_inference_steps=steps,  # its context starts over after this many calls
            steps_computation_mask=mask,
            steps_computation_policy="static" if arguments.static else "dynamic",
        )
        calibrator = None
        if arguments.order is not None:
            calibrator = cache_dit.TaylorSeerCalibratorConfig(taylorseer_order=arguments.order)
        return {"cache_config": cache_config, "calibrator_config": calibrator}

    @contextlib.contextmanager
    def session(pipe: Any) -> Iterator[Work]:
        denoiser = denoiser_of(pipe)
        with exit_schedule_in_force(pipe, None):
            work = BlockWork(denoiser)  # first: cache-dit calls the blocks (or not) above these counters
            state = _ModuleState(denoiser)
            try:
                with _quiet("cache_dit"):
                    cache_dit.enable_cache(_cache_dit_adapter(denoiser), **configs())
                yield _work_of(work, denoiser)
            finally:
                # cache-dit's own removal leaves its patched forward (DiT's, Flux's) and stats on the modules, and its
                # per-call block swap reorders their children: all put back as they were.
                with _quiet("cache_dit"):
                    cache_dit.disable_cache(denoiser)
                state.restore()
                work.remove()

    try:  # a trial application on the real denoiser tells whether cache-dit's adapter takes it
        with session(pipe):
            pass
    except (AssertionError, ValueError, TypeError, AttributeError, KeyError) as error:
        reason = f"cache-dit does not apply to {name}: {error or type(error).__name__}"
        return Method(spec, target.model, unsupported=reason)
    return Method(spec, target.model, session)


def _one_timestep(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
    """DeepCache reads a call's timestep as one number (`args[1].item()`, as Stable Diffusion's pipeline passes it);
    our class-conditional pipelines pass one per sample, all equal: they go as that one 0-d tensor, which the U-Nets
    broadcast to the batch (the same values)."""
    timestep = args[1] if len(args) > 1 else None
    if isinstance(timestep, torch.Tensor) and timestep.dim() == 1 and len(timestep) > 1:
        if bool((timestep == timestep[0]).all()):
            return (args[0], timestep[0], *args[2:]), kwargs
    return None


def _deepcache(parsed: tuple[int, int], spec: str, target: Target) -> Method:
    """DeepCache's `DeepCacheSDHelper` on the pipeline's U-Net, counted on the U-Net's exit units (ours)."""
    interval, branch = parsed
    try:
        from DeepCache import DeepCacheSDHelper
    except ImportError:
        return _not_installed("DeepCache", spec, target)
    pipe = target.pipe_of(target.model)
    unet = getattr(pipe, "unet", None)
    if not isinstance(unet, torch.nn.Module) or not hasattr(unet, "down_blocks"):
        name = type(denoiser_of(pipe)).__name__
        reason = f"DeepCache caches the deep branches of a U-Net (a pipeline's `unet`), and {name} is not one"
        return Method(spec, target.model, unsupported=reason)
    branches = 3 * len(unet.down_blocks)  # DeepCache numbers 3 branches per down block
    if branch >= branches:
        raise ValueError(f"Bad method {spec!r}: {target.model} has skip branches 0 to {branches - 1}, got {branch}.")

    @contextlib.contextmanager
    def session(pipe: Any) -> Iterator[Work]:
        unet = pipe.unet
        with exit_schedule_in_force(pipe, None):
            units = exit_units(unet)
            work = BlockWork(unet, units=units)  # first: DeepCache's wrappers go around these counters
            state = _ModuleState(unet)
            timestep = unet.register_forward_pre_hook(_one_timestep, with_kwargs=True)
            helper = DeepCacheSDHelper(pipe=pipe)
            helper.set_params(cache_interval=interval, cache_branch_id=branch)
            enabled = False
            try:
                helper.enable()
                enabled = True
                yield Work(work.fraction, lambda: [share * len(units) for share in work.per_call])
            finally:
                if enabled:
                    helper.disable()
                timestep.remove()
                state.restore()  # DeepCache's removal leaves each wrapped module's `forward` as an instance attribute
                work.remove()

    try:  # a trial application tells whether DeepCache finds the U-Net's blocks where it looks
        with session(pipe):
            pass
    except (AttributeError, TypeError, KeyError, IndexError) as error:
        reason = f"DeepCache does not apply to {type(unet).__name__}: {error or type(error).__name__}"
        return Method(spec, target.model, unsupported=reason)
    return Method(spec, target.model, session)


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
    "seacache": _seacache,
    "fastercache": _fastercache,
    "dbcache": _dbcache,
    "dbcache-taylorseer": _dbcache,
    "dbcache-scm": _dbcache,
    "deepcache": _deepcache,
}


def build_method(spec: str, target: Target) -> Method:
    """The method a spec names (see the module docstring), built for `target`."""
    kind, argument, steps = kind_of(spec)
    parsed = METHOD_KINDS[kind].parse(argument, spec)
    if steps is None:
        return BUILDERS[kind](parsed, spec, target)
    method = BUILDERS[kind](parsed, spec, dataclasses.replace(target, steps=steps))  # MagCache calibrates at N steps
    return dataclasses.replace(method, name=spec, steps=steps)
