from types import SimpleNamespace

import pytest
import torch

from ee_diffusion.dllm.adapters import (
    DreamAdapter,
    LLaDA2Adapter,
    LLaDAAdapter,
    MaskedLMAdapter,
    get_adapter,
    positions_from_mask,
)
from ee_diffusion.dllm.sampler import generate

from .conftest import DreamStandIn, LLaDA2StandIn, LLaDAStandIn

PADDED = torch.tensor([[0, 0, 7, 8, 9], [4, 5, 6, 7, 8]])
MASK = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])


def test_get_adapter_picks_by_model_type(tiny_bert):
    assert type(get_adapter(LLaDAStandIn())) is LLaDAAdapter
    assert type(get_adapter(DreamStandIn())) is DreamAdapter
    assert type(get_adapter(LLaDA2StandIn())) is LLaDA2Adapter
    assert type(get_adapter(tiny_bert)) is MaskedLMAdapter
    assert get_adapter(LLaDAStandIn()).mask_token_id == 126336
    assert get_adapter(DreamStandIn()).mask_token_id == 151666
    with pytest.raises(ValueError, match="'masked-lm', 'llada', 'dream', 'llada2'"):
        get_adapter(tiny_bert, kind="gpt")


def test_positions_start_at_each_rows_first_real_token():
    assert positions_from_mask(MASK).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]]


@pytest.mark.parametrize("stand_in", [LLaDAStandIn, DreamStandIn, LLaDA2StandIn])
def test_padding_is_hidden_without_making_attention_causal(stand_in):
    adapter = get_adapter(stand_in())
    padded = adapter(PADDED, MASK)
    alone = adapter(PADDED[:1, 2:])
    # the padded row sees exactly what the unpadded prompt sees (no causal mask, padding hidden); Dream has no
    # logits for a row's first position (they would come from the position before it) ...
    torch.testing.assert_close(padded[0, 3:], alone[0, 1:])
    # ... and the first token's logits depend on a later token (bidirectional attention)
    changed = PADDED[:1, 2:].clone()
    changed[0, -1] = 3
    assert not torch.allclose(adapter(changed)[0, 0], alone[0, 0])


def test_dream_logits_are_shifted_back_into_place():
    model = DreamStandIn()
    ids = torch.tensor([[4, 5, 6, 7]])
    raw = model(ids).logits
    aligned = DreamAdapter(model)(ids)
    torch.testing.assert_close(aligned[:, 1:], raw[:, :-1])
    torch.testing.assert_close(aligned[:, 0], raw[:, 0])


def test_llada_never_gets_an_attention_mask_and_decodes_a_padded_batch():
    model = LLaDAStandIn(vocab_size=50)
    adapter = LLaDAAdapter(model, mask_token_id=1)
    out = generate(adapter, PADDED, MASK, gen_length=4, steps=4, block_length=2, mask_token_id=1)
    single = generate(adapter, PADDED[:1, 2:], gen_length=4, steps=4, block_length=2, mask_token_id=1)
    assert torch.equal(out.sequences[0], single.sequences[0])


def test_masked_lm_passes_positions_only_to_models_that_take_them(tiny_bert):
    calls = []

    class NoPositions(torch.nn.Module):
        def forward(self, input_ids, attention_mask=None):
            calls.append(attention_mask)
            return SimpleNamespace(logits=torch.zeros(*input_ids.shape, 3))

    MaskedLMAdapter(NoPositions())(PADDED, MASK)
    MaskedLMAdapter(NoPositions())(PADDED[1:], MASK[1:])
    assert torch.equal(calls[0], MASK) and calls[1] is None
    logits = MaskedLMAdapter(tiny_bert)(PADDED, MASK)
    torch.testing.assert_close(logits[0, 2:], MaskedLMAdapter(tiny_bert)(PADDED[:1, 2:])[0], atol=1e-5, rtol=1e-5)
