from types import SimpleNamespace

import pytest
import torch

from ee_diffusion.dllm.adapters import MaskedLMAdapter
from ee_diffusion.dllm.rules import ProphetCommit, SchEDCommit, ThresholdCommit
from ee_diffusion.dllm.sampler import commit_top, even_split, fill_after_eos, generate

from .conftest import ForwardCounter, TargetModel

MASK, EOS = 1, 2
EOT = 3  # stands in for LLaDA's end-of-turn token


def llada_reference(
    model,
    prompt,
    steps,
    gen_length,
    block_length,
    temperature=0.0,
    cfg_scale=0.0,
    generator=None,
    confidence_dtype=None,
    logits_inf_ids=(),
    confidence_inf_ids=(),
):
    """LLaDA's released `generate()` (github ML-GSAI/LLaDA, generate.py) for a batch of unpadded prompts, written out
    plainly as the reference the sampler must match step for step. As there: Gumbel noise in LLaDA's own form
    (`exp(logits) / (-log u) ** temperature`), the confidence softmax in the logits' dtype (or in `confidence_dtype`,
    the sampler's option), and per row `torch.topk` with the row's count over the whole sequence, -inf outside the
    block's masked positions. `logits_inf_ids` get -inf logits before the argmax (its `logits_eos_inf`),
    `confidence_inf_ids` after it, in the logits the softmax reads (its `confidence_eos_eot_inf` at temperature 0).

    Returns the answers and how many steps cut through a tie (the last picked and the first left-out confidence of a
    row equal and finite), so a test can show that it covers ties.
    """
    batch, prompt_length = prompt.shape
    x = torch.full((batch, prompt_length + gen_length), MASK, dtype=torch.long)
    x[:, :prompt_length] = prompt
    prompt_index = x != MASK
    num_blocks = gen_length // block_length
    steps_per_block = steps // num_blocks
    tied_cuts = 0
    for block in range(num_blocks):
        start = prompt_length + block * block_length
        end = start + block_length
        masked_in_block = (x[:, start:end] == MASK).sum(-1).tolist()
        counts = [
            [m // steps_per_block + (i < m % steps_per_block) for i in range(steps_per_block)] for m in masked_in_block
        ]
        for i in range(steps_per_block):
            mask_index = x == MASK
            if cfg_scale > 0:
                unconditional = x.clone()
                unconditional[prompt_index] = MASK
                conditional_logits, unconditional_logits = model(torch.cat([x, unconditional])).logits.chunk(2)
                logits = unconditional_logits + (cfg_scale + 1) * (conditional_logits - unconditional_logits)
            else:
                logits = model(x).logits
            if logits_inf_ids:
                logits[:, :, list(logits_inf_ids)] = -float("inf")
            if temperature > 0:
                noise = torch.rand(logits.shape, generator=generator, dtype=torch.float64)
                noisy = logits.double().exp() / (-torch.log(noise)) ** temperature
            else:
                noisy = logits
            x0 = noisy.argmax(-1)
            if confidence_inf_ids:
                logits[:, :, list(confidence_inf_ids)] = -float("inf")
            probs = torch.softmax(logits if confidence_dtype is None else logits.to(confidence_dtype), -1)
            x0_p = probs.gather(-1, x0[..., None]).squeeze(-1)
            x0_p[:, end:] = -float("inf")
            x0 = torch.where(mask_index, x0, x)
            confidence = torch.where(mask_index, x0_p, -float("inf"))
            for row in range(batch):
                k = counts[row][i]
                _, index = torch.topk(confidence[row], k=k)
                x[row, index] = x0[row, index]
                ranked = confidence[row].sort(descending=True).values
                tied_cuts += int(0 < k < len(ranked) and ranked[k] == ranked[k - 1] > -float("inf"))
    return x[:, prompt_length:], tied_cuts


class NearTies(torch.nn.Module):
    """A bf16 denoiser sure of itself to within bf16's resolution near 1, whose predictions depend on the whole input
    (so another pick changes what follows). With `s` the sum of a row's input ids, position `i` favours token
    `2 + (s + i) % 12` (EOS is 2) with logit `9 + ((s + 3 i) % 7) / 2`, and token `4 + (s + 2 i) % 10` comes next
    with logit 2: top probabilities from 0.993 to 0.9997, which bf16 rounds onto a few values."""

    config = SimpleNamespace(model_type="toy")

    def forward(self, input_ids, attention_mask=None):
        s = input_ids.sum(-1, keepdim=True)
        i = torch.arange(input_ids.shape[1])
        logits = torch.zeros(*input_ids.shape, 48, dtype=torch.bfloat16)
        logits.scatter_(-1, (4 + (s + 2 * i) % 10)[..., None], 2.0)
        logits.scatter_(-1, (2 + (s + i) % 12)[..., None], (9 + ((s + 3 * i) % 7) / 2)[..., None].to(logits.dtype))
        return SimpleNamespace(logits=logits)


def decode_both(model, prompts, steps, block_length, gen_length=8, **options):
    """The sampler's and the reference's decoding of `prompts`, and the denoiser inputs of each (the trajectories)."""
    counter = ForwardCounter(model)
    out = generate(
        MaskedLMAdapter(model, MASK),
        prompts,
        gen_length=gen_length,
        steps=steps,
        block_length=block_length,
        mask_token_id=MASK,
        **options,
    )
    sampler_inputs, counter.inputs = counter.inputs, []
    dtype = options.get("confidence_dtype")
    reference, tied_cuts = llada_reference(
        model,
        prompts,
        steps,
        gen_length,
        block_length,
        confidence_dtype=getattr(torch, dtype) if dtype else None,
        logits_inf_ids=options.get("logits_inf_ids", ()),
        confidence_inf_ids=options.get("confidence_inf_ids", ()),
    )
    return out, sampler_inputs, reference, counter.inputs, tied_cuts


@pytest.mark.parametrize(
    "steps, block_length, temperature, cfg_scale",
    [(8, 8, 0.0, 0.0), (8, 4, 0.0, 0.0), (4, 4, 0.0, 0.0), (8, 4, 0.8, 0.0), (8, 2, 0.0, 0.7)],
)
def test_full_decoding_equals_the_llada_reference(tiny_bert, tokenizer, steps, block_length, temperature, cfg_scale):
    prompt = tokenizer("12+345=", return_tensors="pt")["input_ids"]
    out = generate(
        MaskedLMAdapter(tiny_bert, MASK),
        prompt,
        gen_length=8,
        steps=steps,
        block_length=block_length,
        mask_token_id=MASK,
        temperature=temperature,
        cfg_scale=cfg_scale,
        generator=torch.Generator().manual_seed(3),
    )
    expected, _ = llada_reference(
        tiny_bert, prompt, steps, 8, block_length, temperature, cfg_scale, torch.Generator().manual_seed(3)
    )
    assert torch.equal(out.sequences, expected)
    assert out.nfe.tolist() == [steps * (2 if cfg_scale else 1)]


PROMPTS = ["12+345=", "sort:93", "77+8899", "9*9*9=1"]  # seven tokens each: a batch without padding


@pytest.mark.parametrize("steps, block_length", [(8, 8), (4, 4), (8, 2), (8, 4)])
def test_bf16_decoding_follows_the_llada_reference_step_for_step(tokenizer, steps, block_length):
    # bf16 logits, confidences taken in bf16 as LLaDA does: many exact ties near 1, broken as torch.topk breaks them
    prompts = tokenizer(PROMPTS, return_tensors="pt")["input_ids"]
    out, inputs, reference, reference_inputs, tied_cuts = decode_both(NearTies(), prompts, steps, block_length)
    assert tied_cuts > 0  # the case covers ties where the step's cut falls
    assert len(inputs) == len(reference_inputs) == steps
    for step, (ours, theirs) in enumerate(zip(inputs, reference_inputs)):
        assert torch.equal(ours, theirs), f"the denoiser saw different tokens at step {step}"
    assert torch.equal(out.sequences, reference)


def test_float32_confidences_are_an_option(tokenizer):
    prompts = tokenizer(PROMPTS, return_tensors="pt")["input_ids"]
    out, inputs, reference, reference_inputs, _ = decode_both(NearTies(), prompts, 8, 8, confidence_dtype="float32")
    assert all(map(torch.equal, inputs, reference_inputs)) and torch.equal(out.sequences, reference)
    _, bf16_inputs, *_ = decode_both(NearTies(), prompts, 8, 8)
    assert not all(map(torch.equal, inputs, bf16_inputs))  # the option changes the trajectory


@pytest.mark.parametrize(
    "options",
    [
        {"logits_inf_ids": (EOS,)},  # LLaDA's logits_eos_inf
        {"confidence_inf_ids": (EOS, EOT)},  # its confidence_eos_eot_inf
        {"logits_inf_ids": [EOS], "confidence_inf_ids": [EOS, EOT]},  # both
    ],
)
@pytest.mark.parametrize("steps, block_length", [(8, 4), (8, 2)])
def test_llada_eos_options_follow_the_llada_reference(tokenizer, options, steps, block_length):
    prompts = tokenizer(PROMPTS, return_tensors="pt")["input_ids"]
    out, inputs, reference, reference_inputs, _ = decode_both(NearTies(), prompts, steps, block_length, **options)
    assert all(map(torch.equal, inputs, reference_inputs)) and torch.equal(out.sequences, reference)
    plain, plain_inputs, *_ = decode_both(NearTies(), prompts, steps, block_length)
    assert (plain.sequences == EOS).any()  # the model does predict EOS here
    if "logits_inf_ids" in options:
        assert not (out.sequences == EOS).any()
    else:  # EOS and EoT may still be predicted, but are committed last: another trajectory
        assert not all(map(torch.equal, inputs, plain_inputs))


def second_row_at_first_step(logits, positions, progress):
    """A rule that fires for the second of three rows at the first step, and never again."""
    return torch.arange(len(logits)) == 1 if len(logits) == 3 else torch.zeros(len(logits), dtype=torch.bool)


def test_nfe_is_counted_per_sample_and_matches_an_independent_count(tiny_bert, tokenizer):
    encoded = tokenizer(["1+2=", "sort:3121=", "9+9="], return_tensors="pt", padding=True)
    counter = ForwardCounter(tiny_bert)
    out = generate(
        MaskedLMAdapter(tiny_bert, MASK),
        encoded["input_ids"],
        encoded["attention_mask"],
        gen_length=8,
        steps=8,
        block_length=8,
        mask_token_id=MASK,
        early_commit=second_row_at_first_step,
    )
    assert out.nfe.tolist() == [8, 1, 8]
    assert counter.rows == int(out.nfe.sum()) and counter.calls == 8
    assert (out.sequences != MASK).all()


def test_early_commit_reduces_nfe_and_keeps_a_settled_answer():
    target = [5, 6, 7, 8, 9, 5, 6, 7]
    model = TargetModel(target, vocab_size=12, margin=10.0)
    prompt = torch.tensor([[5, 6, 7]])
    full = generate(MaskedLMAdapter(model, MASK), prompt, gen_length=8, steps=8, block_length=4, mask_token_id=MASK)
    early = generate(
        MaskedLMAdapter(model, MASK),
        prompt,
        gen_length=8,
        steps=8,
        block_length=4,
        mask_token_id=MASK,
        early_commit=SchEDCommit(tau_high=9.0, tau_low=2.5),
    )
    assert full.sequences.tolist() == early.sequences.tolist() == [target]
    assert full.nfe.tolist() == [8] and early.nfe.tolist() == [1]


def test_early_commit_waits_until_the_margin_reaches_tau():
    model = TargetModel([5] * 8, vocab_size=12, margin=6.0)
    out = generate(
        MaskedLMAdapter(model, MASK),
        torch.tensor([[5]]),
        gen_length=8,
        steps=8,
        block_length=8,
        mask_token_id=MASK,
        early_commit=SchEDCommit(tau_high=8.0, tau_low=0.0),
    )
    # tau(p) = 8 - 8p falls to 6.0 at p = 0.25: the second step of eight.
    assert out.nfe.tolist() == [2]


def test_prophet_with_a_marker_waits_until_the_sampler_has_committed_it():
    # the answer "+-" (the marker) then three sure tokens, then five unsure ones
    margins = torch.tensor([10.0, 10.0, 9.0, 9.0, 9.0, 0.5, 0.5, 0.5])
    model = TargetModel([41, 42, 5, 6, 7, 8, 9, 5], vocab_size=48, margin=margins)
    decode = dict(gen_length=8, steps=8, block_length=8, mask_token_id=MASK)
    marker = generate(
        MaskedLMAdapter(model, MASK),
        torch.tensor([[5]]),
        **decode,
        early_commit=ProphetCommit(marker=[41, 42], window=3),
    )
    # the marker's two tokens are committed at steps 1 and 2; step 3 sees them and the window after them fires
    assert marker.nfe.tolist() == [3]
    assert marker.sequences.tolist() == [[41, 42, 5, 6, 7, 8, 9, 5]]
    offset = generate(
        MaskedLMAdapter(model, MASK),
        torch.tensor([[5]]),
        **decode,
        early_commit=ProphetCommit(answer_start=2, window=3),
    )
    assert offset.nfe.tolist() == [1]  # a fixed offset does not wait for the marker


def test_threshold_rule_commits_confident_tokens_in_parallel():
    margins = torch.tensor([10.0, 10.0, 10.0, 0.1, 0.1, 0.1, 0.1, 0.1])
    model = TargetModel([5, 6, 7, 8, 9, 5, 6, 7], vocab_size=12, margin=margins)
    out = generate(
        MaskedLMAdapter(model, MASK),
        torch.tensor([[5]]),
        gen_length=8,
        steps=8,
        block_length=8,
        mask_token_id=MASK,
        parallel=ThresholdCommit(0.9),
    )
    assert out.nfe.tolist() == [6]  # the three confident positions in the first step, then one per step
    assert out.sequences.tolist() == [[5, 6, 7, 8, 9, 5, 6, 7]]


def test_left_padded_batch_decodes_like_single_prompts(tiny_bert, tokenizer):
    prompts = ["1+2=", "sort:93121=", "77+8="]
    adapter = MaskedLMAdapter(tiny_bert, MASK)
    encoded = tokenizer(prompts, return_tensors="pt", padding=True)
    assert (encoded["attention_mask"] == 0).any()
    batched = generate(
        adapter,
        encoded["input_ids"],
        encoded["attention_mask"],
        gen_length=8,
        steps=8,
        block_length=4,
        mask_token_id=MASK,
    )
    for row, prompt in enumerate(prompts):
        single = generate(
            adapter,
            tokenizer(prompt, return_tensors="pt")["input_ids"],
            gen_length=8,
            steps=8,
            block_length=4,
            mask_token_id=MASK,
        )
        assert torch.equal(batched.sequences[row], single.sequences[0])


def test_eos_finishes_a_row_and_fills_the_rest():
    model = TargetModel([5, 6, EOS, 7, 7, 7, 7, 7], vocab_size=12, margin=torch.tensor([9.0, 8.0, 7.0] + [0.5] * 5))
    out = generate(
        MaskedLMAdapter(model, MASK),
        torch.tensor([[5]]),
        gen_length=8,
        steps=8,
        block_length=8,
        mask_token_id=MASK,
        eos_token_id=EOS,
    )
    assert out.sequences.tolist() == [[5, 6, EOS, EOS, EOS, EOS, EOS, EOS]]
    assert out.nfe.tolist() == [3]


def test_helpers():
    assert even_split(torch.tensor([8, 5, 0]), 3).tolist() == [[3, 3, 2], [2, 2, 1], [0, 0, 0]]
    confidence = torch.tensor([[0.1, 0.9, 0.5, 0.7]])
    picked = commit_top(confidence, torch.tensor([[True, False, True, True]]), torch.tensor([2]))
    assert picked.tolist() == [[False, False, True, True]]
    answer = torch.tensor([[5, EOS, MASK, MASK], [MASK, EOS, MASK, 5]])
    assert fill_after_eos(answer, MASK, EOS).tolist() == [[5, EOS, EOS, EOS], [MASK, EOS, MASK, 5]]


def test_commit_top_picks_per_row_as_torch_topk_does_on_that_row():
    # tied bf16 confidences; rows with different counts (0 included) and a candidate set smaller than its count
    confidence = (torch.randint(0, 3, (5, 16), generator=torch.Generator().manual_seed(0)) / 4).to(torch.bfloat16)
    candidates = torch.rand(5, 16, generator=torch.Generator().manual_seed(1)) < 0.7
    candidates[4, 3:] = False
    count = torch.tensor([3, 0, 1, 3, 5])
    picked = commit_top(confidence, candidates, count)
    for row in range(5):
        ranked = confidence[row].masked_fill(~candidates[row], float("-inf"))
        expected = torch.zeros(16, dtype=torch.bool)
        expected[torch.topk(ranked, k=int(count[row])).indices] = True
        assert picked[row].tolist() == (expected & candidates[row]).tolist()
    assert picked.sum(-1).tolist() == [3, 0, 1, 3, int(candidates[4].sum())]


def test_bad_lengths_raise(tiny_bert):
    adapter = MaskedLMAdapter(tiny_bert, MASK)
    with pytest.raises(ValueError, match="multiple of `block_length`"):
        generate(adapter, torch.tensor([[5]]), gen_length=8, steps=8, block_length=3, mask_token_id=MASK)
    with pytest.raises(ValueError, match="number of blocks"):
        generate(adapter, torch.tensor([[5]]), gen_length=8, steps=3, block_length=4, mask_token_id=MASK)
    with pytest.raises(ValueError, match="remasking"):
        generate(
            adapter, torch.tensor([[5]]), gen_length=8, steps=8, block_length=8, mask_token_id=MASK, remasking="x"
        )


@pytest.mark.parametrize(
    "options, error, match",
    [
        ({"confidence_dtype": "int8"}, ValueError, r"`confidence_dtype` must be None .* got 'int8'"),
        ({"confidence_dtype": torch.long}, ValueError, r"'float64'\) \(a name or a torch.dtype\), got torch.int64"),
        ({"logits_inf_ids": EOS}, TypeError, r"`logits_inf_ids` must be a sequence of token ids .* got 2"),
        ({"confidence_inf_ids": [EOS, -1]}, ValueError, r"`confidence_inf_ids\[1\]` must be an integer >= 0, got -1"),
        ({"confidence_inf_ids": [2.0]}, TypeError, r"`confidence_inf_ids\[0\]` must be an integer, got 2.0"),
    ],
)
def test_bad_selection_options_raise(tiny_bert, options, error, match):
    with pytest.raises(error, match=match):
        generate(
            MaskedLMAdapter(tiny_bert, MASK),
            torch.tensor([[5]]),
            gen_length=8,
            steps=8,
            block_length=8,
            mask_token_id=MASK,
            **options,
        )


@pytest.mark.parametrize(
    "input_ids, attention_mask, settings, error, match",
    [
        (torch.tensor([5, 6]), None, {}, ValueError, r"`input_ids` must be a \(batch, prompt_length\) integer tensor"),
        (torch.tensor([[5.0, 6.0]]), None, {}, ValueError, r"got shape \(1, 2\) and dtype torch.float32"),
        (torch.tensor([[5, 6]]), torch.tensor([[1, 0]]), {}, ValueError, r"`attention_mask` must pad on the left"),
        (
            torch.tensor([[5, 6]]),
            torch.tensor([[1, 1, 1]]),
            {},
            ValueError,
            r"must have the shape of `input_ids` \(1, 2\)",
        ),
        (
            torch.tensor([[5] * 30]),
            None,
            {},
            ValueError,
            r"The prompt \(30 tokens\) and the answer \(`gen_length` 8\) make 38 positions, more than the model takes "
            r"\(its `max_position_embeddings` is 20\)",
        ),
        (
            torch.tensor([[5]]),
            None,
            {"cache_refresh_every": 2},
            ValueError,
            r"`cache_refresh_every` only applies with",
        ),
        (torch.tensor([[5]]), None, {"gen_length": 8.0}, TypeError, r"`gen_length` must be an integer, got 8.0"),
    ],
)
def test_bad_prompts_and_settings_raise_before_the_first_pass(
    tokenizer, input_ids, attention_mask, settings, error, match
):
    from ee_diffusion.training.mdlm import build_model

    from .conftest import tiny_config

    model = build_model(tokenizer, tiny_config(gen_length=8, max_prompt_length=12)).eval()  # 20 positions
    forwards = ForwardCounter(model)
    with pytest.raises(error, match=match):
        generate(
            MaskedLMAdapter(model, MASK),
            input_ids,
            attention_mask,
            mask_token_id=MASK,
            **{"gen_length": 8, "steps": 8, "block_length": 8, **settings},
        )
    assert forwards.calls == 0
