"""Feature networks for FID and KID: clean-fid's Inception (mode "clean"), any `nn.Module` (torchmetrics), digits.

Every backend maps images in [0, 1] (float, NCHW) to an (N, d) float32 feature matrix on the CPU; the distances are
computed from those features (`ee_diffusion.metrics.quality`).
"""

from __future__ import annotations

import os
import platform
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn
from tqdm.auto import tqdm

from .digits_classifier import DigitsClassifier, load_digits_classifier

BACKENDS = ("clean-fid", "torchmetrics", "digits")
INCEPTION_FILENAME = "inception-2015-12-05.pt"
INCEPTION_URL = f"https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/{INCEPTION_FILENAME}"
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


class InceptionWeightsNotFoundError(FileNotFoundError):
    """clean-fid's Inception file is not on this machine (and ee-diffusion never downloads it)."""


def clean_fid_inception_dir() -> Path:
    """The folder where clean-fid itself keeps (and would download) its Inception file."""
    return Path("./" if platform.system() == "Windows" else "/tmp")


def find_inception_weights(inception_path: str | os.PathLike | None = None) -> Path:
    """The local path of clean-fid's Inception network, or an `InceptionWeightsNotFoundError` saying what to do.

    Args:
        inception_path: The file `inception-2015-12-05.pt`, or a folder holding it. Default: clean-fid's own
            download folder (`/tmp`, `./` on Windows).
    """
    if inception_path is None:
        candidate = clean_fid_inception_dir() / INCEPTION_FILENAME
        where = f"clean-fid's download folder {clean_fid_inception_dir().resolve()}"
    else:
        given = Path(inception_path)
        if given.suffix != ".pt" or given.is_dir():
            candidate, where = given / INCEPTION_FILENAME, f"the folder given as inception_path ({given})"
        elif given.name != INCEPTION_FILENAME:
            raise ValueError(
                f"inception_path={str(given)!r}: clean-fid loads its network from a file named "
                f"{INCEPTION_FILENAME!r}; "
                "rename the file or pass the folder that holds it."
            )
        else:
            candidate, where = given, f"inception_path ({given.parent})"
    if not candidate.is_file():
        raise InceptionWeightsNotFoundError(
            f"clean-fid's Inception network is missing: no file {candidate}. "
            f'The "clean-fid" backend looks for {INCEPTION_FILENAME} in {where} and does not download it '
            f"(clean-fid would fetch it from {INCEPTION_URL}). "
            f"Download that file where you have internet access, copy it to this machine and pass its path (or its "
            f"folder) as inception_path=..., or put it at {clean_fid_inception_dir().resolve() / INCEPTION_FILENAME}."
        )
    return candidate


def image_files(folder: str | os.PathLike) -> list[Path]:
    """The image files of a folder (sorted by name, not recursive), each checked to be a readable image (its header
    only, so that a bad file is reported before any work, not when it is reached)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"No folder of images at {folder}.")
    files = sorted(path for path in folder.iterdir() if path.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise ValueError(f"No image files ({', '.join(IMAGE_EXTENSIONS)}) in {folder}.")
    for path in files:
        try:
            Image.open(path).close()
        except (OSError, SyntaxError) as error:  # PIL's UnidentifiedImageError is an OSError
            raise ValueError(f"{path} is not a readable image ({error}).") from None
    return files


def load_images(folder: str | os.PathLike, channels: int = 3) -> list[torch.Tensor]:
    """The images of a folder (sorted by name, not recursive), each a (channels, H, W) float tensor in [0, 1].

    Args:
        folder: A folder of image files (png, jpg, ...).
        channels: 1 (converted to grayscale) or 3 (RGB).
    """
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}.")
    images = []
    for path in image_files(folder):
        with Image.open(path) as image:
            array = np.asarray(image.convert("L" if channels == 1 else "RGB"), dtype=np.uint8)
        tensor = torch.from_numpy(array.copy()).float().div(255)
        images.append(tensor[None] if channels == 1 else tensor.permute(2, 0, 1))
    return images


class _DigitsFeatureModule(nn.Module):
    """The digits network as a torchmetrics feature module: images in [0, 1] -> (N, 128) features."""

    def __init__(self, classifier: DigitsClassifier):
        super().__init__()
        self.classifier = classifier
        self.num_features = classifier.config.feature_dim

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier.features(images)


class FeatureExtractor:
    """The feature network FID and KID compare images with.

    Backends:
        - `"digits"`: the shipped digits CNN (128 features), for (N, 1, 32, 32) images; the default for those.
        - `"clean-fid"`: clean-fid's Inception network in mode "clean" (2048 features): images quantised to 8 bits,
          resized to 299x299 with clean-fid's PIL bicubic resizer, grayscale repeated to RGB.
        - `"torchmetrics"`: `feature_module` (any `nn.Module` taking float images in [0, 1] and returning (N, d));
          the distances are then computed by torchmetrics' `FrechetInceptionDistance` and
          `KernelInceptionDistance`. Defaults to the digits network.

    Args:
        backend: One of "digits", "clean-fid", "torchmetrics".
        feature_module: For "torchmetrics": the feature network (default: the digits network).
        inception_path: For "clean-fid": the file `inception-2015-12-05.pt` or its folder (default: clean-fid's
            download folder). Nothing is ever downloaded.
        device: Where the network runs (default: CPU).
        batch_size: Images per forward pass.
    """

    def __init__(
        self,
        backend: str = "digits",
        *,
        feature_module: nn.Module | None = None,
        inception_path: str | os.PathLike | None = None,
        device: torch.device | str | None = None,
        batch_size: int = 64,
    ):
        if backend not in BACKENDS:
            raise ValueError(f"Unknown feature backend {backend!r}; choose one of {', '.join(BACKENDS)}.")
        if feature_module is not None and backend != "torchmetrics":
            raise ValueError(f"feature_module is only used by the 'torchmetrics' backend, not {backend!r}.")
        if inception_path is not None and backend != "clean-fid":
            raise ValueError(f"inception_path is only used by the 'clean-fid' backend, not {backend!r}.")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
        self.backend = backend
        self.device = torch.device(device if device is not None else "cpu")
        self.batch_size = batch_size
        self._resize = None
        if backend == "clean-fid":
            self.network = self._load_clean_fid(inception_path)
        elif backend == "digits":
            self.network = _DigitsFeatureModule(load_digits_classifier())
        else:
            if feature_module is None:
                feature_module = _DigitsFeatureModule(load_digits_classifier())
            self.network = feature_module
            if not isinstance(self.network, nn.Module):
                raise TypeError(f"feature_module must be a torch.nn.Module, got {type(self.network).__name__}.")
        self.network = self.network.to(self.device).eval()

    def _load_clean_fid(self, inception_path: str | os.PathLike | None) -> nn.Module:
        path = find_inception_weights(inception_path)
        try:
            from cleanfid.inception_torchscript import InceptionV3W
            from cleanfid.resize import build_resizer
        except ImportError as error:
            raise ImportError("The 'clean-fid' backend needs clean-fid: pip install 'ee-diffusion[fid]'.") from error
        self._resize = build_resizer("clean")
        # download=False: clean-fid only loads the file found above, it never reaches the network.
        return InceptionV3W(str(path.parent), download=False, resize_inside=False)

    @property
    def channels(self) -> int:
        """Channels the images of a folder are loaded with (1 for the digits network, else 3)."""
        return 1 if isinstance(self.network, _DigitsFeatureModule) else 3

    @torch.no_grad()
    def features(
        self, images: torch.Tensor | Sequence[torch.Tensor] | str | os.PathLike, progress: bool = False
    ) -> torch.Tensor:
        """(N, d) float32 features (on the CPU) of images in [0, 1].

        Args:
            images: An (N, C, H, W) float tensor in [0, 1], a list of (C, H, W) tensors, or a folder of image files.
            progress: Show a progress bar over the batches.
        """
        if isinstance(images, (str, os.PathLike)):
            images = load_images(images, channels=self.channels)
        if isinstance(images, torch.Tensor) and images.ndim != 4:
            raise ValueError(f"Expected images of shape (N, C, H, W) in [0, 1], got {tuple(images.shape)}.")
        if len(images) == 0:
            raise ValueError("Got no images.")
        chunks = []
        starts = range(0, len(images), self.batch_size)
        for start in tqdm(starts, desc=f"{self.backend} features", leave=False, disable=not progress):
            batch = images[start : start + self.batch_size]
            if self.backend == "clean-fid":
                batch = self._clean_fid_input(batch)
            elif not isinstance(batch, torch.Tensor):
                batch = torch.stack(list(batch))
            chunks.append(self.network(batch.float().to(self.device)).float().cpu())
        features = torch.cat(chunks)
        if features.ndim != 2:
            raise ValueError(f"The feature network returned shape {tuple(features.shape)}; expected (N, d).")
        return features

    def _clean_fid_input(self, batch: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
        """clean-fid mode "clean": 8-bit images (as PNGs hold them), PIL bicubic resize to 299x299 of 0..255 values."""
        resized = []
        for image in batch:
            if image.ndim != 3 or image.shape[0] not in (1, 3):
                raise ValueError(f"Expected (1 or 3, H, W) images in [0, 1], got {tuple(image.shape)}.")
            pixels = (image.detach().float().cpu().clamp(0, 1) * 255).round().expand(3, -1, -1)
            resized.append(torch.from_numpy(self._resize(pixels.permute(1, 2, 0).numpy())).permute(2, 0, 1))
        return torch.stack(resized)
