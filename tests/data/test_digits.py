import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from ee_diffusion.data import DIGITS_IMAGE_SIZE, load_digits_split


def test_split_is_fixed_stratified_and_disjoint():
    train, heldout = load_digits_split("train"), load_digits_split("heldout")
    assert (len(train), len(heldout)) == (1438, 359)
    assert train.images.shape == (1438, 1, DIGITS_IMAGE_SIZE, DIGITS_IMAGE_SIZE)
    assert train.images.dtype == torch.float32 and train.labels.dtype == torch.int64
    assert train.images.min() >= -1 and train.images.max() <= 1
    # Every class keeps about a fifth of its images out of training.
    counts = heldout.labels.bincount(minlength=10)
    assert counts.min() >= 35 and counts.max() <= 37
    # No held-out image is also a training image.
    flat_train = {tuple(row) for row in train.images.flatten(1).numpy().round(5)}
    overlap = sum(tuple(row) in flat_train for row in heldout.images.flatten(1).numpy().round(5))
    assert overlap <= 2  # load_digits holds a couple of exact duplicates of its own
    assert torch.equal(load_digits_split("heldout").images, heldout.images)  # the same seed, the same split
    assert not torch.equal(load_digits_split("heldout", seed=1).labels, heldout.labels)


def test_resize_keeps_the_scan():
    """Pooling a 32x32 image back to 8x8 lands nearest to a scan of its own class, close to it (bilinear blurs
    edges)."""
    heldout = load_digits_split("heldout")
    digits = load_digits()
    scans = digits.images.astype(np.float32) / 8 - 1
    pooled = torch.nn.functional.avg_pool2d(heldout.images, 4).squeeze(1).numpy()
    distances = np.abs(pooled[:, None] - scans[None]).mean(axis=(2, 3))
    assert (digits.target[distances.argmin(axis=1)] == heldout.labels.numpy()).all()
    assert distances.min(axis=1).max() < 0.2  # in units of [-1, 1]; a grey level is 0.125


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(split="test"), "'train' or 'heldout'"),
        (dict(split="train", heldout_fraction=1.0), r"in \(0, 1\)"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        load_digits_split(**kwargs)
