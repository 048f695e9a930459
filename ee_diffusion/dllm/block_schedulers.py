"""`ProphetScheduler` and `SchEDScheduler`: diffusers' `BlockRefinementScheduler` with an early-commit rule, for
`LLaDA2Pipeline` (`pipe.scheduler = SchEDScheduler.from_config(pipe.scheduler.config, shape="exp")`).

They keep `step()`'s contract. A scheduler sees one block at a time, so inside `LLaDA2Pipeline` the rule looks at
the current block's generated positions, its progress is the step within the block
(`(timestep + 1) / num_inference_steps`), and when it fires for a row every masked position of that row's block is
committed to the sampled token (the pipeline then moves on to the next block).

`LLaDA2Pipeline` pads the last block past the end of the answer when the prompt plus `gen_length` is not a multiple
of `block_length`, and does not tell its scheduler; give the scheduler the call's `gen_length` so that the rule
looks at real answer positions only (it counts the answer positions of the blocks it has finished).
"""

from __future__ import annotations

import torch
from diffusers import BlockRefinementScheduler
from diffusers.configuration_utils import register_to_config
from diffusers.schedulers.scheduling_block_refinement import BlockRefinementSchedulerOutput

from ..validation import as_int
from .rules import PROPHET_THRESHOLDS, EarlyCommit, ProphetCommit, SchEDCommit


class _EarlyCommitScheduler(BlockRefinementScheduler):
    """What both schedulers share: run the block-refinement step, then let `self._rule` commit whole blocks."""

    _rule: EarlyCommit
    _block_committed = False  # whether the last step left no mask in its block
    _answer_before: int | torch.Tensor = 0  # answer positions in the blocks finished so far (in this call)
    _answer_in_block: int | torch.Tensor = 0  # answer positions in the current block

    def set_timesteps(self, num_inference_steps: int, device=None, block_length: int | None = None) -> None:
        super().set_timesteps(num_inference_steps, device=device, block_length=block_length)
        self._block_committed = False
        self._answer_before = self._answer_in_block = 0

    def _answer_positions(self, sample: torch.LongTensor, prompt_mask: torch.Tensor | None) -> torch.Tensor:
        """The block's positions that belong to the answer: not prompt, and (with `gen_length`) not past its end."""
        positions = torch.ones_like(sample, dtype=torch.bool)
        if prompt_mask is not None:
            positions = positions & ~prompt_mask[None, :]
        self._answer_in_block = positions[0].sum()
        gen_length = self.config.gen_length
        if gen_length is None:
            return positions
        positions = positions & (self._answer_before + positions.long().cumsum(-1) <= gen_length)
        if not bool(positions.any()):
            raise ValueError(
                f"{type(self).__name__}(gen_length={gen_length}) got a block past the end of a {gen_length}-token "
                f"answer: set the scheduler's `gen_length` to the pipeline call's."
            )
        return positions

    def step(
        self, model_output: torch.Tensor, timestep: int | torch.Tensor, sample: torch.LongTensor, *args, **kwargs
    ):
        """`BlockRefinementScheduler.step`, plus: rows where the early-commit rule fires commit every masked position
        of the block. Takes and returns exactly what `BlockRefinementScheduler.step` does."""
        return_dict = kwargs.pop("return_dict", True)
        out = super().step(model_output, timestep, sample, *args, **kwargs, return_dict=True)
        mask_token_id = kwargs.get("mask_token_id")
        if mask_token_id is None:  # uniform-corruption mode has no masks to commit early
            return out if return_dict else out.to_tuple()
        positions = self._answer_positions(sample, kwargs.get("prompt_mask"))
        step_index = int(timestep) + 1
        fired = self._rule(model_output, positions, step_index / self.num_inference_steps)
        masked = sample == mask_token_id
        transfer_index = out.transfer_index | (masked & fired[:, None])
        prev_sample = torch.where(transfer_index, out.sampled_tokens, out.prev_sample)
        self._block_committed = not bool((prev_sample == mask_token_id).any())
        out = BlockRefinementSchedulerOutput(
            prev_sample=prev_sample,
            transfer_index=transfer_index,
            editing_transfer_index=out.editing_transfer_index,
            sampled_tokens=out.sampled_tokens,
            sampled_probs=out.sampled_probs,
            pred_logits=out.pred_logits,
        )
        return out if return_dict else out.to_tuple()

    def check_block_should_continue(
        self, step_idx: int, masks_remaining: bool, editing_enabled: bool, *args, **kwargs
    ) -> bool:
        """As `BlockRefinementScheduler`'s, but a block the last step committed entirely ends at once (without
        editing), instead of after one more denoiser pass. A block that ends adds its answer positions to the count
        `gen_length` is checked against."""
        if self._block_committed and not editing_enabled:
            keep_going = False
        else:
            keep_going = super().check_block_should_continue(
                step_idx, masks_remaining, editing_enabled, *args, **kwargs
            )
        if not keep_going:  # the pipeline moves on to the next block
            self._answer_before = self._answer_before + self._answer_in_block
        return keep_going


class ProphetScheduler(_EarlyCommitScheduler):
    """`BlockRefinementScheduler` with Prophet's early commit (see `ProphetCommit`).

    Args:
        block_length, num_inference_steps, threshold, editing_threshold, minimal_topk: As `BlockRefinementScheduler`.
        prophet_thresholds: Gap thresholds of the progress stages (default: the released code's, see
            `ProphetCommit`).
        prophet_boundaries: Progress values where the stages change.
        answer_start: Offset of the answer window in the block's generated positions.
        window: Length of the answer window (None: the rest of the block).
        gen_length: The pipeline call's `gen_length`; None: every non-prompt position of a block is answer.
    """

    @register_to_config
    def __init__(
        self,
        block_length: int = 32,
        num_inference_steps: int = 32,
        threshold: float = 0.95,
        editing_threshold: float | None = None,
        minimal_topk: int = 1,
        prophet_thresholds: list[float] = PROPHET_THRESHOLDS,
        prophet_boundaries: list[float] = (0.33, 0.67),
        answer_start: int = 0,
        window: int | None = 5,
        gen_length: int | None = None,
    ):
        super().__init__(block_length, num_inference_steps, threshold, editing_threshold, minimal_topk)
        _check_gen_length(gen_length)
        self._rule = ProphetCommit(tuple(prophet_thresholds), tuple(prophet_boundaries), answer_start, window)


class SchEDScheduler(_EarlyCommitScheduler):
    """`BlockRefinementScheduler` with SchED's early commit (see `SchEDCommit`).

    Args:
        block_length, num_inference_steps, threshold, editing_threshold, minimal_topk: As `BlockRefinementScheduler`.
        tau_high, tau_low, shape, k: The threshold schedule `tau(p)`.
        gen_length: The pipeline call's `gen_length`; None: every non-prompt position of a block is answer.
    """

    @register_to_config
    def __init__(
        self,
        block_length: int = 32,
        num_inference_steps: int = 32,
        threshold: float = 0.95,
        editing_threshold: float | None = None,
        minimal_topk: int = 1,
        tau_high: float = 7.5,
        tau_low: float = 2.5,
        shape: str = "linear",
        k: float = 4.0,
        gen_length: int | None = None,
    ):
        super().__init__(block_length, num_inference_steps, threshold, editing_threshold, minimal_topk)
        _check_gen_length(gen_length)
        self._rule = SchEDCommit(tau_high, tau_low, shape, k)


def _check_gen_length(gen_length: int | None) -> None:
    if gen_length is not None:
        as_int("gen_length", gen_length, low=1)
