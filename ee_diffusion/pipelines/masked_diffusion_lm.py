"""`MaskedDiffusionLMPipeline`: text generation with a masked diffusion LM (LLaDA, Dream, LLaDA2, any masked LM),
with optional Prophet / SchED early commit. It only wires tokenizer, adapter and sampler together."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from diffusers import DiffusionPipeline
from diffusers.utils import BaseOutput
from transformers import AutoModel, AutoModelForMaskedLM, AutoTokenizer, GenerationConfig

from ..dllm.adapters import get_adapter
from ..dllm.rules import EarlyCommit, ThresholdCommit, resolve_early_commit
from ..dllm.sampler import check_prompt_ids, check_settings, generate
from ..validation import as_int, as_number
from .loading import resolve_pretrained

GENERATION_KEYS = ("gen_length", "steps", "block_length", "mask_token_id", "eos_token_id")


@dataclass
class MaskedDiffusionLMOutput(BaseOutput):
    """`texts`: decoded answers (cut at the first EOS); `sequences` `(batch, gen_length)`; `nfe` `(batch,)`:
    denoiser forward passes per sample."""

    texts: list[str] | None
    sequences: torch.LongTensor
    nfe: torch.LongTensor


class MaskedDiffusionLMPipeline(DiffusionPipeline):
    r"""
    Generate text with a masked diffusion LM: semi-autoregressive blocks, low-confidence remasking and optional early
    commit (`early_commit=SchEDCommit(...)`, `ProphetCommit(...)`, `"sched"` or `"prophet"`).

    Args:
        model: The denoiser: a transformers masked LM, or LLaDA / Dream / LLaDA2 (picked by `config.model_type`).
        tokenizer: Its tokenizer (left padding is used for batches).
        adapter: Calling convention, `"auto"` or one of `"masked-lm"`, `"llada"`, `"dream"`, `"llada2"`.
        gen_length, steps, block_length, mask_token_id, eos_token_id: Default generation settings (saved with the
            pipeline; `from_pretrained` on a transformers folder reads them from its `generation_config.json`).
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        adapter: str = "auto",
        gen_length: int | None = None,
        steps: int | None = None,
        block_length: int | None = None,
        mask_token_id: int | None = None,
        eos_token_id: int | None = None,
    ):
        super().__init__()
        self.register_modules(model=model, tokenizer=tokenizer)
        self.register_to_config(
            adapter=adapter,
            gen_length=gen_length,
            steps=steps,
            block_length=block_length,
            mask_token_id=mask_token_id,
            eos_token_id=eos_token_id,
        )
        if mask_token_id is None:
            mask_token_id = getattr(tokenizer, "mask_token_id", None)
        self.adapter = get_adapter(model, adapter, mask_token_id=mask_token_id)

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs: Any
    ) -> MaskedDiffusionLMPipeline:
        """Load a saved pipeline, or a transformers folder / Hub id holding a model and its tokenizer, or a shipped
        model by name (`tiny-mdlm`, `tiny-mdlm-puzzles`).

        For a transformers folder the model loads with `AutoModelForMaskedLM` (with `AutoModel` for architectures it
        does not know, such as LLaDA and Dream with `trust_remote_code=True`), and the generation defaults come
        from its `generation_config.json`. Keyword arguments (`torch_dtype`, `trust_remote_code`, and the generation
        defaults of `__init__`) are passed on.
        """
        path = resolve_pretrained(pretrained_model_name_or_path, marker="tokenizer.json")
        if os.path.isfile(os.path.join(path, "model_index.json")):
            return super().from_pretrained(path, **kwargs)
        init_kwargs = {key: kwargs.pop(key) for key in ("adapter", *GENERATION_KEYS) if key in kwargs}
        try:
            defaults = GenerationConfig.from_pretrained(path).to_dict()
            init_kwargs = {**{k: defaults[k] for k in GENERATION_KEYS if defaults.get(k) is not None}, **init_kwargs}
        except OSError:
            pass  # no generation_config.json: settings come from the call
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=kwargs.get("trust_remote_code", False))
        try:
            model = AutoModelForMaskedLM.from_pretrained(path, **kwargs)
        except ValueError:
            model = AutoModel.from_pretrained(path, **kwargs)
        return cls(model=model.eval(), tokenizer=tokenizer, **init_kwargs)

    def _default(self, name: str, value: Any) -> Any:
        value = self.config.get(name) if value is None else value
        if value is None:
            raise ValueError(f"`{name}` is needed: pass it to the call, or store it with the model.")
        return value

    def _check_inputs(self, prompt: Any, input_ids: Any, attention_mask: Any) -> list[str] | None:
        """The prompts as a list of texts, or None when `input_ids` is given; a `ValueError` / `TypeError` for a
        prompt that is missing, empty or of the wrong type, or for both `prompt` and `input_ids`."""
        if input_ids is not None:
            if prompt is not None:
                raise ValueError("Give `prompt` or `input_ids` (with its `attention_mask`), not both.")
            return None
        if prompt is None:
            raise ValueError("Give `prompt` or `input_ids`.")
        if attention_mask is not None:
            raise ValueError("`attention_mask` goes with `input_ids`; with `prompt` the pipeline makes it.")
        if isinstance(prompt, str):
            prompts, names = [prompt], ["prompt"]
        elif isinstance(prompt, (list, tuple)):
            if not prompt:
                raise ValueError("`prompt` must be a text or a non-empty list of texts, got an empty list.")
            prompts, names = list(prompt), [f"prompt[{i}]" for i in range(len(prompt))]
        else:
            raise TypeError(f"`prompt` must be a text or a list of texts, got {type(prompt).__name__} {prompt!r}.")
        for name, text in zip(names, prompts):
            if not isinstance(text, str):
                raise TypeError(f"`{name}` must be a text (str), got {type(text).__name__} {text!r}.")
            if not text.strip():
                raise ValueError(f"`{name}` must be a non-empty text, got {text!r}.")
        if self.tokenizer is None:
            raise ValueError("A `prompt` needs the pipeline's tokenizer, and it has none: give `input_ids`.")
        return prompts

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        gen_length: int | None = None,
        steps: int | None = None,
        block_length: int | None = None,
        temperature: float = 0.0,
        cfg_scale: float = 0.0,
        remasking: str = "low_confidence",
        early_commit: EarlyCommit | str | None = None,
        parallel: ThresholdCommit | None = None,
        eos_token_id: int | None = None,
        mask_token_id: int | None = None,
        confidence_dtype: torch.dtype | str | None = None,
        logits_inf_ids: Sequence[int] = (),
        confidence_inf_ids: Sequence[int] = (),
        kv_cache: str | None = None,
        cache_refresh_every: int | None = None,
        generator: torch.Generator | None = None,
        return_dict: bool = True,
    ) -> MaskedDiffusionLMOutput | tuple:
        """Generate an answer for each prompt.

        Every argument is checked before the model runs: a `ValueError` or `TypeError` names the argument, the value
        given and what is accepted (an empty or blank prompt, a prompt that does not fit the model's
        `max_position_embeddings` with `gen_length`, `gen_length` not a multiple of `block_length`, `steps` not a
        multiple of the number of blocks, a cache option without `kv_cache`, ...).

        Args:
            prompt: Text prompt(s), each with at least one non-blank character; or give `input_ids` instead.
            input_ids: `(batch, prompt_length)` token ids, left-padded (an integer tensor).
            attention_mask: With `input_ids`: its shape, 1 for a prompt token and 0 for (left) padding.
            gen_length: Tokens to generate (default: the model's).
            steps: Refinement steps in all (default: the model's, at most `gen_length`).
            block_length: Semi-autoregressive block length (default: the model's, at most `gen_length`).
            temperature: 0 is greedy; otherwise Gumbel-max sampling through `generator`.
            cfg_scale: Classifier-free guidance strength (0: off).
            remasking: `"low_confidence"` or `"random"`.
            early_commit: None, `"prophet"`, `"sched"`, or a rule such as `SchEDCommit(shape="exp", k=4)`.
            parallel: A `ThresholdCommit` (Fast-dLLM's rule), composable with `early_commit`.
            eos_token_id: Ends an answer (default: the model's, else the tokenizer's); None and no default: off.
            mask_token_id: The mask token (default: the model's, else the adapter's).
            confidence_dtype: Dtype of the confidences' softmax: None (the logits' own, as LLaDA's `generate()`) or
                `"float32"` and the like.
            logits_inf_ids: Tokens never predicted (LLaDA's `logits_eos_inf=True` is `[eos_id]`).
            confidence_inf_ids: Tokens committed last, with confidence 0 (LLaDA's `confidence_eos_eot_inf=True` is
                `[eos_id, eot_id]`).
            kv_cache: Fast-dLLM's approximate block KV cache, `"prefix"` or `"dual"` (None: off); needs a model that
                takes cached keys and values (BERT masked LMs such as the shipped ones).
            cache_refresh_every: With `kv_cache`, also recompute the whole sequence every this many steps of a block
                (None: only at each block's first step; 1: every step, exact).
            generator: Randomness for sampling.
        """
        as_number("temperature", temperature, low=0)
        as_number("cfg_scale", cfg_scale, low=0)
        for name, value in (("gen_length", gen_length), ("steps", steps), ("block_length", block_length)):
            if value is not None:  # 0 would otherwise read as "the model's default"
                as_int(name, value, low=1)
        prompts = self._check_inputs(prompt, input_ids, attention_mask)
        defaults = tuple(
            name
            for name, value in (("gen_length", gen_length), ("steps", steps), ("block_length", block_length))
            if value is None
        )
        gen_length = self._default("gen_length", gen_length)
        steps = steps or min(self._default("steps", steps), gen_length)
        block_length = block_length or min(self.config.get("block_length") or gen_length, gen_length)
        check_settings(
            gen_length,
            steps,
            block_length,
            remasking=remasking,
            temperature=temperature,
            cfg_scale=cfg_scale,
            kv_cache=kv_cache,
            cache_refresh_every=cache_refresh_every,
            defaults=defaults,
        )
        early_commit = resolve_early_commit(early_commit)
        if parallel is not None and not callable(getattr(parallel, "num_tokens", None)):
            raise TypeError(f"`parallel` must be None or a ThresholdCommit, got {parallel!r}.")
        if mask_token_id is None:  # (0 is a token id like any other)
            mask_token_id = self._default("mask_token_id", self.adapter.mask_token_id)
        if eos_token_id is None:
            eos_token_id = self.config.get("eos_token_id")
        if eos_token_id is None:
            eos_token_id = getattr(self.tokenizer, "eos_token_id", None)
        if prompts is not None:
            self.tokenizer.padding_side = "left"
            encoded = self.tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
            input_ids, attention_mask = encoded["input_ids"], encoded["attention_mask"]
            tokens = set(input_ids[attention_mask.bool()].tolist())
            unknown = self.tokenizer.unk_token_id
            if unknown is not None and unknown in tokens:
                raise ValueError(
                    f"The prompt {prompt!r} has characters the tokenizer does not know (they would "
                    f"become {self.tokenizer.unk_token}); the model was trained on its vocabulary only."
                )
            reserved = {mask_token_id: "mask", self.tokenizer.pad_token_id: "padding"}
            written = sorted(reserved[token] for token in tokens & set(reserved) if token is not None)
            if written:
                raise ValueError(
                    f"The prompt {prompt!r} spells the {' and '.join(written)} token "
                    f"({', '.join(repr(self.tokenizer.convert_ids_to_tokens(t)) for t in tokens & set(reserved))}), "
                    "which marks positions to fill or to ignore, not text; leave it out of the prompt."
                )
            if input_ids.shape[1] == 0:
                raise ValueError(f"`prompt` must have at least one token, got {prompt!r} (the tokenizer makes none).")
        input_ids, attention_mask = check_prompt_ids(self.adapter, input_ids, attention_mask, gen_length)
        device = self._execution_device
        output = generate(
            self.adapter,
            input_ids.to(device),
            None if attention_mask is None else attention_mask.to(device),
            gen_length=gen_length,
            steps=steps,
            block_length=block_length,
            mask_token_id=mask_token_id,
            temperature=temperature,
            cfg_scale=cfg_scale,
            remasking=remasking,
            early_commit=early_commit,
            parallel=parallel,
            eos_token_id=eos_token_id,
            confidence_dtype=confidence_dtype,
            logits_inf_ids=logits_inf_ids,
            confidence_inf_ids=confidence_inf_ids,
            kv_cache=kv_cache,
            cache_refresh_every=cache_refresh_every,
            generator=generator,
        )
        texts = None
        if self.tokenizer is not None:
            answers = [row if eos_token_id is None else row[: _first(row, eos_token_id)] for row in output.sequences]
            texts = self.tokenizer.batch_decode(answers, skip_special_tokens=True)
        if not return_dict:
            return texts, output.sequences, output.nfe
        return MaskedDiffusionLMOutput(texts=texts, sequences=output.sequences, nfe=output.nfe)


def _first(row: torch.LongTensor, token: int) -> int:
    hits = (row == token).nonzero()
    return int(hits[0, 0]) if len(hits) else len(row)
