"""Model adapters: one calling convention (`logits = adapter(input_ids, attention_mask)`) over the ways masked
diffusion LMs want to be called.

Every adapter returns logits aligned with the input (the logits at position `i` predict the token at `i`) and
accepts a `(batch, length)` padding mask (1 for real tokens, 0 for left padding), which it turns into whatever
its model understands without ever making attention causal.
"""

from __future__ import annotations

import inspect

import torch

LLADA_MASK_TOKEN_ID = 126336
DREAM_MASK_TOKEN_ID = 151666


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that start at 0 on the first real token of each row (padding gets position 0)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def _logits(output) -> torch.Tensor:
    return output.logits if hasattr(output, "logits") else output[0] if isinstance(output, tuple) else output


class MaskedLMAdapter:
    """Any transformers masked LM with a mask token (`BertForMaskedLM`, `ModernBertForMaskedLM`, ...).

    Called as `model(input_ids=..., attention_mask=..., position_ids=...)`; the padding mask and position ids are
    only passed when a row is padded (and position ids only when the model's forward takes them).

    Args:
        model: The masked LM.
        mask_token_id: Id of the mask token; read from `model.config.mask_token_id` when not given.
    """

    default_mask_token_id: int | None = None

    def __init__(self, model: torch.nn.Module, mask_token_id: int | None = None) -> None:
        self.model = model
        config = getattr(model, "config", None)
        if mask_token_id is None:
            mask_token_id = getattr(config, "mask_token_id", None)
        self.mask_token_id = mask_token_id if mask_token_id is not None else self.default_mask_token_id

    def __call__(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        if attention_mask is None or bool(attention_mask.all()):
            return _logits(self.model(input_ids=input_ids))
        return _logits(self.model(input_ids=input_ids, **self.padding_kwargs(attention_mask)))

    def padding_kwargs(self, attention_mask: torch.Tensor) -> dict:
        """Keyword arguments that tell the model which tokens are padding."""
        kwargs = {"attention_mask": attention_mask}
        if "position_ids" in inspect.signature(self.model.forward).parameters:
            kwargs["position_ids"] = positions_from_mask(attention_mask)
        return kwargs


class LLaDAAdapter(MaskedLMAdapter):
    """LLaDA (`GSAI-ML/LLaDA-8B-*`, trust_remote_code): `model(input_ids).logits`, mask id 126336.

    LLaDA's remote code builds a *causal* bias whenever it gets an `attention_mask` without an `attention_bias`, so
    padding is expressed as a full bidirectional boolean `attention_bias` of shape `(batch, 1, length, length)` that
    only hides the padded keys, and no `attention_mask` is ever passed.
    """

    default_mask_token_id = LLADA_MASK_TOKEN_ID

    def padding_kwargs(self, attention_mask: torch.Tensor) -> dict:
        keys = attention_mask.bool()[:, None, None, :]
        return {"attention_bias": keys.expand(-1, 1, attention_mask.shape[1], -1)}


class DreamAdapter(MaskedLMAdapter):
    """Dream (`Dream-org/Dream-v0-*`, trust_remote_code): `model(input_ids, attention_mask, tok_idx).logits`, mask
    id 151666, and logits shifted by one (the logits at position `i` come out at `i - 1`).

    Without padding the mask is the string `"full"`; with padding it is a boolean `(batch, 1, length, length)` mask
    and `tok_idx` holds positions that start at 0 on each row's first real token.
    """

    default_mask_token_id = DREAM_MASK_TOKEN_ID

    def __call__(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        if attention_mask is None or bool(attention_mask.all()):
            logits = _logits(self.model(input_ids, "full", None))
        else:
            real = attention_mask.bool()
            pairs = (real[:, None, :, None] & real[:, None, None, :]).contiguous()
            logits = _logits(self.model(input_ids, pairs, positions_from_mask(attention_mask)))
        return torch.cat([logits[:, :1], logits[:, :-1]], dim=1)


class LLaDA2Adapter(MaskedLMAdapter):
    """LLaDA2 (`inclusionAI/LLaDA2.*`), called the way diffusers' `LLaDA2Pipeline` calls it: a 2-D
    `attention_mask` and `position_ids`, always."""

    def __call__(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        position_ids = positions_from_mask(attention_mask)
        return _logits(self.model(input_ids, attention_mask=attention_mask, position_ids=position_ids))


ADAPTERS = {"masked-lm": MaskedLMAdapter, "llada": LLaDAAdapter, "dream": DreamAdapter, "llada2": LLaDA2Adapter}
_MODEL_TYPES = {"llada": "llada", "dream": "dream", "llada2": "llada2", "llada2_moe": "llada2"}


def get_adapter(model: torch.nn.Module, kind: str = "auto", mask_token_id: int | None = None) -> MaskedLMAdapter:
    """Wrap `model` in the adapter for its calling convention.

    Args:
        model: A masked diffusion LM, or an adapter (returned as is).
        kind: `"auto"` (from `model.config.model_type`: `llada`, `dream`, `llada2`/`llada2_moe`, anything else a
            masked LM) or one of `"masked-lm"`, `"llada"`, `"dream"`, `"llada2"`.
        mask_token_id: Overrides the adapter's mask id.
    """
    if isinstance(model, MaskedLMAdapter):
        return model
    if kind == "auto":
        model_type = str(getattr(getattr(model, "config", None), "model_type", "")).lower()
        kind = _MODEL_TYPES.get(model_type, "masked-lm")
    if kind not in ADAPTERS:
        raise ValueError(f"Unknown adapter kind {kind!r}; expected 'auto' or one of {tuple(ADAPTERS)}.")
    return ADAPTERS[kind](model, mask_token_id=mask_token_id)
