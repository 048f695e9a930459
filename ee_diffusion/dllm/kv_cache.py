"""Fast-dLLM's approximate block KV cache: reuse the keys and values of the positions a step does not decode.

A masked diffusion LM attends bidirectionally, so every position's keys and values change whenever any token does,
and exact decoding recomputes the whole sequence at every step. Fast-dLLM (Wu et al., 2025) observes that the keys
and values of positions outside the block being decoded barely change over the block's steps, and reuses them:

- `"prefix"`: at the first step of a block the whole sequence runs once and every layer's keys and values are
  kept; the block's later steps run only the positions from the block's start to the end of the sequence, whose
  queries attend to the kept keys and values of the prompt and the decoded blocks (the prefix) and to their own
  fresh ones.
- `"dual"`: the same, but only the block's positions run; the masked positions after the block (the suffix) are
  served from the cache too.

`refresh_every` runs the whole sequence again every that many steps inside a block; 1 refreshes at every step, which
is exact decoding computed through the cache. Positions a step does not run keep the logits of their last run, so
an early-commit rule still sees (slightly stale) logits for every position.

`BertKVCache` serves BERT-family masked LMs (`BertForMaskedLM`: both shipped `tiny-mdlm` models): it runs the model's
own modules (embeddings, each layer's projections, output and feed-forward, the prediction head) with a
scaled-dot-product attention over the kept keys and values.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..validation import as_int
from .adapters import MaskedLMAdapter, positions_from_mask
from .methods import CACHE_MODES


def check_cache_mode(kv_cache: str | None, refresh_every: int | None) -> None:
    """`kv_cache` is None or one of `CACHE_MODES`; `refresh_every` is None or a positive int, and only set with a
    cache (without one every step runs the whole sequence, so a refresh interval would be silently ignored)."""
    if kv_cache is not None and (not isinstance(kv_cache, str) or kv_cache not in CACHE_MODES):
        raise ValueError(f"`kv_cache` must be None (off) or one of {CACHE_MODES}, got {kv_cache!r}.")
    if refresh_every is not None:  # None: each block's first step only
        as_int("cache_refresh_every", refresh_every, low=1)
        if kv_cache is None:
            raise ValueError(
                f"`cache_refresh_every` only applies with `kv_cache` (one of {CACHE_MODES}), got "
                f"cache_refresh_every={refresh_every!r} with kv_cache=None: without a cache every step already runs "
                f"the whole sequence."
            )


class BertKVCache:
    """Every layer's keys and values (and the last logits) of each row of a decoding batch, for a BERT masked LM.

    Args:
        model: A `BertForMaskedLM` (anything with `.bert.embeddings`, `.bert.encoder.layer` and `.cls`).
        batch: Rows of the decoding batch (the cache is indexed by the sampler's row numbers).
    """

    def __init__(self, model: torch.nn.Module, batch: int) -> None:
        self.model, self.batch = model, batch
        self.bert = model.bert
        self.keys: list[torch.Tensor | None] = [None] * len(self.bert.encoder.layer)
        self.values: list[torch.Tensor | None] = [None] * len(self.bert.encoder.layer)
        self.logits: torch.Tensor | None = None

    @staticmethod
    def supports(model: torch.nn.Module) -> bool:
        """Whether `model` has the BERT masked-LM layout this cache runs."""
        bert = getattr(model, "bert", None)
        return (
            hasattr(model, "cls")
            and hasattr(bert, "embeddings")
            and hasattr(getattr(bert, "encoder", None), "layer")
            and getattr(model.config, "model_type", None) == "bert"
            and getattr(model.config, "position_embedding_type", "absolute") == "absolute"
        )

    def _embed(self, input_ids: torch.LongTensor, positions: torch.LongTensor) -> torch.Tensor:
        embeddings = self.bert.embeddings
        hidden = (
            embeddings.word_embeddings(input_ids)
            + embeddings.token_type_embeddings(torch.zeros_like(input_ids))
            + embeddings.position_embeddings(positions)
        )
        return embeddings.LayerNorm(hidden)

    def _heads(self, attention: torch.nn.Module, tensor: torch.Tensor) -> torch.Tensor:
        batch, length, _ = tensor.shape
        return tensor.view(batch, length, attention.num_attention_heads, -1).transpose(1, 2)

    def _run(
        self, rows: torch.LongTensor, x: torch.LongTensor, attention_mask: torch.Tensor, start: int, stop: int
    ) -> torch.Tensor:
        """Run positions `[start, stop)` of `rows`, attending to the cached keys and values everywhere else (all of
        them when the range is the whole sequence); store their keys, values and logits; return full-length logits."""
        whole = start == 0 and stop == x.shape[1]
        every_row = rows.numel() == self.batch  # rows are increasing row numbers, so these are all of them, in order
        positions = positions_from_mask(attention_mask)[:, start:stop]
        hidden = self._embed(x[:, start:stop], positions)
        keys_visible = attention_mask.bool()[:, None, None, :]
        for index, layer in enumerate(self.bert.encoder.layer):
            attention = layer.attention.self
            query = self._heads(attention, attention.query(hidden))
            key = self._heads(attention, attention.key(hidden))
            value = self._heads(attention, attention.value(hidden))
            if whole:
                all_keys, all_values = key, value
            else:
                all_keys, all_values = self.keys[index][rows], self.values[index][rows]  # copies (indexed)
                all_keys[:, :, start:stop], all_values[:, :, start:stop] = key, value
            if every_row:
                self.keys[index], self.values[index] = all_keys, all_values
            else:
                if self.keys[index] is None:
                    shape = (self.batch, *all_keys.shape[1:])
                    self.keys[index], self.values[index] = all_keys.new_zeros(shape), all_values.new_zeros(shape)
                self.keys[index][rows], self.values[index][rows] = all_keys, all_values
            context = F.scaled_dot_product_attention(query, all_keys, all_values, attn_mask=keys_visible)
            context = context.transpose(1, 2).reshape(hidden.shape)
            attended = layer.attention.output(context, hidden)
            hidden = layer.output(layer.intermediate(attended), attended)
        logits = self.model.cls(hidden)
        full = logits if whole else self.logits[rows]
        full[:, start:stop] = logits
        if every_row:
            self.logits = full
        else:
            if self.logits is None:
                self.logits = full.new_zeros((self.batch, *full.shape[1:]))
            self.logits[rows] = full
        return full

    def refresh(self, rows: torch.LongTensor, x: torch.LongTensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Run the whole sequence of `rows` (`x`, `attention_mask` are those rows), keep every layer's keys and
        values; return the logits `(len(rows), length, vocab)`."""
        return self._run(rows, x, attention_mask, 0, x.shape[1])

    def partial(
        self, rows: torch.LongTensor, x: torch.LongTensor, attention_mask: torch.Tensor, start: int, stop: int
    ) -> torch.Tensor:
        """Run only positions `[start, stop)` of `rows` against the kept keys and values of the others; positions
        outside the range keep the logits of their last run."""
        if self.logits is None:
            raise RuntimeError("The cache is empty: call `refresh` first.")
        return self._run(rows, x, attention_mask, start, stop)


def make_cache(adapter: MaskedLMAdapter, batch: int) -> BertKVCache:
    """The KV cache for `adapter`'s model, or a `ValueError` naming what the cache supports."""
    model = getattr(adapter, "model", None)
    if type(adapter) is not MaskedLMAdapter or not BertKVCache.supports(model):
        raise ValueError(
            f"`kv_cache` needs a model that can take cached keys and values; supported: BERT masked LMs "
            f"(`BertForMaskedLM`, as the shipped tiny-mdlm models), got {type(model).__name__} behind "
            f"{type(adapter).__name__}. LLaDA's and Dream's released model code take no cached keys and values."
        )
    return BertKVCache(model, batch)
