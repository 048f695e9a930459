"""Open any supported pipeline folder, hub id or shipped model name as its early-exit drop-in pipeline."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from diffusers import DiffusionPipeline

from ..shipped import shipped_model_path, shipped_models
from . import early_exit

# Each drop-in class, and the diffusers class whose folders it opens.
_DROP_INS = {
    cls.__name__: cls
    for cls in vars(early_exit).values()
    if isinstance(cls, type)
    and issubclass(cls, early_exit.EarlyExitPipelineMixin)
    and cls is not early_exit.EarlyExitPipelineMixin
}
_BY_PARENT = {name.removeprefix("EarlyExit"): cls for name, cls in _DROP_INS.items()}


# What a hub id looks like: `owner/name`, one slash, neither part starting with a dot.
_HUB_ID = re.compile(r"[A-Za-z0-9_-][\w.-]*/[A-Za-z0-9_-][\w.-]*")


def resolve_pretrained(name: str | Path, marker: str = "model_index.json") -> str:
    """A shipped model name as its folder; a folder as it is; an `owner/name` hub id as it is. Anything else raises a
    `ValueError` at once, naming the shipped models, instead of a trip to the hub."""
    name = str(name)
    shipped = shipped_model_path(name, marker)
    if shipped is not None:
        return str(shipped)
    if Path(name).exists() or _HUB_ID.fullmatch(name):
        return name
    raise ValueError(
        f"No model {name!r}: it is not a shipped model ({', '.join(shipped_models(marker))}), not a "
        "folder that exists, and not a hub id (owner/name)."
    )


def model_index(pretrained: str | Path) -> dict[str, Any]:
    """The `model_index.json` of a shipped model name, pipeline folder or hub id, read without loading anything."""
    pretrained = resolve_pretrained(pretrained)
    if Path(pretrained).is_dir() and not (Path(pretrained) / "model_index.json").is_file():
        raise ValueError(f"{pretrained} has no model_index.json: it is not a diffusers pipeline folder.")
    return DiffusionPipeline.load_config(pretrained)


def load_early_exit_pipeline(pretrained: str, **kwargs: Any) -> DiffusionPipeline:
    """Load a shipped model name, pipeline folder or hub id with the early-exit class its `model_index.json` names.

    Folders saved by these pipelines and folders of their diffusers parents (`DiTPipeline`, `FluxPipeline`,
    `DDPMPipeline`, ...) are accepted; `kwargs` go to `from_pretrained` (for example `exit_schedule=` or `dtype=`).
    A pipeline without a drop-in (`WanPipeline`, `QwenImagePipeline`, ...) whose denoiser the exit registry knows
    takes a schedule as it is: `apply_exit_schedule(DiffusionPipeline.from_pretrained(folder), schedule)`.
    """
    pretrained = resolve_pretrained(pretrained)
    class_name = model_index(pretrained)["_class_name"]
    cls = _DROP_INS.get(class_name) or _BY_PARENT.get(class_name)
    if cls is None:
        supported = sorted({*_DROP_INS, *_BY_PARENT})
        raise ValueError(
            f"{pretrained} holds a {class_name}; supported pipeline classes: {supported}. A stock pipeline whose "
            "denoiser the exit registry knows takes a schedule with `apply_exit_schedule(pipe, schedule)` instead."
        )
    return cls.from_pretrained(pretrained, **kwargs)
