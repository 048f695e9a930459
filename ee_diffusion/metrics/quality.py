"""FID and KID of generated images against a reference: real images (a tensor or a folder) or cached statistics (.npz).

The reference-statistics file is a NumPy `.npz` archive with these keys:

- `mu`: (d,) float64, the mean of the reference features;
- `sigma`: (d, d) float64, their covariance (unbiased, as `torch.cov`);
- `features`: (m, d) float32, the reference features themselves, or a random subset of at most `max_features` of
  them (for KID); may be absent (then only FID can be computed). clean-fid's name `feats` is read too;
- `num_images`: the number of reference images `mu` and `sigma` come from;
- `backend`: the feature backend that produced them ("digits", "clean-fid", "torchmetrics"), or "" if unknown.

A clean-fid statistics file (keys `mu` and `sigma`) therefore loads as well.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .features import BACKENDS, FeatureExtractor
from .fid import frechet_distance_from_moments, kernel_distance


@dataclass(frozen=True)
class ReferenceStatistics:
    """What FID and KID need of a reference set: mean and covariance of its features, and (some of) the features."""

    mu: torch.Tensor
    sigma: torch.Tensor
    num_images: int
    features: torch.Tensor | None = None
    backend: str | None = None

    @classmethod
    def from_features(
        cls,
        features: torch.Tensor,
        backend: str | None = None,
        max_features: int | None = 10_000,
        generator: torch.Generator | None = None,
    ) -> ReferenceStatistics:
        """Statistics of an (N, d) feature matrix.

        Args:
            features: The reference features (e.g. `FeatureExtractor(...).features(real_images)`).
            backend: The backend that produced them, checked against the one used at comparison time.
            max_features: At most this many features are kept for KID (a random subset); None keeps all.
            generator: Draws that subset (default: seeded with 0).
        """
        if features.ndim != 2 or len(features) < 2:
            raise ValueError(f"Expected (N, d) reference features with N >= 2, got {tuple(features.shape)}.")
        if backend is not None and backend not in BACKENDS:
            raise ValueError(f"Unknown feature backend {backend!r}; choose one of {', '.join(BACKENDS)}.")
        as_double = features.detach().double().cpu()
        kept = features.detach().float().cpu()
        if max_features is not None and len(kept) > max_features:
            generator = generator or torch.Generator().manual_seed(0)
            kept = kept[torch.randperm(len(kept), generator=generator)[:max_features]]
        return cls(as_double.mean(0), torch.cov(as_double.T), len(features), kept, backend)

    def save(self, path: str | os.PathLike) -> None:
        """Write the statistics to an `.npz` file (keys: module docstring of `ee_diffusion.metrics.quality`)."""
        arrays = {"mu": self.mu.double().numpy(), "sigma": self.sigma.double().numpy()}
        if self.features is not None:
            arrays["features"] = self.features.float().numpy()
        np.savez(path, **arrays, num_images=np.int64(self.num_images), backend=np.str_(self.backend or ""))

    @classmethod
    def load(cls, path: str | os.PathLike) -> ReferenceStatistics:
        """Read statistics written by `save` (or a clean-fid statistics file with `mu` and `sigma`)."""
        with np.load(path, allow_pickle=False) as archive:
            if "mu" not in archive or "sigma" not in archive:
                raise ValueError(
                    f"{path} is not a reference-statistics file: it needs keys 'mu' and 'sigma', has "
                    f"{sorted(archive.files)}."
                )
            features = archive["features"] if "features" in archive else archive.get("feats")
            backend = str(archive["backend"]) if "backend" in archive else ""
            num_images = int(archive["num_images"]) if "num_images" in archive else 0
            return cls(
                torch.from_numpy(archive["mu"]).double(),
                torch.from_numpy(archive["sigma"]).double(),
                num_images,
                torch.from_numpy(features).float() if features is not None else None,
                backend or None,
            )


def save_reference_statistics(
    path: str | os.PathLike, features: torch.Tensor, backend: str | None = None, max_features: int | None = 10_000
) -> ReferenceStatistics:
    """Cache the statistics of reference features in an `.npz` file, to compare many sample sets against later.

    Args:
        path: The `.npz` file to write.
        features: (N, d) features of the reference images, from `FeatureExtractor(backend).features(...)`.
        backend: That backend's name, stored so that a later comparison with another backend is refused.
        max_features: At most this many features are stored for KID (a random subset, seed 0); None stores all.
    """
    statistics = ReferenceStatistics.from_features(features, backend=backend, max_features=max_features)
    statistics.save(path)
    return statistics


def load_reference_statistics(path: str | os.PathLike) -> ReferenceStatistics:
    """Read an `.npz` file written by `save_reference_statistics`."""
    return ReferenceStatistics.load(path)


@dataclass(frozen=True)
class FidKidResult:
    """FID, KID (mean and standard deviation over subsets; None when the reference keeps no features) and set sizes."""

    fid: float
    kid: float | None
    kid_std: float | None
    num_samples: int
    num_reference: int
    backend: str


Reference = torch.Tensor | Sequence[torch.Tensor] | str | os.PathLike | ReferenceStatistics


def compute_fid_kid(
    images: torch.Tensor,
    reference: Reference,
    backend: str | None = None,
    *,
    extractor: FeatureExtractor | None = None,
    feature_module: nn.Module | None = None,
    inception_path: str | os.PathLike | None = None,
    device: torch.device | str | None = None,
    batch_size: int = 64,
    kid_subset_size: int = 1000,
    kid_subsets: int = 100,
    generator: torch.Generator | None = None,
    progress: bool = False,
) -> FidKidResult:
    """FID and KID of `images` against `reference`.

    Args:
        images: Generated images, an (N, C, H, W) float tensor in [0, 1].
        reference: Real images as a tensor like `images`, a folder of image files, an `.npz` file from
            `save_reference_statistics`, or `ReferenceStatistics`.
        backend: "digits", "clean-fid" or "torchmetrics" (see `FeatureExtractor`). Default: the backend stored with
            the reference statistics, else "digits" for (N, 1, 32, 32) images and "clean-fid" otherwise.
        extractor: A `FeatureExtractor` to reuse (then `backend`, `feature_module`, `inception_path`, `device`
            and `batch_size` come from it).
        feature_module: For "torchmetrics": the feature network (default: the digits network).
        inception_path: For "clean-fid": the local `inception-2015-12-05.pt` (or its folder).
        device: Where the feature network runs (default: CPU).
        batch_size: Images per forward pass of the feature network.
        kid_subset_size: Samples per KID subset, capped at the smaller set's size.
        kid_subsets: Number of KID subsets.
        generator: Draws the KID subsets (default: seeded with 0, so repeated calls agree).
        progress: Show progress bars while features are extracted.
    """
    if not isinstance(images, torch.Tensor) or images.ndim != 4:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"Expected generated images as an (N, C, H, W) tensor in [0, 1], got {shape}.")
    if isinstance(reference, (str, os.PathLike)) and Path(reference).suffix == ".npz":
        reference = load_reference_statistics(reference)
    if extractor is None:
        if backend is None:
            stored = reference.backend if isinstance(reference, ReferenceStatistics) else None
            backend = stored or ("digits" if tuple(images.shape[1:]) == (1, 32, 32) else "clean-fid")
        extractor = FeatureExtractor(
            backend, feature_module=feature_module, inception_path=inception_path, device=device, batch_size=batch_size
        )
    elif backend is not None and backend != extractor.backend:
        raise ValueError(f"backend={backend!r} disagrees with the given extractor's backend {extractor.backend!r}.")
    if not isinstance(reference, ReferenceStatistics):
        reference = ReferenceStatistics.from_features(
            extractor.features(reference, progress=progress), backend=extractor.backend, max_features=None
        )
    elif reference.backend is not None and reference.backend != extractor.backend:
        raise ValueError(
            f"The reference statistics were computed with the {reference.backend!r} backend, "
            f"not {extractor.backend!r}; features of different networks cannot be compared."
        )
    fake = extractor.features(images, progress=progress)
    if fake.shape[1] != reference.mu.shape[0]:
        raise ValueError(f"The images have {fake.shape[1]} features but the reference {reference.mu.shape[0]}.")
    if len(fake) < 2:
        raise ValueError(f"Need at least 2 generated images, got {len(fake)}.")
    generator = generator or torch.Generator().manual_seed(0)
    if extractor.backend == "torchmetrics":
        fid, kid, kid_std = _torchmetrics_fid_kid(fake, reference, kid_subset_size, kid_subsets, generator)
    else:
        fake64 = fake.double()
        fid = frechet_distance_from_moments(fake64.mean(0), torch.cov(fake64.T), reference.mu, reference.sigma)
        kid = kid_std = None
        if reference.features is not None:
            kid, kid_std = kernel_distance(fake, reference.features, kid_subset_size, kid_subsets, generator)
    return FidKidResult(fid, kid, kid_std, len(fake), reference.num_images, extractor.backend)


class _Precomputed(nn.Module):
    """Hands features already computed by the feature module through to torchmetrics (so it runs once per image)."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


def _torchmetrics_fid_kid(
    fake: torch.Tensor, reference: ReferenceStatistics, subset_size: int, subsets: int, generator: torch.Generator
) -> tuple[float, float | None, float | None]:
    try:
        from torchmetrics.image.fid import FrechetInceptionDistance
        from torchmetrics.image.kid import KernelInceptionDistance
    except ImportError as error:
        raise ImportError("The 'torchmetrics' backend needs torchmetrics: pip install 'ee-diffusion[fid]'.") from error
    dim, n = reference.mu.shape[0], reference.num_images
    if n < 2:
        raise ValueError(
            f"The torchmetrics backend needs the number of reference images (num_images), got {n}; "
            "save the statistics with save_reference_statistics."
        )
    fid_metric = FrechetInceptionDistance(feature=_Precomputed(dim))
    fid_metric.set_dtype(torch.float64)
    # The reference enters as the sufficient statistics torchmetrics accumulates: sum, sum of outer products, count.
    fid_metric.real_features_sum = reference.mu * n
    fid_metric.real_features_cov_sum = reference.sigma * (n - 1) + n * torch.outer(reference.mu, reference.mu)
    fid_metric.real_features_num_samples = torch.tensor(n)
    fid_metric.update(fake.double(), real=False)
    fid = fid_metric.compute().item()
    if reference.features is None:
        return fid, None, None
    size = min(subset_size, len(fake), len(reference.features))
    with warnings.catch_warnings():  # its note that it keeps all features in memory: so do we
        warnings.filterwarnings("ignore", message=".*will save all extracted features", category=UserWarning)
        kid_metric = KernelInceptionDistance(feature=_Precomputed(dim), subsets=subsets, subset_size=size)
    kid_metric.update(reference.features.double(), real=True)
    kid_metric.update(fake.double(), real=False)
    # torchmetrics draws its subsets from the global generator: seed it from ours, without touching the caller's.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(torch.randint(2**62, (), generator=generator)))
        kid_mean, kid_std = kid_metric.compute()
    # torchmetrics' standard deviation is the population one; `kernel_distance`'s (and so every backend's) the sample's
    sample_std = kid_std.item() * math.sqrt(subsets / (subsets - 1)) if subsets > 1 else 0.0
    return fid, kid_mean.item(), sample_std
