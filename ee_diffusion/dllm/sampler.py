"""The masked-diffusion LM sampler: semi-autoregressive blocks, low-confidence remasking, early commit.

LLaDA's decoding, step by step: the answer starts fully masked; blocks of `block_length` positions are decoded
left to right, each in `steps / num_blocks` steps; every step runs the denoiser once, takes the argmax of the
(optionally Gumbel-perturbed) logits at every masked position, and commits the step's even share of the block's
masked positions, the most confident first. An early-commit rule may end a row at any step by committing every
masked position, future blocks included, at once; a threshold rule may commit more than the even share.

The selection follows LLaDA's released `generate()` step for step, not only in its final output: the confidence is
the softmax probability of the prediction taken in the logits' own dtype (bf16 for LLaDA-8B), and the positions are
picked with `torch.topk` over the whole sequence row with -inf outside the candidates, so that ties break as there.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..validation import as_int, as_number
from .adapters import MaskedLMAdapter
from .kv_cache import check_cache_mode, make_cache
from .rules import EarlyCommit, ThresholdCommit, accepts_tokens

REMASKING = ("low_confidence", "random")
CONFIDENCE_DTYPES = ("float16", "bfloat16", "float32", "float64")


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
    """Per row, the `count` most confident of the `candidates` positions (all of them if fewer).

    Picked as LLaDA's `generate()` picks them: `torch.topk` with the row's `count` on the row's confidences with -inf
    outside the candidates (pass whole sequence rows, in the confidences' own dtype), so ties break exactly as there.
    Rows with the same `count` share one `topk` call, which on a `(rows, length)` tensor treats each row as a
    separate slice.
    """
    ranked = confidence.masked_fill(~candidates, float("-inf"))
    picked = torch.zeros_like(candidates)
    counts = count.tolist()
    for k in set(counts) - {0}:
        rows = torch.tensor([row for row, c in enumerate(counts) if c == k], device=candidates.device)
        picked[rows] = picked[rows].scatter(-1, ranked[rows].topk(k, dim=-1).indices, True)
    return candidates & picked


def token_confidence(
    logits: torch.Tensor,
    prediction: torch.LongTensor,
    dtype: torch.dtype | None = None,
    excluded_ids: torch.LongTensor | None = None,
) -> torch.Tensor:
    """The softmax probability of each `prediction`, taken in `dtype` (None: the logits' own dtype, as LLaDA does);
    the tokens `excluded_ids` are left out of the softmax (their logits set to -inf), so predicting one of them has
    confidence 0."""
    if dtype is not None:
        logits = logits.to(dtype)
    if excluded_ids is not None:
        logits = logits.index_fill(-1, excluded_ids, float("-inf"))
    return torch.softmax(logits, -1).gather(-1, prediction[..., None]).squeeze(-1)


def resolve_confidence_dtype(confidence_dtype: torch.dtype | str | None) -> torch.dtype | None:
    """None, or a floating dtype given as a `torch.dtype` or by name (`"float32"`), checked."""
    if confidence_dtype is None:
        return None
    dtype = getattr(torch, confidence_dtype, None) if isinstance(confidence_dtype, str) else confidence_dtype
    if not isinstance(dtype, torch.dtype) or str(dtype).removeprefix("torch.") not in CONFIDENCE_DTYPES:
        raise ValueError(
            f"`confidence_dtype` must be None (the logits' dtype) or one of {CONFIDENCE_DTYPES} (a name or a "
            f"torch.dtype), got {confidence_dtype!r}."
        )
    return dtype


def token_id(name: str, value: Any, vocab: int | None) -> int:
    """`value` as a token id: an integer >= 0, below the model's vocabulary size `vocab` when it is known."""
    token = as_int(name, value, low=0)
    if vocab is not None and token >= vocab:
        raise ValueError(f"`{name}` must be a token id from 0 to {vocab - 1} (the model's vocabulary), got {value!r}.")
    return token


def token_id_tensor(
    name: str, ids: Sequence[int], device: torch.device, vocab: int | None = None
) -> torch.LongTensor | None:
    """`ids` (a sequence of token ids, `token_id` each) as a tensor on `device`; None when empty."""
    if isinstance(ids, (str, bytes)) or not isinstance(ids, Sequence):
        raise TypeError(f"`{name}` must be a sequence of token ids (a list or tuple of ints), got {ids!r}.")
    ids = [token_id(f"{name}[{i}]", token, vocab) for i, token in enumerate(ids)]
    return torch.tensor(ids, dtype=torch.long, device=device) if ids else None


def fill_after_eos(answer: torch.LongTensor, mask_token_id: int, eos_token_id: int) -> torch.LongTensor:
    """Rows whose first EOS has nothing masked before it are finished: every position after it becomes EOS."""
    is_eos = answer == eos_token_id
    index = torch.arange(answer.shape[1], device=answer.device)
    first = torch.where(is_eos.any(-1), is_eos.long().argmax(-1), answer.shape[1])
    masked_before = ((answer == mask_token_id) & (index[None, :] < first[:, None])).any(-1)
    finished = is_eos.any(-1) & ~masked_before
    return torch.where(finished[:, None] & (index[None, :] > first[:, None]), eos_token_id, answer)


def check_settings(
    gen_length: int,
    steps: int,
    block_length: int,
    *,
    remasking: str = "low_confidence",
    temperature: float = 0.0,
    cfg_scale: float = 0.0,
    kv_cache: str | None = None,
    cache_refresh_every: int | None = None,
    defaults: tuple[str, ...] = (),
) -> None:
    """The decoding settings `generate` needs, or a `ValueError` / `TypeError` naming the one that is wrong.

    `gen_length` is a multiple of `block_length` and `steps` a multiple of the number of blocks (every block gets the
    same number of steps). `defaults` names the settings that were not given but taken from the model, so that the
    message can say where a value came from.
    """

    def shown(name: str, value: int) -> str:
        return f"{value}, the model's default" if name in defaults else f"{value}"

    for name, value in (("gen_length", gen_length), ("steps", steps), ("block_length", block_length)):
        as_int(name, value, low=1)
    if gen_length % block_length:
        raise ValueError(
            f"`gen_length` ({shown('gen_length', gen_length)}) must be a multiple of `block_length` "
            f"({shown('block_length', block_length)}): the answer is decoded in blocks of `block_length` tokens."
        )
    num_blocks = gen_length // block_length
    if steps % num_blocks:
        raise ValueError(
            f"`steps` ({shown('steps', steps)}) must be a multiple of the number of blocks ({num_blocks} = "
            f"`gen_length` {gen_length} / `block_length` {block_length}): every block gets the same number of steps."
        )
    if not isinstance(remasking, str) or remasking not in REMASKING:
        raise ValueError(f"`remasking` must be one of {REMASKING}, got {remasking!r}.")
    as_number("temperature", temperature, low=0)
    as_number("cfg_scale", cfg_scale, low=0)
    check_cache_mode(kv_cache, cache_refresh_every)
    if kv_cache is not None and cfg_scale > 0:
        raise ValueError(
            f"`kv_cache` ({kv_cache!r}) does not combine with classifier-free guidance (cfg_scale "
            f"{cfg_scale}); use one or the other."
        )


def check_prompt_ids(
    adapter: MaskedLMAdapter, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, gen_length: int
) -> tuple[torch.LongTensor, torch.Tensor | None]:
    """`input_ids` (as int64) and `attention_mask` checked against each other and against what the model takes.

    `input_ids` is a `(batch, prompt_length)` integer tensor of at least one token per row, with token ids the
    model's embedding holds; `attention_mask` (optional) has its shape, holds only 0 and 1, and pads on the left
    (each row some 0s, then at least one 1). The prompt and the answer together must fit the model's
    `config.max_position_embeddings`, when it has one.
    """
    if not isinstance(input_ids, torch.Tensor):
        raise TypeError(f"`input_ids` must be a torch tensor of token ids, got {type(input_ids).__name__}.")
    if (
        input_ids.dim() != 2
        or input_ids.dtype == torch.bool
        or input_ids.dtype.is_floating_point
        or input_ids.dtype.is_complex
        or 0 in input_ids.shape
    ):
        raise ValueError(
            f"`input_ids` must be a (batch, prompt_length) integer tensor with at least one token, got shape "
            f"{tuple(input_ids.shape)} and dtype {input_ids.dtype}."
        )
    input_ids = input_ids.long()
    vocab = _vocabulary_size(getattr(adapter, "model", None))
    if vocab is not None and bool(((input_ids < 0) | (input_ids >= vocab)).any()):
        raise ValueError(
            f"`input_ids` must be token ids from 0 to {vocab - 1} (the model's vocabulary), got values "
            f"from {int(input_ids.min())} to {int(input_ids.max())}."
        )
    if attention_mask is not None:
        if not isinstance(attention_mask, torch.Tensor):
            raise TypeError(f"`attention_mask` must be None or a torch tensor, got {type(attention_mask).__name__}.")
        if attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"`attention_mask` must have the shape of `input_ids` {tuple(input_ids.shape)}, got "
                f"{tuple(attention_mask.shape)}."
            )
        mask = attention_mask.long()
        if bool((mask != attention_mask).any()) or not bool(((mask == 0) | (mask == 1)).all()):
            raise ValueError(
                f"`attention_mask` must hold only 0 (padding) and 1 (a prompt token), got the values "
                f"{torch.unique(attention_mask).tolist()}."
            )
        bad = (mask[:, 1:] < mask[:, :-1]).any(-1) | (mask[:, -1] == 0)
        if bool(bad.any()):
            row = int(bad.nonzero()[0, 0])
            raise ValueError(
                f"`attention_mask` must pad on the left, each row some 0s and then at least one 1 "
                f"(`tokenizer.padding_side = 'left'`), got row {row}: {mask[row].tolist()}."
            )
    limit = getattr(getattr(getattr(adapter, "model", None), "config", None), "max_position_embeddings", None)
    if isinstance(limit, int) and input_ids.shape[1] + gen_length > limit:
        longest = ", the longest of the batch" if input_ids.shape[0] > 1 else ""
        raise ValueError(
            f"The prompt ({input_ids.shape[1]} tokens{longest}) and the answer (`gen_length` {gen_length}) make "
            f"{input_ids.shape[1] + gen_length} positions, more than the model takes (its `max_position_embeddings` "
            f"is {limit}); shorten the prompt or `gen_length`."
        )
    return input_ids, attention_mask


def _vocabulary_size(model: Any) -> int | None:
    """The rows of `model`'s input embedding, when it tells (transformers models do, most remote code too)."""
    try:
        size = getattr(model.get_input_embeddings(), "num_embeddings", None)
    except (AttributeError, NotImplementedError):  # no embedding to ask (a stand-in, a model without the method)
        return None
    return size if isinstance(size, int) else None


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
    confidence_dtype: torch.dtype | str | None = None,
    logits_inf_ids: Sequence[int] = (),
    confidence_inf_ids: Sequence[int] = (),
    kv_cache: str | None = None,
    cache_refresh_every: int | None = None,
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
        early_commit: A rule of `(logits, positions, progress)` (and of the current tokens when it takes a `tokens`
            keyword); when it fires for a row, every masked position of that row takes its prediction and the row
            stops.
        parallel: A `ThresholdCommit` that commits every prediction above its probability threshold.
        eos_token_id: When set, a row whose first EOS has nothing masked before it is finished at once (the rest
            of it becomes EOS).
        confidence_dtype: The dtype the confidences' softmax is taken in: None (the default) is the logits' own
            dtype, as LLaDA's `generate()` does (bf16 logits give bf16 confidences, with many exact ties near 1);
            `"float32"` (or `torch.float32`, `"float64"`, ...) computes them in that dtype instead.
        logits_inf_ids: Tokens never predicted: their logits are -inf before the argmax, the softmax and the
            early-commit rule. `(eos_id,)` is LLaDA's `logits_eos_inf=True` (its EOS is 126081).
        confidence_inf_ids: Tokens committed last: they may be predicted, but are left out of the confidences'
            softmax (predicting one gives confidence 0). `(eos_id, eot_id)` is LLaDA's `confidence_eos_eot_inf=True`
            (126081, 126348) at temperature 0; at temperature > 0 the released code only leaves out EoT (its EOS
            assignment lands on the noisy copy of the logits), which `(eot_id,)` reproduces.
        kv_cache: Fast-dLLM's approximate block KV cache (see `kv_cache.py`): `"prefix"` (each block's later steps
            run the block and what follows it, against the kept keys and values of the prompt and earlier blocks)
            or `"dual"` (they run the block only); None runs the whole sequence at every step. Needs a model that
            takes cached keys and values (BERT masked LMs) and `cfg_scale` 0.
        cache_refresh_every: With a cache, also run the whole sequence every this many steps inside a block (None:
            at each block's first step only; 1: at every step, which is exact decoding).
        generator: Randomness of the Gumbel noise and of random remasking.
    """
    check_settings(
        gen_length,
        steps,
        block_length,
        remasking=remasking,
        temperature=temperature,
        cfg_scale=cfg_scale,
        kv_cache=kv_cache,
        cache_refresh_every=cache_refresh_every,
    )
    input_ids, attention_mask = check_prompt_ids(adapter, input_ids, attention_mask, gen_length)
    num_blocks = gen_length // block_length
    batch, prompt_length = input_ids.shape
    device = input_ids.device
    cache = None if kv_cache is None else make_cache(adapter, batch)
    if parallel is not None and remasking == "random":
        raise ValueError(
            "`parallel` (Fast-dLLM's threshold rule) commits the tokens whose probability is above its threshold; "
            "under remasking='random' the confidences are random numbers, not probabilities: use "
            "remasking='low_confidence' with it."
        )
    dtype = resolve_confidence_dtype(confidence_dtype)
    vocab = _vocabulary_size(getattr(adapter, "model", None))
    mask_token_id = token_id("mask_token_id", mask_token_id, vocab)
    if eos_token_id is not None:
        eos_token_id = token_id("eos_token_id", eos_token_id, vocab)
    never_predicted = token_id_tensor("logits_inf_ids", logits_inf_ids, device, vocab)
    committed_last = token_id_tensor("confidence_inf_ids", confidence_inf_ids, device, vocab)
    rule_takes_tokens = early_commit is not None and accepts_tokens(early_commit)
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    x = torch.cat([input_ids, torch.full((batch, gen_length), mask_token_id, device=device)], dim=1)
    answer_mask = torch.ones((batch, gen_length), dtype=attention_mask.dtype, device=device)
    attention = torch.cat([attention_mask, answer_mask], 1)
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
            if cache is None:
                logits = _guided_logits(adapter, x_rows, attention[rows], prompt[rows], mask_token_id, cfg_scale)
            elif step == 0 or (cache_refresh_every is not None and step % cache_refresh_every == 0):
                logits = cache.refresh(rows, x_rows, attention[rows])
            else:
                stop = start + block_length if kv_cache == "dual" else x.shape[1]
                logits = cache.partial(rows, x_rows, attention[rows], start, stop)
            if never_predicted is not None:
                logits = logits.index_fill(-1, never_predicted, float("-inf"))
            nfe[rows] += passes
            prediction = gumbel_argmax(logits, temperature, generator)
            if remasking == "low_confidence":
                confidence = token_confidence(logits, prediction, dtype, committed_last)
            else:
                confidence = torch.rand(prediction.shape, generator=generator, device=device)

            candidates = masked & in_block[rows]
            count = schedule[rows, step]
            if parallel is not None:
                count = parallel.num_tokens(confidence, candidates, count)
            commit = commit_top(confidence, candidates, count)
            if early_commit is not None:
                progress = (block * steps_per_block + step + 1) / steps
                tokens = {"tokens": x_rows} if rule_takes_tokens else {}
                fired = early_commit(logits, span[rows], progress, **tokens)
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
