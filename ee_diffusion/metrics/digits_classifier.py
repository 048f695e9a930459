"""The digits feature network: a small CNN trained on the digits train split, shipped in `assets/digits-classifier`.

It scores the shipped digits models offline: its 128-dimensional penultimate features stand in for Inception's in
FID and KID, and its predictions say whether a sample generated for class c looks like a c.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from torch import nn

DIGITS_CLASSIFIER_PATH = Path(__file__).resolve().parent.parent / "assets" / "digits-classifier"


class DigitsClassifier(ModelMixin, ConfigMixin):
    """Three conv-pool stages (32x32 -> 4x4), a 128-unit feature layer, a 10-way head.

    Takes images in [0, 1] (what the pipelines return with `output_type="pt"`), shape (N, 1, 32, 32).
    """

    @register_to_config
    def __init__(self, channels: tuple[int, int, int] = (32, 64, 64), feature_dim: int = 128, num_classes: int = 10):
        super().__init__()
        layers, previous = [], 1
        for width in channels:
            layers += [nn.Conv2d(previous, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(2)]
            previous = width
        self.trunk = nn.Sequential(*layers, nn.Flatten())
        self.features_layer = nn.Linear(previous * 16, feature_dim)
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """The (N, feature_dim) features FID and KID compare."""
        if images.ndim != 4 or images.shape[1:] != (1, 32, 32):
            raise ValueError(f"Expected images of shape (N, 1, 32, 32) in [0, 1], got {tuple(images.shape)}.")
        return F.relu(self.features_layer(self.trunk(images * 2 - 1)))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Class logits, (N, num_classes)."""
        return self.head(self.features(images))


def load_digits_classifier(path: str | Path | None = None) -> DigitsClassifier:
    """The shipped digits feature network (or the one saved at `path`), in eval mode."""
    path = Path(path) if path is not None else DIGITS_CLASSIFIER_PATH
    if not (path / "config.json").exists():
        raise FileNotFoundError(
            f"No digits classifier at {path}; train one with `ee-diffusion train --arch classifier --out {path}`."
        )
    return DigitsClassifier.from_pretrained(path).eval()


@torch.no_grad()
def class_accuracy(
    images: torch.Tensor, labels: torch.Tensor, classifier: DigitsClassifier, batch_size: int = 500
) -> float:
    """Share of images in [0, 1] that the classifier assigns to their intended `labels`."""
    if len(images) != len(labels):
        raise ValueError(f"Got {len(images)} images but {len(labels)} labels.")
    predicted = torch.cat([classifier(chunk).argmax(dim=1) for chunk in images.split(batch_size)])
    return (predicted == labels.to(predicted.device)).float().mean().item()
