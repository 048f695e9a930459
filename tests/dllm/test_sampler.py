import pytest
import torch

from ee_diffusion.dllm.adapters import MaskedLMAdapter
from ee_diffusion.dllm.rules import SchEDCommit, ThresholdCommit
from ee_diffusion.dllm.sampler import commit_top, even_split, fill_after_eos, generate

from .conftest import ForwardCounter, TargetModel

MASK, EOS = 1, 2


def llada_reference(model, prompt, steps, gen_length, block_length, temperature=0.0, cfg_scale=0.0, generator=None):
    """LLaDA's published decoding loop for one prompt, written out plainly (Gumbel noise in LLaDA's own form,
    `exp(logits) / (-log u) ** temperature`), as the reference the sampler must match."""
    x = torch.full((1, prompt.shape[1] + gen_length), MASK, dtype=torch.long)
    x[:, : prompt.shape[1]] = prompt
    prompt_index = x != MASK
    num_blocks = gen_length // block_length
    steps_per_block = steps // num_blocks
    for block in range(num_blocks):
        start = prompt.shape[1] + block * block_length
        end = start + block_length
        masked_in_block = int((x[:, start:end] == MASK).sum())
        counts = [masked_in_block // steps_per_block + (i < masked_in_block % steps_per_block) for i in range(steps_per_block)]
        for i in range(steps_per_block):
            mask_index = x == MASK
            if cfg_scale > 0:
                unconditional = x.clone()
                unconditional[prompt_index] = MASK
                both = model(torch.cat([x, unconditional])).logits
                logits = both[1:] + (cfg_scale + 1) * (both[:1] - both[1:])
            else:
                logits = model(x).logits
            if temperature > 0:
                noise = torch.rand(logits.shape, generator=generator, dtype=torch.float64)
                noisy = logits.double().exp() / (-torch.log(noise)) ** temperature
            else:
                noisy = logits
            x0 = noisy.argmax(-1)
            x0_p = torch.softmax(logits.float(), -1).gather(-1, x0[..., None]).squeeze(-1)
            x0_p[:, end:] = -float("inf")
            x0 = torch.where(mask_index, x0, x)
            confidence = torch.where(mask_index, x0_p, -float("inf"))
            _, index = torch.topk(confidence[0], k=counts[i])
            x[0, index] = x0[0, index]
    return x[:, prompt.shape[1] :]


@pytest.mark.parametrize(
    "steps, block_length, temperature, cfg_scale",
    [(8, 8, 0.0, 0.0), (8, 4, 0.0, 0.0), (4, 4, 0.0, 0.0), (8, 4, 0.8, 0.0), (8, 2, 0.0, 0.7)],
)
def test_full_decoding_equals_the_llada_reference(tiny_bert, tokenizer, steps, block_length, temperature, cfg_scale):
    prompt = tokenizer("12+345=", return_tensors="pt")["input_ids"]
    out = generate(
        MaskedLMAdapter(tiny_bert, MASK), prompt, gen_length=8, steps=steps, block_length=block_length,
        mask_token_id=MASK, temperature=temperature, cfg_scale=cfg_scale, generator=torch.Generator().manual_seed(3),
    )  # fmt: skip
    expected = llada_reference(tiny_bert, prompt, steps, 8, block_length, temperature, cfg_scale, torch.Generator().manual_seed(3))
    assert torch.equal(out.sequences, expected)
    assert out.nfe.tolist() == [steps * (2 if cfg_scale else 1)]


def second_row_at_first_step(logits, positions, progress):
    """A rule that fires for the second of three rows at the first step, and never again."""
    return torch.arange(len(logits)) == 1 if len(logits) == 3 else torch.zeros(len(logits), dtype=torch.bool)


def test_nfe_is_counted_per_sample_and_matches_an_independent_count(tiny_bert, tokenizer):
    encoded = tokenizer(["1+2=", "sort:3121=", "9+9="], return_tensors="pt", padding=True)
    counter = ForwardCounter(tiny_bert)
    out = generate(MaskedLMAdapter(tiny_bert, MASK), encoded["input_ids"], encoded["attention_mask"], gen_length=8,
                   steps=8, block_length=8, mask_token_id=MASK, early_commit=second_row_at_first_step)  # fmt: skip
    assert out.nfe.tolist() == [8, 1, 8]
    assert counter.rows == int(out.nfe.sum()) and counter.calls == 8
    assert (out.sequences != MASK).all()


def test_early_commit_reduces_nfe_and_keeps_a_settled_answer():
    target = [5, 6, 7, 8, 9, 5, 6, 7]
    model = TargetModel(target, vocab_size=12, margin=10.0)
    prompt = torch.tensor([[5, 6, 7]])
    full = generate(MaskedLMAdapter(model, MASK), prompt, gen_length=8, steps=8, block_length=4, mask_token_id=MASK)
    early = generate(MaskedLMAdapter(model, MASK), prompt, gen_length=8, steps=8, block_length=4, mask_token_id=MASK,
                     early_commit=SchEDCommit(tau_high=9.0, tau_low=2.5))  # fmt: skip
    assert full.sequences.tolist() == early.sequences.tolist() == [target]
    assert full.nfe.tolist() == [8] and early.nfe.tolist() == [1]


def test_early_commit_waits_until_the_margin_reaches_tau():
    model = TargetModel([5] * 8, vocab_size=12, margin=6.0)
    out = generate(MaskedLMAdapter(model, MASK), torch.tensor([[5]]), gen_length=8, steps=8, block_length=8,
                   mask_token_id=MASK, early_commit=SchEDCommit(tau_high=8.0, tau_low=0.0))  # fmt: skip
    # tau(p) = 8 - 8p falls to 6.0 at p = 0.25: the second step of eight.
    assert out.nfe.tolist() == [2]


def test_threshold_rule_commits_confident_tokens_in_parallel():
    margins = torch.tensor([10.0, 10.0, 10.0, 0.1, 0.1, 0.1, 0.1, 0.1])
    model = TargetModel([5, 6, 7, 8, 9, 5, 6, 7], vocab_size=12, margin=margins)
    out = generate(MaskedLMAdapter(model, MASK), torch.tensor([[5]]), gen_length=8, steps=8, block_length=8,
                   mask_token_id=MASK, parallel=ThresholdCommit(0.9))  # fmt: skip
    assert out.nfe.tolist() == [6]  # the three confident positions in the first step, then one per step
    assert out.sequences.tolist() == [[5, 6, 7, 8, 9, 5, 6, 7]]


def test_left_padded_batch_decodes_like_single_prompts(tiny_bert, tokenizer):
    prompts = ["1+2=", "sort:93121=", "77+8="]
    adapter = MaskedLMAdapter(tiny_bert, MASK)
    encoded = tokenizer(prompts, return_tensors="pt", padding=True)
    assert (encoded["attention_mask"] == 0).any()
    batched = generate(adapter, encoded["input_ids"], encoded["attention_mask"], gen_length=8, steps=8,
                       block_length=4, mask_token_id=MASK)  # fmt: skip
    for row, prompt in enumerate(prompts):
        single = generate(adapter, tokenizer(prompt, return_tensors="pt")["input_ids"], gen_length=8, steps=8,
                          block_length=4, mask_token_id=MASK)  # fmt: skip
        assert torch.equal(batched.sequences[row], single.sequences[0])


def test_eos_finishes_a_row_and_fills_the_rest():
    model = TargetModel([5, 6, EOS, 7, 7, 7, 7, 7], vocab_size=12, margin=torch.tensor([9.0, 8.0, 7.0] + [0.5] * 5))
    out = generate(MaskedLMAdapter(model, MASK), torch.tensor([[5]]), gen_length=8, steps=8, block_length=8,
                   mask_token_id=MASK, eos_token_id=EOS)  # fmt: skip
    assert out.sequences.tolist() == [[5, 6, EOS, EOS, EOS, EOS, EOS, EOS]]
    assert out.nfe.tolist() == [3]


def test_helpers():
    assert even_split(torch.tensor([8, 5, 0]), 3).tolist() == [[3, 3, 2], [2, 2, 1], [0, 0, 0]]
    confidence = torch.tensor([[0.1, 0.9, 0.5, 0.7]])
    picked = commit_top(confidence, torch.tensor([[True, False, True, True]]), torch.tensor([2]))
    assert picked.tolist() == [[False, False, True, True]]
    answer = torch.tensor([[5, EOS, MASK, MASK], [MASK, EOS, MASK, 5]])
    assert fill_after_eos(answer, MASK, EOS).tolist() == [[5, EOS, EOS, EOS], [MASK, EOS, MASK, 5]]


def test_bad_lengths_raise(tiny_bert):
    adapter = MaskedLMAdapter(tiny_bert, MASK)
    with pytest.raises(ValueError, match="multiple of `block_length`"):
        generate(adapter, torch.tensor([[5]]), gen_length=8, steps=8, block_length=3, mask_token_id=MASK)
    with pytest.raises(ValueError, match="number of blocks"):
        generate(adapter, torch.tensor([[5]]), gen_length=8, steps=3, block_length=4, mask_token_id=MASK)
    with pytest.raises(ValueError, match="remasking"):
        generate(adapter, torch.tensor([[5]]), gen_length=8, steps=8, block_length=8, mask_token_id=MASK, remasking="x")
