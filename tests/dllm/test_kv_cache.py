"""Fast-dLLM's block KV cache: the cached forward is the model's own, refreshing at every step is exact decoding,
and the cache really runs fewer positions."""

import pytest
import torch

from ee_diffusion.dllm.adapters import LLaDAAdapter, MaskedLMAdapter
from ee_diffusion.dllm.kv_cache import BertKVCache
from ee_diffusion.dllm.rules import ProphetCommit, SchEDCommit, ThresholdCommit
from ee_diffusion.dllm.sampler import generate

from .conftest import LLaDAStandIn, tiny_config

PROMPTS = ["12+345=", "sort:93812=", "1+1="]


@pytest.fixture
def bert(tokenizer):
    """A random BERT with enough positions for 3 blocks of 4 after a 11-token prompt."""
    from ee_diffusion.training.mdlm import build_model

    torch.manual_seed(0)
    return build_model(tokenizer, tiny_config(gen_length=12, max_prompt_length=12)).eval()


def _batch(tokenizer):
    encoded = tokenizer(PROMPTS, return_tensors="pt", padding=True, add_special_tokens=False)
    return encoded["input_ids"], encoded["attention_mask"]


def _decode(model, tokenizer, **settings):
    ids, mask = _batch(tokenizer)
    options = dict(gen_length=12, steps=12, block_length=4, mask_token_id=tokenizer.mask_token_id)
    return generate(MaskedLMAdapter(model), ids, mask, **{**options, **settings})


def test_cached_forward_is_the_models_forward(bert, tokenizer):
    ids, mask = _batch(tokenizer)
    x = torch.cat([ids, torch.full((3, 12), tokenizer.mask_token_id)], 1)
    attention = torch.cat([mask, torch.ones(3, 12, dtype=mask.dtype)], 1)
    reference = MaskedLMAdapter(bert)(x, attention)
    real = attention.bool()
    cache = BertKVCache(bert, batch=3)
    rows = torch.arange(3)
    torch.testing.assert_close(cache.refresh(rows, x, attention)[real], reference[real], rtol=1e-5, atol=1e-5)
    # Nothing changed since the refresh: running a range of two rows against the cache gives the same logits.
    partial = cache.partial(rows[1:], x[1:], attention[1:], 12, 18)
    torch.testing.assert_close(partial[real[1:]], reference[1:][real[1:]], rtol=1e-5, atol=1e-5)
    # A cache filled row by row holds the same as one filled at once.
    by_rows = BertKVCache(bert, batch=3)
    for row in (2, 0, 1):
        by_rows.refresh(rows[row : row + 1], x[row : row + 1], attention[row : row + 1])
    filled = by_rows.partial(rows, x, attention, 12, 18)
    torch.testing.assert_close(filled[real], reference[real], rtol=1e-5, atol=1e-5)
    # A token changed outside the range is not seen (the approximation the cache makes); after a refresh it is.
    changed = x.clone()
    changed[:, 20] = tokenizer.convert_tokens_to_ids("7")
    fresh = MaskedLMAdapter(bert)(changed, attention)
    assert not torch.allclose(cache.partial(rows, changed, attention, 12, 16)[:, 12:16], fresh[:, 12:16], atol=1e-4)
    torch.testing.assert_close(cache.refresh(rows, changed, attention)[real], fresh[real], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["prefix", "dual"])
@pytest.mark.parametrize(
    "settings",
    [
        {},
        {"early_commit": SchEDCommit(tau_high=0.5, tau_low=0.1, shape="exp")},
        {"early_commit": ProphetCommit(thresholds=(0.5, 0.3, 0.1))},
        {"parallel": ThresholdCommit(0.05)},
    ],
    ids=["plain", "sched", "prophet", "threshold"],
)
def test_refreshing_every_step_changes_nothing(bert, tokenizer, mode, settings):
    plain = _decode(bert, tokenizer, **settings)
    cached = _decode(bert, tokenizer, kv_cache=mode, cache_refresh_every=1, **settings)
    assert torch.equal(cached.sequences, plain.sequences)
    assert torch.equal(cached.nfe, plain.nfe)


def _positions_run(bert, tokenizer, **settings) -> list[int]:
    """Positions each forward pass runs through the first layer's query projection (a plain torch hook)."""
    lengths = []
    handle = bert.bert.encoder.layer[0].attention.self.query.register_forward_hook(
        lambda module, args, output: lengths.append(args[0].shape[1])
    )
    try:
        _decode(bert, tokenizer, **settings)
    finally:
        handle.remove()
    return lengths


def test_the_cache_runs_fewer_positions(bert, tokenizer):
    total = 11 + 12  # the padded prompt and the answer
    assert _positions_run(bert, tokenizer) == [total] * 12
    # Prefix: each block's first step runs everything, its other three the block and what follows it.
    assert _positions_run(bert, tokenizer, kv_cache="prefix") == [total, 12, 12, 12, total, 8, 8, 8, total, 4, 4, 4]
    assert _positions_run(bert, tokenizer, kv_cache="dual") == [total, 4, 4, 4] * 3
    assert _positions_run(bert, tokenizer, kv_cache="dual", cache_refresh_every=2) == [total, 4, total, 4] * 3


def test_approximate_cache_decodes_and_counts_passes(bert, tokenizer):
    plain = _decode(bert, tokenizer)
    for mode in ("prefix", "dual"):
        cached = _decode(bert, tokenizer, kv_cache=mode)
        assert cached.sequences.shape == plain.sequences.shape
        assert not (cached.sequences == tokenizer.mask_token_id).any()
        assert torch.equal(cached.nfe, plain.nfe)  # a cached pass is still one denoiser pass


@pytest.mark.parametrize(
    "settings, error, match",
    [
        (
            {"kv_cache": "triple"},
            ValueError,
            r"`kv_cache` must be None \(off\) or one of \('prefix', 'dual'\), got 'triple'",
        ),
        (
            {"cache_refresh_every": 2},
            ValueError,
            r"`cache_refresh_every` only applies with `kv_cache` .* got cache_refresh_every=2 with kv_cache=None",
        ),
        (
            {"kv_cache": "prefix", "cache_refresh_every": 0},
            ValueError,
            "`cache_refresh_every` must be an integer >= 1",
        ),
        ({"kv_cache": "prefix", "cache_refresh_every": 1.5}, TypeError, "`cache_refresh_every` must be an integer"),
        ({"kv_cache": "prefix", "cache_refresh_every": True}, TypeError, "`cache_refresh_every` must be an integer"),
        ({"kv_cache": "dual", "cfg_scale": 1.0}, ValueError, "does not combine with classifier-free guidance"),
    ],
)
def test_bad_cache_settings_raise(bert, tokenizer, settings, error, match):
    with pytest.raises(error, match=match):
        _decode(bert, tokenizer, **settings)


def test_models_that_take_no_cached_keys_are_refused(tokenizer):
    ids, mask = _batch(tokenizer)
    with pytest.raises(ValueError, match="needs a model that can take cached keys and values.*LLaDAStandIn"):
        generate(
            LLaDAAdapter(LLaDAStandIn()),
            ids,
            mask,
            gen_length=4,
            steps=4,
            block_length=4,
            mask_token_id=1,
            kv_cache="prefix",
        )
