"""The README cards of the models the training commands write: what the model is, the command that made it, and the
machine and time it took."""

from __future__ import annotations

import platform

import torch

DIGITS_DATA = (
    "Data: scikit-learn `load_digits()`, train split of `ee_diffusion.data.load_digits_split` (seed 0, 80% of\n"
    "each class), 8x8 scans upsampled to 32x32 in [-1, 1]. Pixel space, no VAE.\n\n"
)


def hardware(device: str | torch.device) -> str:
    """The machine a run used, in words."""
    if torch.device(device).type == "cuda":
        return f"one {torch.cuda.get_device_name(device)}"
    threads = torch.get_num_threads()
    return f"{threads} CPU thread{'s' if threads > 1 else ''} ({platform.processor() or platform.machine()})"


def digits_model_card(
    title: str,
    command: str,
    total_steps: int,
    steps_run: int,
    seconds: float,
    batch_size: int,
    device: str | torch.device,
    extra: str = "",
    results: str = "docs/results.md",
) -> str:
    """The card of a trained digits denoiser (or of exit heads trained for one): `extra` says what sets it apart,
    `results` which page of the project's docs holds its measurements."""
    return (
        f"# {title}\n\n{DIGITS_DATA}{extra}"
        f"Trained with:\n\n```\n{command}\n```\n\n"
        f"Steps: {total_steps} (batch {batch_size}); time: {seconds / 60:.1f} min for the last {steps_run} steps on "
        f"{hardware(device)}.\n\n"
        f"Metrics: see {results} of the project (commands there).\n"
    )


def digits_classifier_card(command: str, epochs: int, seconds: float, accuracy: float) -> str:
    """The card of the digits feature network."""
    return (
        "# digits-classifier\n\nThe digits feature network of `ee_diffusion.metrics` (FID/KID features and class "
        "accuracy of the digits models).\nData: train split of `ee_diffusion.data.load_digits_split` (seed 0), random "
        f"shifts of up to 2 pixels.\n\nTrained with:\n\n```\n{command}\n```\n\n"
        f"{epochs} epochs in {seconds:.0f} s on {hardware('cpu')}. Held-out accuracy (359 images never trained on): "
        f"{accuracy:.2%}.\n"
    )
