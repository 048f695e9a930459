"""PSNR and SSIM of images against reference images made from the same noise and conditioning (torchmetrics'
`PeakSignalNoiseRatio` and `StructuralSimilarityIndexMeasure`; nothing is downloaded).

They measure how far a method's images are from a reference's, image by image, not how good they are: the bench uses
them for models without real images to score against, with the model's full-compute output as the reference. A method
that samples along another trajectory (fewer steps, another scheduler) can make images as good but different, and
scores low on both.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Identical images have an infinite PSNR; each image's PSNR is capped here (a difference of 1e-5 RMS in [0, 1], far
# below what 8-bit pixels can show), so every number stays finite in the JSON and CSV.
PSNR_CAP_DB = 100.0


@dataclass(frozen=True)
class Similarity:
    """PSNR (dB, each image's capped at `PSNR_CAP_DB`) and SSIM, each the mean over the images."""

    psnr: float
    ssim: float
    num_images: int


def image_similarity(images: torch.Tensor, reference: torch.Tensor, chunk_size: int = 16) -> Similarity:
    """PSNR and SSIM of `images` against `reference`, image by image, then averaged.

    Args:
        images: NCHW images in [0, 1] (values outside are clamped).
        reference: The reference images, of the same shape, image `i` made from the same noise and conditioning.
        chunk_size: Images per update of the metrics (bounds the memory SSIM's windows take).
    """
    from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure

    if not isinstance(images, torch.Tensor) or not isinstance(reference, torch.Tensor):
        raise TypeError(
            f"`images` and `reference` must be tensors, got {type(images).__name__} and {type(reference).__name__}."
        )
    if images.ndim != 4 or images.shape != reference.shape or len(images) == 0:
        raise ValueError(
            f"`images` and `reference` must be NCHW batches of the same shape with at least one image, got "
            f"{tuple(images.shape)} and {tuple(reference.shape)}."
        )
    side = min(images.shape[-2:])
    kernel = min(11, side if side % 2 else side - 1)  # torchmetrics' 11-pixel window, or the largest that fits
    if kernel < 3:
        raise ValueError(f"SSIM needs images of at least 3 x 3 pixels, got {tuple(images.shape[-2:])}.")
    # torchmetrics sizes its Gaussian window from `sigma` alone (2 * int(3.5 sigma + 0.5) + 1 taps: 11 at its 1.5),
    # so a smaller window takes a narrower Gaussian
    sigma = 1.5 if kernel == 11 else (kernel - 1) / 2 / 3.5
    psnr = PeakSignalNoiseRatio(data_range=1.0, reduction="none", dim=(1, 2, 3))
    ssim = StructuralSimilarityIndexMeasure(data_range=1.0, kernel_size=kernel, sigma=sigma)
    for start in range(0, len(images), chunk_size):
        ours = images[start : start + chunk_size].detach().cpu().double().clamp(0, 1)
        theirs = reference[start : start + chunk_size].detach().cpu().double().clamp(0, 1)
        psnr.update(ours, theirs)
        ssim.update(ours, theirs)
    per_image = psnr.compute().reshape(-1).clamp(max=PSNR_CAP_DB)
    return Similarity(psnr=float(per_image.mean()), ssim=float(ssim.compute()), num_images=len(images))
