"""The masked-diffusion LM sampler: semi-autoregressive blocks, low-confidence remasking, early commit.

LLaDA's decoding, step by step: the answer starts fully masked; blocks of `block_length` positions are decoded
left to right, each in `steps / num_blocks` steps; every step runs the denoiser once, takes the argmax of the
(optionally Gumbel-perturbed) logits at every masked position, and commits the step's even share of the block's
masked positions, the most confident first. An early-commit rule may end a row at any step by committing every
masked position, future blocks included, at once; a threshold rule may commit more than the even share.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .adapters import MaskedLMAdapter
from .rules import EarlyCommit, ThresholdCommit

REMASKING = ("low_confidence", "random")


@dataclass
class SamplerOutput:
    """`sequences` `(batch, gen_length)`: the generated tokens; `nfe` `(batch,)`: denoiser forward passes per row."""

    sequences: torch.LongTensor
    nfe: torch.LongTensor


def even_split(num_masked: torch.LongTensor, steps: int) -> torch.LongTensor:
    """`(batch, steps)`: each row's `num_masked` tokens spread over `steps` steps, earlier steps taking the rest."""
    base = num_masked[:, None] // steps
    extra = torch.arange(steps, device=num_masked.device)[None, :] < (num_masked[:, None] % steps)
    return base + extra.long()


def gumbel_argmax(logits: torch.Tensor, temperature: float, generator: torch.Generator | None) -> torch.LongTensor:
    """Argmax of `logits + temperature * Gumbel noise` (in float64): a sample at temperature `temperature`."""
    if temperature == 0:
        return logits.argmax(-1)
    uniform = torch.rand(logits.shape, generator=generator, device=logits.device, dtype=torch.float64)
    gumbel = -torch.log(-torch.log(uniform.clamp(min=1e-300)))
    return (logits.double() + temperature * gumbel).argmax(-1)


def commit_top(confidence: torch.Tensor, candidates: torch.Tensor, count: torch.LongTensor) -> torch.Tensor:
    """Per row, the `count` most confident of the `candidates` positions (all of them if fewer)."""
    order = confidence.masked_fill(~candidates, float("-inf")).argsort(dim=-1, descending=True, stable=True)
    ranks = order.argsort(dim=-1)
    return candidates & (ranks < count[:, None])


def fill_after_eos(answer: torch.LongTensor, mask_token_id: int, eos_token_id: int) -> torch.LongTensor:
    """Rows whose first EOS has nothing masked before it are finished: every position after it becomes EOS."""
    is_eos = answer == eos_token_id
    index = torch.arange(answer.shape[1], device=answer.device)
    first = torch.where(is_eos.any(-1), is_eos.long().argmax(-1), answer.shape[1])
    masked_before = ((answer == mask_token_id) & (index[None, :] < first[:, None])).any(-1)
    finished = is_eos.any(-1) & ~masked_before
    return torch.where(finished[:, None] & (index[None, :] > first[:, None]), eos_token_id, answer)


@torch.no_grad()
def generate(
    adapter: MaskedLMAdapter,
    input_ids: torch.LongTensor,
    attention_mask: torch.Tensor | None = None,
    *,
    gen_length: int,
    steps: int,
    block_length: int,
    mask_token_id: int,
    temperature: float = 0.0,
    cfg_scale: float = 0.0,
    remasking: str = "low_confidence",
    early_commit: EarlyCommit | None = None,
    parallel: ThresholdCommit | None = None,
    eos_token_id: int | None = None,
    generator: torch.Generator | None = None,
) -> SamplerOutput:
    """Decode `gen_length` tokens after each (left-padded) prompt.

    Args:
        adapter: The model, behind its adapter.
        input_ids: `(batch, prompt_length)` prompts, left-padded.
        attention_mask: `(batch, prompt_length)`, 0 on the padding; None when nothing is padded.
        gen_length: Tokens to generate; a multiple of `block_length`.
        steps: Refinement steps in all (the budget); a multiple of the number of blocks.
        block_length: Positions decoded per semi-autoregressive block.
        mask_token_id: The mask token.
        temperature: 0 is greedy; otherwise Gumbel noise through `generator`.
        cfg_scale: Classifier-free guidance (LLaDA's form: the unconditional pass masks the prompt); 0 is off.
            With guidance every step is two forward passes per row.
        remasking: `"low_confidence"` (commit the most probable predictions first) or `"random"`.
        early_commit: A rule of `(logits, positions, progress)`; when it fires for a row, every masked position
            of that row takes its prediction and the row stops.
        parallel: A `ThresholdCommit` that commits every prediction above its probability threshold.
        eos_token_id: When set, a row whose first EOS has nothing masked before it is finished at once (the rest
            of it becomes EOS).
        generator: Randomness of the Gumbel noise and of random remasking.
    """
    if gen_length <= 0 or block_length <= 0 or gen_length % block_length:
        raise ValueError(f"`gen_length` ({gen_length}) must be a positive multiple of `block_length` ({block_length}).")
    num_blocks = gen_length // block_length
    if steps <= 0 or steps % num_blocks:
        raise ValueError(f"`steps` ({steps}) must be a positive multiple of the number of blocks ({num_blocks}).")
    if remasking not in REMASKING:
        raise ValueError(f"Unknown remasking {remasking!r}; expected one of {REMASKING}.")
    if temperature < 0 or cfg_scale < 0:
        raise ValueError(f"Need temperature >= 0 and cfg_scale >= 0, got {temperature} and {cfg_scale}.")
    batch, prompt_length = input_ids.shape
    device = input_ids.device
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    x = torch.cat([input_ids, torch.full((batch, gen_length), mask_token_id, device=device)], dim=1)
    attention = torch.cat([attention_mask, torch.ones((batch, gen_length), dtype=attention_mask.dtype, device=device)], 1)
    span = torch.zeros_like(x, dtype=torch.bool)
    span[:, prompt_length:] = True
    prompt = attention.bool() & ~span
    passes = 2 if cfg_scale > 0 else 1
    nfe = torch.zeros(batch, dtype=torch.long, device=device)
    steps_per_block = steps // num_blocks

    for block in range(num_blocks):
        start = prompt_length + block * block_length
        in_block = torch.zeros_like(span)
        in_block[:, start : start + block_length] = True
        schedule = even_split((x[:, start : start + block_length] == mask_token_id).sum(-1), steps_per_block)
        for step in range(steps_per_block):
            rows = ((x == mask_token_id) & in_block).any(-1).nonzero().squeeze(-1)
            if rows.numel() == 0:
                break
            x_rows, masked = x[rows], x[rows] == mask_token_id
            logits = _guided_logits(adapter, x_rows, attention[rows], prompt[rows], mask_token_id, cfg_scale)
            nfe[rows] += passes
            prediction = gumbel_argmax(logits, temperature, generator)
            if remasking == "low_confidence":
                confidence = torch.softmax(logits.float(), -1).gather(-1, prediction[..., None]).squeeze(-1)
            else:
                confidence = torch.rand(prediction.shape, generator=generator, device=device)

            candidates = masked & in_block[rows]
            count = schedule[rows, step]
            if parallel is not None:
                count = parallel.num_tokens(confidence, candidates, count)
            commit = commit_top(confidence, candidates, count)
            if early_commit is not None:
                progress = (block * steps_per_block + step + 1) / steps
                fired = early_commit(logits, span[rows], progress)
                commit = commit | (masked & fired[:, None])
            x_rows = torch.where(commit, prediction, x_rows)
            if eos_token_id is not None:
                x_rows[:, prompt_length:] = fill_after_eos(x_rows[:, prompt_length:], mask_token_id, eos_token_id)
            x[rows] = x_rows
    return SamplerOutput(sequences=x[:, prompt_length:], nfe=nfe)


def _guided_logits(
    adapter: MaskedLMAdapter,
    x: torch.LongTensor,
    attention: torch.Tensor,
    prompt: torch.Tensor,
    mask_token_id: int,
    cfg_scale: float,
) -> torch.Tensor:
    """The denoiser's logits, with LLaDA's classifier-free guidance when `cfg_scale > 0`."""
    if cfg_scale == 0:
        return adapter(x, attention)
    unconditional = torch.where(prompt, mask_token_id, x)
    both = adapter(torch.cat([x, unconditional]), torch.cat([attention, attention]))
    conditional, unconditional_logits = both.chunk(2)
    return unconditional_logits + (cfg_scale + 1.0) * (conditional - unconditional_logits)
