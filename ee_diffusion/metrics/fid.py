"""Fréchet and kernel distances between two sets of features (the math of FID and KID, for any feature network).

FID: `|mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2))`, the trace of the square root taken as the sum of the
square roots of the eigenvalues of `S_a S_b` (in float64). KID: the unbiased MMD^2 with the cubic polynomial kernel
`k(x, y) = (x.y / d + 1)^3`, averaged over random subsets, as in Binkowski et al. and clean-fid.
"""

from __future__ import annotations

import torch


def frechet_distance(features_a: torch.Tensor, features_b: torch.Tensor) -> float:
    """FID between two (N, d) feature sets."""
    a, b = _checked(features_a, features_b, minimum=2)
    return frechet_distance_from_moments(a.mean(0), torch.cov(a.T), b.mean(0), torch.cov(b.T))


def frechet_distance_from_moments(
    mean_a: torch.Tensor, cov_a: torch.Tensor, mean_b: torch.Tensor, cov_b: torch.Tensor
) -> float:
    """FID between two Gaussians given by their (d,) means and (d, d) covariances (e.g. cached statistics)."""
    d = mean_a.shape[-1]
    if mean_a.shape != (d,) or mean_b.shape != (d,) or cov_a.shape != (d, d) or cov_b.shape != (d, d):
        raise ValueError(
            f"Expected (d,) means and (d, d) covariances with one d, got means {tuple(mean_a.shape)}, "
            f"{tuple(mean_b.shape)} and covariances {tuple(cov_a.shape)}, {tuple(cov_b.shape)}."
        )
    mean_a, cov_a, mean_b, cov_b = (t.double().cpu() for t in (mean_a, cov_a, mean_b, cov_b))
    eigenvalues = torch.linalg.eigvals(cov_a @ cov_b).real.clamp(min=0)
    distance = (mean_a - mean_b).square().sum() + cov_a.trace() + cov_b.trace() - 2 * eigenvalues.sqrt().sum()
    return distance.item()


def kernel_distance(
    features_a: torch.Tensor,
    features_b: torch.Tensor,
    subset_size: int = 1000,
    num_subsets: int = 100,
    generator: torch.Generator | None = None,
) -> tuple[float, float]:
    """KID between two (N, d) feature sets: mean and (sample) standard deviation over `num_subsets` random subsets.

    Args:
        subset_size: Samples per subset, capped at the smaller set's size.
        num_subsets: Number of subsets.
        generator: Draws the subsets (default: seeded with 0, so repeated calls agree).
    """
    a, b = _checked(features_a, features_b, minimum=2)
    size = min(subset_size, len(a), len(b))
    generator = generator or torch.Generator().manual_seed(0)
    dim = a.shape[1]
    estimates = []
    for _ in range(num_subsets):
        x = a[torch.randperm(len(a), generator=generator)[:size]]
        y = b[torch.randperm(len(b), generator=generator)[:size]]
        k_xx, k_yy, k_xy = ((u @ v.T / dim + 1) ** 3 for u, v in ((x, x), (y, y), (x, y)))
        within = (k_xx.sum() - k_xx.diagonal().sum() + k_yy.sum() - k_yy.diagonal().sum()) / (size * (size - 1))
        estimates.append(within - 2 * k_xy.mean())
    values = torch.stack(estimates)
    return values.mean().item(), values.std().item() if num_subsets > 1 else 0.0


def _checked(a: torch.Tensor, b: torch.Tensor, minimum: int) -> tuple[torch.Tensor, torch.Tensor]:
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(
            f"Expected two (N, d) feature sets with the same d, got {tuple(a.shape)} and {tuple(b.shape)}."
        )
    if len(a) < minimum or len(b) < minimum:
        raise ValueError(f"Need at least {minimum} samples in each set, got {len(a)} and {len(b)}.")
    return a.double().cpu(), b.double().cpu()
