"""Training of the digits feature network (`ee_diffusion.metrics.DigitsClassifier`) on the digits train split."""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..data.digits import DigitsSplit
from ..metrics.digits_classifier import DigitsClassifier, class_accuracy


def random_shift(images: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Translate each image by up to `max_shift` pixels in each direction (zero-padded with the background, -1)."""
    padded = F.pad(images, [max_shift] * 4, value=-1.0)
    size = images.shape[-1]
    offsets = torch.randint(2 * max_shift + 1, (len(images), 2), generator=generator).tolist()
    return torch.stack([padded[i, :, y : y + size, x : x + size] for i, (y, x) in enumerate(offsets)])


def train_digits_classifier(
    train: DigitsSplit,
    heldout: DigitsSplit,
    epochs: int = 30,
    batch_size: int = 64,
    learning_rate: float = 2e-3,
    max_shift: int = 2,
    seed: int = 0,
    progress: bool = True,
) -> tuple[DigitsClassifier, float, float]:
    """Train a `DigitsClassifier` with random shifts; returns it (eval mode), its held-out accuracy and seconds."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = DigitsClassifier()
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=1e-4)
    steps_per_epoch = -(-len(train) // batch_size)
    lr_schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, learning_rate, total_steps=epochs * steps_per_epoch)
    began = time.perf_counter()
    model.train()
    for _ in tqdm(range(epochs), desc="training the digits classifier", disable=not progress):
        order = torch.randperm(len(train), generator=generator)
        for batch in order.split(batch_size):
            images = random_shift(train.images[batch], max_shift, generator)
            loss = F.cross_entropy(model((images + 1) / 2), train.labels[batch], label_smoothing=0.1)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            lr_schedule.step()
    model.eval()
    accuracy = class_accuracy((heldout.images + 1) / 2, heldout.labels, model)
    return model, accuracy, time.perf_counter() - began
