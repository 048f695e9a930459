"""Drop-in diffusers pipelines that run a denoiser under an `ExitSchedule`, or with DeeDiff's `ExitHeads`.

Each class is its diffusers parent plus an optional `exit_schedule` component: pass it to the constructor or to
`from_pretrained`, and `save_pretrained` writes it (`exit_schedule/exit_schedule.json`) beside the other components.
The DiT and PixArt-alpha ones also take `exit_heads` (uncertainty exits, decided at run time by the heads' exit rule;
`exit_heads/`), instead of a schedule.

A drop-in is only needed to carry the schedule in a pipeline folder: any stock diffusers pipeline whose denoiser the
registry knows (Flux, Wan, Qwen-Image, HunyuanVideo, ... see `ee_diffusion.exits.architectures`) takes a schedule
with `apply_exit_schedule(pipe, schedule)`.
"""

from __future__ import annotations

import functools
import inspect
import os
from typing import Any

from diffusers import (
    DDIMPipeline,
    DDPMPipeline,
    DiffusionPipeline,
    DiTPipeline,
    FluxPipeline,
    PixArtAlphaPipeline,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
)

from ..exits import (
    ExitHeads,
    ExitStats,
    UncertaintyExitStats,
    apply_exit_schedule,
    apply_uncertainty_exit,
    denoiser_of,
    get_exit_schedule,
    get_exit_stats,
    get_uncertainty_exit_heads,
    get_uncertainty_exit_stats,
    remove_exit_schedule,
    remove_uncertainty_exit,
    reset_exit_stats,
    reset_uncertainty_exit_stats,
    set_uncertainty_exit_paired,
    tracked_steps,
)
from ..outputs import refuse_shipped
from ..schedules import ExitSchedule
from ..shipped import shipped_model_path
from .class_conditional import ClassConditionalSamplingMixin

_KINDS = {"exit_schedule": ExitSchedule, "exit_heads": ExitHeads}


def _checked(name: str, value: Any) -> Any:
    if value is not None and not isinstance(value, _KINDS[name]):
        raise TypeError(f"`{name}` must be an {_KINDS[name].__name__} or None, got {type(value).__name__}.")
    return value


class EarlyExitPipelineMixin:
    """What the early-exit pipelines share: the `exit_schedule` component, its hooks and their per-call stats.

    The schedule in force is always `pipe.exit_schedule`: assigning a new one (or `None`) puts its hooks on the
    denoiser (or takes them off) at once. Each call starts a fresh record, readable afterwards as `pipe.exit_stats`.
    """

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "exit_schedule" not in cls._optional_components:
            cls._optional_components = [*cls._optional_components, "exit_schedule"]
        # diffusers' `from_pipe` matches components by the annotated types of `__init__`: take the parent's.
        parent = next(
            base
            for base in cls.__mro__[1:]
            if issubclass(base, DiffusionPipeline) and not issubclass(base, EarlyExitPipelineMixin)
        )
        if "__init__" in cls.__dict__:
            cls.__init__.__annotations__ = {
                **getattr(parent.__init__, "__annotations__", {}),
                **cls.__init__.__annotations__,
            }
        if "__call__" not in cls.__dict__:
            # Each drop-in's `__call__` shows its parent's signature and docstring (`inspect.signature`, `help`), as
            # diffusers' own tests and users' code read it, while running the mixin's `__call__`.
            @functools.wraps(super(EarlyExitPipelineMixin, cls).__call__)
            def __call__(self, *args: Any, **kwargs: Any) -> Any:
                return EarlyExitPipelineMixin.__call__(self, *args, **kwargs)

            cls.__call__ = __call__

    def __setattr__(self, name: str, value: Any) -> None:
        if name not in _KINDS:
            return super().__setattr__(name, value)
        ready = self.__dict__.get("_exit_hooks_ready", False)  # built: an assignment reaches the denoiser at once
        before = self.__dict__.get(name)
        self._assign(name, _checked(name, value))
        if ready:
            try:
                self._sync_exit_hooks()
            except ValueError:  # refused (a schedule and heads both, a schedule for another depth): undone
                self._assign(name, before)
                raise

    def _assign(self, name: str, value: Any) -> None:
        """Set the `exit_schedule` or `exit_heads` component without touching the hooks."""
        ready = self.__dict__.get("_exit_hooks_ready", False)
        self.__dict__["_exit_hooks_ready"] = False
        try:
            super().__setattr__(name, value)
            # diffusers records a component assigned where `None` stood as (None, None), which `save_pretrained`
            # skips: register it.
            if value is not None and self.config.get(name, (None,))[0] is None:
                self.register_modules(**{name: value})
        finally:
            self.__dict__["_exit_hooks_ready"] = ready

    def _register_exit_schedule(self, exit_schedule: ExitSchedule | None, exit_heads: ExitHeads | None = None) -> None:
        self.__dict__["_exit_hooks_ready"] = False
        self.register_modules(exit_schedule=_checked("exit_schedule", exit_schedule))
        if exit_heads is not None or "exit_heads" in self._optional_components:
            self.register_modules(exit_heads=_checked("exit_heads", exit_heads))
        self._sync_exit_hooks()

    def set_exit_schedule(self, exit_schedule: ExitSchedule | None) -> None:
        """Replace the schedule (`None` runs the full model), validating it against the denoiser now."""
        self._register_exit_schedule(exit_schedule)

    def _sync_exit_hooks(self) -> None:
        """Put the hooks of `exit_schedule` or `exit_heads` on the denoiser, and take off any others. (The hook
        functions record the schedule on the pipeline again: assignments made meanwhile do not sync.)"""
        self.__dict__["_exit_hooks_ready"] = False
        try:
            self._put_exit_hooks()
        finally:
            self.__dict__["_exit_hooks_ready"] = True

    def _put_exit_hooks(self) -> None:
        schedule, heads = self.exit_schedule, getattr(self, "exit_heads", None)
        if schedule is not None and heads is not None:
            raise ValueError(
                f"{type(self).__name__} got both `exit_schedule` and `exit_heads`; give one: a schedule "
                "decided ahead of time, or heads that decide at run time."
            )
        if denoiser_of(self) is None:
            # Built without its denoiser (diffusers allows it, e.g. to encode prompts only): nothing to hook yet.
            if schedule is not None or heads is not None:
                raise ValueError(
                    f"{type(self).__name__} has no denoiser to run `exit_schedule` or `exit_heads` on; "
                    "give it one, or set them once it has one."
                )
            return
        if get_uncertainty_exit_heads(self) is not heads:
            remove_uncertainty_exit(self)
        if get_exit_schedule(self) is not schedule:
            if schedule is None:
                remove_exit_schedule(self)
            else:
                apply_exit_schedule(self, schedule)
        if heads is not None and get_uncertainty_exit_heads(self) is not heads:
            apply_uncertainty_exit(self, heads)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs: Any) -> Any:
        """diffusers' `from_pretrained`, where a shipped model's name (`digits-dit-ase`) opens its folder, offline."""
        shipped = shipped_model_path(str(pretrained_model_name_or_path))
        return super().from_pretrained(shipped or pretrained_model_name_or_path, **kwargs)

    def save_pretrained(self, save_directory: str | os.PathLike, *args: Any, **kwargs: Any) -> None:
        """diffusers' `save_pretrained`, refusing the shipped models' folders."""
        refuse_shipped(save_directory)
        super().save_pretrained(save_directory, *args, **kwargs)

    @property
    def components(self) -> dict[str, Any]:
        """diffusers' `components`, with `exit_schedule` only when one is set: without a schedule they build the stock
        parent too (`DiTPipeline(**pipe.components)`). With one, the stock parent refuses it (it cannot run it); use
        `Parent.from_pipe(pipe)`, which shares the denoiser -- and the schedule's hooks on it, until
        `pipe.set_exit_schedule(None)`."""
        components = super().components
        for name in _KINDS:
            if components.get(name) is None:
                components.pop(name, None)
        return components

    @property
    def exit_stats(self) -> ExitStats | UncertaintyExitStats | None:
        """What the last call executed per denoiser call (`None` without a schedule or heads)."""
        if getattr(self, "exit_heads", None) is not None:
            return get_uncertainty_exit_stats(self)
        return None if self.exit_schedule is None else get_exit_stats(self)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self._check_own_exit_hooks()
        self._register_exit_schedule(self.exit_schedule, getattr(self, "exit_heads", None))
        call = inspect.signature(super().__call__).bind(*args, **kwargs)
        call.apply_defaults()
        if self.exit_schedule is not None:
            steps = _run_steps(call.arguments)
            if steps is not None:  # a plan runs only in the run it was made for
                self.exit_schedule.check_run(type(self.scheduler).__name__, steps)
            if tracked_steps(self.scheduler) is None:  # a scheduler set after the schedule: the hooks follow it
                apply_exit_schedule(self, self.exit_schedule)
            reset_exit_stats(self)
        if getattr(self, "exit_heads", None) is not None:
            # diffusers' pipelines stack a guided batch as (conditional, unconditional) halves: pairs exit together
            set_uncertainty_exit_paired(self, float(call.arguments.get("guidance_scale") or 1) > 1)
            reset_uncertainty_exit_stats(self)
        return super().__call__(*args, **kwargs)

    def _check_own_exit_hooks(self) -> None:
        """Raise a `ValueError` if the denoiser carries exit hooks that were put on it directly
        (`apply_exit_schedule(pipe.transformer, ...)`) rather than through this pipeline's `exit_schedule` or
        `exit_heads`: this pipeline would take them off at its call and run its own."""
        if denoiser_of(self) is None:
            return
        applied = {"exit_schedule": get_exit_schedule(self), "exit_heads": get_uncertainty_exit_heads(self)}
        for name, hooked in applied.items():
            if hooked is not None and hooked is not getattr(self, name, None):
                raise ValueError(
                    f"The {type(denoiser_of(self)).__name__} of this {type(self).__name__} carries "
                    f"{type(hooked).__name__} hooks put on it directly, which are not the pipeline's `{name}`; set "
                    f"`pipe.{name} = ...` instead (a schedule on the pipeline also follows its scheduler), or take "
                    "them off (`remove_exit_schedule` / `remove_uncertainty_exit` on the denoiser)."
                )


def _run_steps(arguments: dict[str, Any]) -> int | None:
    """The step count of a pipeline call: that of its custom `sigmas` or `timesteps` when given (diffusers' pipelines
    then ignore `num_inference_steps`), else `num_inference_steps`."""
    for name in ("sigmas", "timesteps"):
        custom = arguments.get(name)
        if custom is not None:
            return len(custom)
    return arguments.get("num_inference_steps")


class EarlyExitDiTPipeline(EarlyExitPipelineMixin, ClassConditionalSamplingMixin, DiTPipeline):
    """`DiTPipeline` with an exit schedule over the `transformer_blocks` of its `DiTTransformer2DModel`.

    The VAE is optional (`vae=None`): without one the transformer denoises pixels and they are the images (the
    shipped digits models). Classifier-free guidance uses the transformer's own null class (`num_embeds_ada_norm`).
    """

    _optional_components = ["vae", "exit_heads"]

    def __init__(
        self,
        transformer,
        vae,
        scheduler,
        id2label=None,
        exit_schedule: ExitSchedule | None = None,
        exit_heads: ExitHeads | None = None,
    ):
        super().__init__(transformer=transformer, vae=vae, scheduler=scheduler, id2label=id2label)
        self._register_exit_schedule(exit_schedule, exit_heads)


class EarlyExitUNet2DPipeline(EarlyExitPipelineMixin, ClassConditionalSamplingMixin, DiffusionPipeline):
    """A class-conditional `UNet2DModel` (pixel space, or latent with a `vae`) under an exit schedule over its decoder.

    The U-Net's last class embedding is the null class of classifier-free guidance (see `null_class_label`).
    """

    _optional_components = ["vae"]
    _denoiser_name = "unet"
    model_cpu_offload_seq = "unet->vae"

    def __init__(self, unet, scheduler, vae=None, exit_schedule: ExitSchedule | None = None):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler, vae=vae)
        self._register_exit_schedule(exit_schedule)


class EarlyExitPixArtAlphaPipeline(EarlyExitPipelineMixin, PixArtAlphaPipeline):
    """`PixArtAlphaPipeline` with an exit schedule over the `transformer_blocks` of its transformer."""

    _optional_components = [*PixArtAlphaPipeline._optional_components, "exit_heads"]

    def __init__(
        self,
        tokenizer,
        text_encoder,
        vae,
        transformer,
        scheduler,
        exit_schedule: ExitSchedule | None = None,
        exit_heads: ExitHeads | None = None,
    ):
        super().__init__(tokenizer, text_encoder, vae, transformer, scheduler)
        self._register_exit_schedule(exit_schedule, exit_heads)


class EarlyExitStableDiffusion3Pipeline(EarlyExitPipelineMixin, StableDiffusion3Pipeline):
    """`StableDiffusion3Pipeline` with an exit schedule over the joint blocks (timesteps are sigma x 1000)."""

    def __init__(
        self,
        transformer,
        scheduler,
        vae,
        text_encoder,
        tokenizer,
        text_encoder_2,
        tokenizer_2,
        text_encoder_3,
        tokenizer_3,
        image_encoder=None,
        feature_extractor=None,
        exit_schedule: ExitSchedule | None = None,
    ):
        super().__init__(
            transformer,
            scheduler,
            vae,
            text_encoder,
            tokenizer,
            text_encoder_2,
            tokenizer_2,
            text_encoder_3,
            tokenizer_3,
            image_encoder=image_encoder,
            feature_extractor=feature_extractor,
        )
        self._register_exit_schedule(exit_schedule)


class EarlyExitDDPMPipeline(EarlyExitPipelineMixin, DDPMPipeline):
    """`DDPMPipeline` with an exit schedule over the decoder units of its `UNet2DModel`."""

    def __init__(self, unet, scheduler, exit_schedule: ExitSchedule | None = None):
        super().__init__(unet=unet, scheduler=scheduler)
        self._register_exit_schedule(exit_schedule)


class EarlyExitDDIMPipeline(EarlyExitPipelineMixin, DDIMPipeline):
    """`DDIMPipeline` with an exit schedule over the decoder units of its `UNet2DModel`."""

    def __init__(self, unet, scheduler, exit_schedule: ExitSchedule | None = None):
        super().__init__(unet=unet, scheduler=scheduler)
        self._register_exit_schedule(exit_schedule)


class EarlyExitStableDiffusionPipeline(EarlyExitPipelineMixin, StableDiffusionPipeline):
    """`StableDiffusionPipeline` with an exit schedule over the decoder units of its `UNet2DConditionModel`."""

    def __init__(
        self,
        vae,
        text_encoder,
        tokenizer,
        unet,
        scheduler,
        safety_checker,
        feature_extractor,
        image_encoder=None,
        requires_safety_checker: bool = True,
        exit_schedule: ExitSchedule | None = None,
    ):
        super().__init__(
            vae,
            text_encoder,
            tokenizer,
            unet,
            scheduler,
            safety_checker,
            feature_extractor,
            image_encoder=image_encoder,
            requires_safety_checker=requires_safety_checker,
        )
        self._register_exit_schedule(exit_schedule)


class EarlyExitFluxPipeline(EarlyExitPipelineMixin, FluxPipeline):
    """`FluxPipeline` (Flux.1 dev / schnell) with an exit schedule over its double- then single-stream blocks (the
    model receives `t / 1000`; schedules and plans read the scheduler's `t`). With `true_cfg_scale > 1` and a negative
    prompt the transformer is called twice per step, and a plan's reuse steps reuse each call's own work."""

    def __init__(
        self,
        scheduler,
        vae,
        text_encoder,
        tokenizer,
        text_encoder_2,
        tokenizer_2,
        transformer,
        image_encoder=None,
        feature_extractor=None,
        exit_schedule: ExitSchedule | None = None,
    ):
        super().__init__(
            scheduler,
            vae,
            text_encoder,
            tokenizer,
            text_encoder_2,
            tokenizer_2,
            transformer,
            image_encoder=image_encoder,
            feature_extractor=feature_extractor,
        )
        self._register_exit_schedule(exit_schedule)
