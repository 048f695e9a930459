"""The models shipped with the package (`ee_diffusion/assets/`), by name."""

from __future__ import annotations

from pathlib import Path

SHIPPED_MODELS_DIR = Path(__file__).resolve().parent / "assets"


def shipped_models(marker: str = "model_index.json") -> list[str]:
    """Names of the models shipped with the package whose folder holds `marker` (`model_index.json`: the diffusion
    pipelines; `tokenizer.json`: the language models)."""
    return sorted(path.name for path in SHIPPED_MODELS_DIR.iterdir() if (path / marker).is_file())


def shipped_model_path(name: str, marker: str = "model_index.json") -> Path | None:
    """The folder of a model shipped with the package (`digits-dit`, `digits-unet`, ...), or `None`."""
    return SHIPPED_MODELS_DIR / name if name in shipped_models(marker) else None
