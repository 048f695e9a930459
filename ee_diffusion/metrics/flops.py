"""Floating-point operations of a call, counted by torch (`torch.utils.flop_counter.FlopCounterMode`): matrix
products, convolutions and attention, whatever ran them, so a method's compute is measured rather than accounted
block by block.

torch counts its CUDA attention kernels but not the one `scaled_dot_product_attention` takes on the CPU; it is
counted here with torch's own attention formula, so that a transformer's FLOPs are the same on either device.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch.utils import flop_counter


def _attention_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """The formula torch gives its CUDA attention kernels: one batched product for the scores, one for the weighted
    values."""
    return flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)


_CPU_ATTENTION = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _attention_flops}


class FlopCount:
    """What `count_flops` counted: `total` once its block has ended."""

    total: int = 0


@contextlib.contextmanager
def count_flops() -> Iterator[FlopCount]:
    """Count the floating-point operations of everything run in the block (on any device, in any thread of the
    dispatcher): `with count_flops() as counted: ...`, then `counted.total`."""
    counted = FlopCount()
    mode = flop_counter.FlopCounterMode(display=False, custom_mapping=_CPU_ATTENTION)
    with mode:
        yield counted
    counted.total = mode.get_total_flops()
