"""Open any supported pipeline folder (or hub id) as its early-exit drop-in pipeline."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from diffusers import DiffusionPipeline

from . import early_exit

SHIPPED_MODELS_DIR = Path(__file__).resolve().parent.parent / "assets"

# Each drop-in class, and the diffusers class whose folders it opens.
_DROP_INS = {
    cls.__name__: cls
    for cls in vars(early_exit).values()
    if isinstance(cls, type) and issubclass(cls, early_exit.EarlyExitPipelineMixin) and cls is not early_exit.EarlyExitPipelineMixin
}
_BY_PARENT = {name.removeprefix("EarlyExit"): cls for name, cls in _DROP_INS.items()}


def shipped_model_path(name: str) -> Path | None:
    """The folder of a model shipped with the package (`digits-dit`, `digits-unet`, ...), or `None`."""
    path = SHIPPED_MODELS_DIR / name
    return path if "/" not in name and (path / "model_index.json").exists() else None


def load_early_exit_pipeline(pretrained: str, **kwargs: Any) -> DiffusionPipeline:
    """Load a shipped model name, pipeline folder or hub id with the early-exit class its `model_index.json` names.

    Folders saved by these pipelines and folders of their diffusers parents (`DiTPipeline`, `DDPMPipeline`, ...) are
    accepted; `kwargs` go to `from_pretrained` (for example `exit_schedule=` or `dtype=`).
    """
    pretrained = str(shipped_model_path(pretrained) or pretrained)
    class_name = DiffusionPipeline.load_config(pretrained)["_class_name"]
    cls = _DROP_INS.get(class_name) or _BY_PARENT.get(class_name)
    if cls is None:
        supported = sorted({*_DROP_INS, *_BY_PARENT})
        raise ValueError(f"{pretrained} holds a {class_name}; supported pipeline classes: {supported}.")
    return cls.from_pretrained(pretrained, **kwargs)
