"""scikit-learn's handwritten digits (1,797 real 8x8 scans, 10 classes) as 32x32 images in [-1, 1].

The 8x8 scans hold 17 grey levels (0..16). Each is scaled to [-1, 1] (`v / 8 - 1`) and upsampled 4x to 32x32 with
bilinear interpolation (`torch.nn.functional.interpolate`, `align_corners=False`, no antialiasing: upsampling only
interpolates). The split is stratified by class and fixed by its seed: the held-out part is never trained on and is
what FID, KID and accuracy are measured against.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

DIGITS_IMAGE_SIZE = 32
NUM_CLASSES = 10
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
PROMPT_TEMPLATE = "a handwritten {}"


def digit_prompt(label: int) -> str:
    """The prompt of a digit for the text-to-image digits models: `digit_prompt(7) == "a handwritten seven"`."""
    if not 0 <= int(label) < len(DIGIT_WORDS):
        raise ValueError(f"`label` must be a digit in [0, 9], got {label!r}.")
    return PROMPT_TEMPLATE.format(DIGIT_WORDS[int(label)])


def digit_of_prompt(prompt: str) -> int | None:
    """The digit a prompt of `digit_prompt` asks for (`None` for any other prompt)."""
    words = {PROMPT_TEMPLATE.format(word): label for label, word in enumerate(DIGIT_WORDS)}
    return words.get(" ".join(str(prompt).lower().split()))


@dataclass(frozen=True)
class DigitsSplit:
    """One part of the digits split: `images` (N, 1, 32, 32) float32 in [-1, 1] and `labels` (N,) int64."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)


def load_digits_split(split: Literal["train", "heldout"], heldout_fraction: float = 0.2, seed: int = 0) -> DigitsSplit:
    """Load one part of the fixed train / held-out split of scikit-learn's digits, as 32x32 images in [-1, 1].

    Args:
        split: `"train"` or `"heldout"`.
        heldout_fraction: share of each class kept out of training (default 0.2: 1,438 train, 359 held out).
        seed: seed of the split; the shipped models and their metrics use the default 0.
    """
    if split not in ("train", "heldout"):
        raise ValueError(f"`split` must be 'train' or 'heldout', got {split!r}.")
    if not 0.0 < heldout_fraction < 1.0:
        raise ValueError(f"`heldout_fraction` must be in (0, 1), got {heldout_fraction}.")
    from sklearn.datasets import load_digits

    digits = load_digits()
    pixels, labels = digits.images.astype(np.float32), digits.target.astype(np.int64)
    rng = np.random.default_rng(seed)
    heldout = np.zeros(len(labels), dtype=bool)
    for digit in range(NUM_CLASSES):  # stratified: the same share of every class is held out
        members = rng.permutation(np.flatnonzero(labels == digit))
        heldout[members[: round(len(members) * heldout_fraction)]] = True
    keep = heldout if split == "heldout" else ~heldout
    images = torch.from_numpy(pixels[keep] / 8.0 - 1.0).unsqueeze(1)
    images = F.interpolate(images, size=DIGITS_IMAGE_SIZE, mode="bilinear", align_corners=False)
    return DigitsSplit(images=images.clamp(-1.0, 1.0).contiguous(), labels=torch.from_numpy(labels[keep]))
