"""DeeDiff's exit heads: per exit point, an output head and an uncertainty estimation module (UEM).

Heads are a diffusers model of their own (`ExitHeads`, `save_pretrained`/`from_pretrained`, safetensors) that lives
beside the denoiser it was trained for. Exit point `k` sits after block `exit_blocks[k]` (a block count, 1..N-1):

- **Output head** `g_k(h) = output_layer(h + A_k(h, t))`: a residual adapter `A_k` (a LayerNorm modulated by the
  timestep embedding, then a linear layer, zero-initialised) in front of the denoiser's *own* output layer. So a head
  maps the block's hidden state to the model's prediction, of the final layer's shape, and exiting costs no second
  output layer: the hook hands the adapted hidden state to the trailing blocks, which are skipped, and the model's
  output layer (which always runs) reads it -- the exit of ASE, made learnable. A fresh head is exactly ASE's exit
  (the adapter starts at zero). The heads are per exit point, not shared: each block's hidden state sits at its own
  place in the model's residual stream (the DeeDiff reproduction found per-layer probes on a frozen backbone work).
- **UEM** `u_k = mean over tokens of sigmoid(w_k . [LayerNorm(h), e(t)] + b_k)`: how wrong `g_k`'s prediction is
  expected to be, in (0, 1), trained to match `mean(tanh(|g_k(h) - target|))`. `e(t)` is the heads' own sinusoidal
  timestep embedding (so the heads need nothing of the denoiser but its hidden states and timestep), shared by the
  exit points.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.models.attention import FeedForward
from diffusers.models.attention_processor import Attention
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from ..outputs import refuse_shipped
from ..validation import as_int, as_number
from .architectures import get_exit_architecture

_HAND_OVER = "ee_exit_heads_hand_over"
POLICIES = ("per_batch", "per_sample")
DECISIONS = ("previous_step", "per_block")


class _ExitPoint(nn.Module):
    """One exit point's adapter and UEM."""

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.modulation = nn.Linear(hidden_size, 2 * hidden_size)  # from the timestep embedding: shift, scale
        self.adapter = nn.Linear(hidden_size, hidden_size)
        self.uem_hidden = nn.Linear(hidden_size, 1, bias=False)  # w . [h, e(t)] + b, split in its two halves
        self.uem_time = nn.Linear(hidden_size, 1)
        for layer in (self.modulation, self.adapter):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def uncertainty(self, hidden: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
        logits = self.uem_hidden(self.norm(hidden)).squeeze(-1) + self.uem_time(embedding)
        return torch.sigmoid(logits).mean(dim=1)

    def adapt(self, hidden: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
        shift, scale = self.modulation(nn.functional.silu(embedding)).chunk(2, dim=-1)
        return hidden + self.adapter(self.norm(hidden) * (1 + scale[:, None]) + shift[:, None])


class ExitHeads(ModelMixin, ConfigMixin):
    """Output heads and uncertainty estimators for the exit points of one denoiser (see the module docstring).

    Args:
        num_blocks: Exit units of the denoiser they are for (`num_exit_blocks`).
        hidden_size: Width of the blocks' hidden states (tokens x `hidden_size`).
        exit_blocks: Block counts after which a head sits, increasing, each in 1..num_blocks-1 (default: every one).
        timestep_channels: Sinusoidal channels of the heads' timestep embedding.
        threshold: The exit rule: the uncertainty at or below which a sample exits, in [0, 1] (an uncertainty is a
            sigmoid: 0 never exits, 1 exits at the first checked point).
        policy: The exit rule: `"per_batch"` (the batch exits together, when every sample may) or `"per_sample"`
            (samples that exit stop costing compute; classifier-free-guidance pairs exit together).
        check_every: The exit rule: check every k-th exit point only.
        decision: The exit rule: when a call's exits are decided. `"previous_step"` (default): from the uncertainties
            the same samples had at the previous denoiser call of the run, copied to the host without waiting, so a
            call makes no host read; `"per_block"` (DeeDiff's released rule): from this call's own uncertainties,
            read on the host at each checked exit point (one GPU synchronisation per point).

    The exit rule saved with trained heads is the one `ee-diffusion bench --methods deediff` uses; change it with
    `set_exit_rule`.
    """

    config_name = "config.json"

    @register_to_config
    def __init__(
        self,
        num_blocks: int,
        hidden_size: int,
        exit_blocks: list[int] | None = None,
        timestep_channels: int = 128,
        threshold: float = 0.1,
        policy: str = "per_batch",
        check_every: int = 1,
        decision: str = "previous_step",
    ) -> None:
        super().__init__()
        as_int("num_blocks", num_blocks, low=2)
        as_int("hidden_size", hidden_size, low=1)
        as_int("timestep_channels", timestep_channels, low=2)  # a sinusoidal embedding: a sine and a cosine at least
        self.set_exit_rule(threshold, policy, check_every, decision)
        if exit_blocks is None:
            exit_blocks = list(range(1, num_blocks))
        elif isinstance(exit_blocks, (str, bytes)) or not isinstance(exit_blocks, Iterable):
            raise TypeError(f"`exit_blocks` must be a sequence of block counts, got {exit_blocks!r}.")
        else:
            exit_blocks = [as_int("exit_blocks", block) for block in exit_blocks]
        if (
            not exit_blocks
            or exit_blocks != sorted(set(exit_blocks))
            or not 1 <= exit_blocks[0] <= exit_blocks[-1] < num_blocks
        ):
            raise ValueError(
                f"`exit_blocks` must be increasing block counts in 1..{num_blocks - 1}, got {exit_blocks}."
            )
        self.register_to_config(exit_blocks=exit_blocks)
        self.time_proj = Timesteps(timestep_channels, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embedding = TimestepEmbedding(timestep_channels, hidden_size)
        self.points = nn.ModuleList(_ExitPoint(hidden_size) for _ in exit_blocks)

    def set_exit_rule(
        self,
        threshold: float | None = None,
        policy: str | None = None,
        check_every: int | None = None,
        decision: str | None = None,
    ) -> None:
        """Change the exit rule (saved with the heads); `None` keeps a setting as it is."""
        if threshold is not None:
            threshold = as_number("threshold", threshold, low=0)
            if threshold > 1:
                raise ValueError(f"`threshold` must lie in [0, 1] (an uncertainty is a sigmoid), got {threshold!r}.")
            self.register_to_config(threshold=threshold)
        if policy is not None:
            if policy not in POLICIES:
                raise ValueError(f"`policy` must be one of {POLICIES}, got {policy!r}.")
            self.register_to_config(policy=policy)
        if check_every is not None:
            self.register_to_config(check_every=as_int("check_every", check_every, low=1))
        if decision is not None:
            if decision not in DECISIONS:
                raise ValueError(f"`decision` must be one of {DECISIONS}, got {decision!r}.")
            self.register_to_config(decision=decision)

    @property
    def exit_blocks(self) -> list[int]:
        return list(self.config.exit_blocks)

    def embed(self, timesteps: torch.Tensor) -> torch.Tensor:
        """The heads' timestep embedding, one row per timestep."""
        projected = self.time_proj(timesteps.reshape(-1).to(self.device))
        return self.time_embedding(projected.to(self.dtype))

    def uncertainty(self, point: int, hidden: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
        """`u` of exit point `point` for each sample of `hidden` (batch x tokens x hidden size)."""
        return self.points[point].uncertainty(hidden, embedding)

    def adapt(self, point: int, hidden: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
        """The hidden state the denoiser's output layer reads when a sample exits at `point`."""
        return self.points[point].adapt(hidden, embedding)

    def save_pretrained(self, save_directory: str | os.PathLike, *args: Any, **kwargs: Any) -> None:
        """diffusers' `save_pretrained`, refusing the shipped models' folders."""
        refuse_shipped(save_directory)
        super().save_pretrained(save_directory, *args, **kwargs)

    def check_fits(self, num_blocks: int, hidden_size: int, model_name: str) -> None:
        """A clear error when these heads were made for another denoiser."""
        if (num_blocks, hidden_size) != (self.config.num_blocks, self.config.hidden_size):
            raise ValueError(
                f"These exit heads are for a denoiser with {self.config.num_blocks} blocks of width "
                f"{self.config.hidden_size}; this {model_name} has {num_blocks} of width "
                f"{hidden_size}."
            )

    def cost_in_blocks(self, block: nn.Module) -> tuple[float, float]:
        """What one UEM evaluation and one adapter cost, in blocks: their per-token weights over the per-token weights
        of `block` (one exit unit of the denoiser: the `nn.Linear` weights of its attention and feed-forward
        modules; per-sample layers, like adaLN's, are left out on both sides)."""
        per_block = sum(
            m.weight.numel()
            for module in block.modules()
            if isinstance(module, (Attention, FeedForward))
            for m in module.modules()
            if isinstance(m, nn.Linear)
        )
        point = self.points[0]
        return point.uem_hidden.weight.numel() / per_block, point.adapter.weight.numel() / per_block


class _HandOver(ModelHook):
    """On each block of a denoiser: the first block returns `hidden` instead of running, the others skip."""

    def __init__(self, hidden: torch.Tensor | None, skip: Any) -> None:
        super().__init__()
        self.hidden, self.skip = hidden, skip

    def new_forward(self, module: nn.Module, *args, **kwargs) -> Any:
        return self.skip(module, args, kwargs) if self.hidden is None else self.hidden


@contextlib.contextmanager
def block_outputs(model: nn.Module) -> Iterator[list[torch.Tensor]]:
    """Inside: a list that collects the output of each block of `model` (its exit units) as they run."""
    outputs: list[torch.Tensor] = []
    handles = [
        unit.register_forward_hook(lambda module, args, output: outputs.append(output))
        for unit in get_exit_architecture(model).units(model)
    ]
    try:
        yield outputs
    finally:
        for handle in handles:
            handle.remove()


def exit_predictions(
    model: nn.Module,
    heads: ExitHeads,
    outputs: list[torch.Tensor],
    embedding: torch.Tensor,
    run: Callable[[int], torch.Tensor],
) -> torch.Tensor:
    """Every exit point's prediction `g_k(h_k)`, in one call of `model`, stacked: (exit points, batch, ...).

    Args:
        outputs: Each block's output in one call (`block_outputs`), batch first.
        embedding: `heads.embed` of that call's timesteps.
        run: `run(k)` calls `model` on that call's inputs repeated `k` times along the batch and returns its
            prediction; inside it the first block hands over the adapted hidden states and the other blocks are
            skipped, so the call costs the model's embeddings and output layer only.
    """
    adapted = torch.cat(
        [heads.adapt(point, outputs[count - 1], embedding) for point, count in enumerate(heads.exit_blocks)]
    )
    architecture = get_exit_architecture(model)
    units = architecture.units(model)
    for index, unit in enumerate(units):
        HookRegistry.check_if_exists_or_initialize(unit).register_hook(
            _HandOver(adapted if index == 0 else None, architecture.skip), _HAND_OVER
        )
    try:
        prediction = run(len(heads.exit_blocks))
    finally:
        for unit in units:
            HookRegistry.check_if_exists_or_initialize(unit).remove_hook(_HAND_OVER, recurse=False)
    return prediction.reshape(len(heads.exit_blocks), -1, *prediction.shape[1:])
