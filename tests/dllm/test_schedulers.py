from types import SimpleNamespace

import pytest
import torch
from diffusers import BlockRefinementScheduler, LLaDA2Pipeline

from ee_diffusion import ProphetScheduler, SchEDScheduler

from .conftest import ForwardCounter, LLaDA2StandIn


class KnowsTheAnswer(torch.nn.Module):
    """LLaDA2's calling convention; at absolute position i it favours token `5 + i % 5` by `margin` logits, except
    where the attention mask hides the position (the block positions past the end of the answer): no preference."""

    def __init__(self, vocab_size: int, margin: float = 10.0) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.margin = torch.nn.Parameter(torch.tensor(margin))  # a parameter, so the pipeline finds its device
        self.config = SimpleNamespace(model_type="llada2_moe")

    @property
    def device(self) -> torch.device:
        return self.margin.device

    def forward(self, input_ids, attention_mask=None, position_ids=None):
        assert attention_mask is not None and position_ids is not None
        batch, length = input_ids.shape
        logits = torch.zeros(batch, length, self.vocab_size)
        logits[:, torch.arange(length), 5 + torch.arange(length) % 5] = self.margin.detach()
        return SimpleNamespace(logits=logits * attention_mask[..., None])


def run(model, scheduler, tokenizer, **kwargs):
    pipe = LLaDA2Pipeline(model=model, scheduler=scheduler, tokenizer=tokenizer)
    pipe.set_progress_bar_config(disable=True)
    settings = dict(
        gen_length=8,
        block_length=4,
        num_inference_steps=4,
        threshold=1.0,
        editing_threshold=None,
        sampling_method="greedy",
        output_type="seq",
    )
    # prompts of 8 tokens: with blocks of 4 the answer is exactly two blocks
    return pipe(prompt=["12+3456=", "sort:41="], **{**settings, **kwargs}).sequences


@pytest.mark.parametrize("scheduler", [SchEDScheduler(tau_high=9.0, tau_low=2.5), ProphetScheduler()])
def test_scheduler_commits_the_rest_of_the_block_when_the_rule_fires(tokenizer, scheduler):
    model = KnowsTheAnswer(len(tokenizer))
    counter = ForwardCounter(model)
    plain = run(model, BlockRefinementScheduler(), tokenizer)
    assert counter.calls == 2 * 4  # two blocks, four steps each
    counter.calls = 0
    early = run(model, scheduler, tokenizer)
    assert counter.calls == 2  # the rule fires at the first step of each block, which then ends
    assert torch.equal(early, plain) and not (early == tokenizer.mask_token_id).any()


@pytest.mark.parametrize("scheduler_class", [SchEDScheduler, ProphetScheduler])
def test_rule_sees_only_real_answer_positions_when_the_last_block_is_padded(tokenizer, scheduler_class):
    # prompt 8 + gen_length 6 with blocks of 4: the pipeline pads the last block with 2 positions past the answer
    model = KnowsTheAnswer(len(tokenizer))
    counter = ForwardCounter(model)
    # the rule fires at a gap of 9 (the answer's positions have 10, the padded ones 0)
    rule = {"tau_high": 9.0, "tau_low": 9.0} if scheduler_class is SchEDScheduler else {"prophet_thresholds": [9] * 3}
    settings = dict(gen_length=6, threshold=1.0)
    early = run(model, scheduler_class(gen_length=6, **rule), tokenizer, **settings)
    assert counter.calls == 2  # the rule fires at the first step of both blocks
    assert early.shape == (2, 6) and torch.equal(early, run(model, BlockRefinementScheduler(), tokenizer, **settings))
    counter.calls = 0
    run(model, scheduler_class(**rule), tokenizer, **settings)
    assert counter.calls == 1 + 4  # without `gen_length` the padded positions' gap of 0 keeps the last block going
    with pytest.raises(ValueError, match=r"gen_length=4\) got a block past the end of a 4-token answer"):
        run(model, scheduler_class(gen_length=4, **rule), tokenizer, **settings)


def test_scheduler_that_never_fires_decodes_like_the_block_refinement_scheduler(tokenizer):
    torch.manual_seed(0)
    model = LLaDA2StandIn(vocab_size=len(tokenizer))
    never = SchEDScheduler(tau_high=1e9, tau_low=1e9)
    for kwargs in ({}, {"threshold": 0.0}):  # one token per step; or whole blocks at their first step
        assert torch.equal(
            run(model, never, tokenizer, **kwargs), run(model, BlockRefinementScheduler(), tokenizer, **kwargs)
        )
    # Sampling too, from the same generator. (What the draws are depends on torch's random streams, which change
    # between releases; on some a row draws EOS first and diffusers' pipeline stops it there, masks left behind.)
    sampled = {
        name: run(
            model,
            scheduler,
            tokenizer,
            sampling_method="multinomial",
            temperature=1.0,
            generator=torch.Generator().manual_seed(0),
        )
        for name, scheduler in (("never", never), ("stock", BlockRefinementScheduler()))
    }
    assert torch.equal(sampled["never"], sampled["stock"])


def test_step_keeps_the_block_refinement_contract():
    scheduler = SchEDScheduler(tau_high=0.0, tau_low=0.0)
    scheduler.set_timesteps(4, block_length=4)
    logits = torch.randn(2, 4, 10)
    sample = torch.tensor([[1, 1, 7, 1], [3, 1, 1, 1]])
    out = scheduler.step(logits, 0, sample, mask_token_id=1, threshold=1.0)
    assert out.transfer_index.tolist() == (sample == 1).tolist()  # everything masked is committed at once
    assert torch.equal(out.prev_sample, torch.where(sample == 1, logits.argmax(-1), sample))
    as_tuple = scheduler.step(logits, 0, sample, mask_token_id=1, threshold=1.0, return_dict=False)
    assert len(as_tuple) == 6 and torch.equal(as_tuple[0], out.prev_sample)


def test_from_config_swaps_into_a_pipeline_config(tmp_path):
    base = BlockRefinementScheduler(block_length=16, num_inference_steps=16, threshold=0.8)
    sched = SchEDScheduler.from_config(base.config, shape="exp", k=8.0)
    assert (sched.config.block_length, sched.config.threshold, sched.config.shape, sched.config.k) == (
        16,
        0.8,
        "exp",
        8.0,
    )
    sched.save_pretrained(tmp_path)
    assert SchEDScheduler.from_pretrained(tmp_path).config.k == 8.0
    assert ProphetScheduler()._rule.thresholds == (7.5, 5.0, 2.5)  # the released code's, as ProphetCommit's
    prophet = ProphetScheduler.from_config(base.config, prophet_thresholds=[8.0, 5.0, 3.5], gen_length=6)
    assert prophet._rule.thresholds == (8.0, 5.0, 3.5) and prophet.config.gen_length == 6
    with pytest.raises(ValueError, match="shape"):
        SchEDScheduler(shape="square")
    with pytest.raises(ValueError, match=r"`gen_length` must be an integer >= 1, got 0"):
        SchEDScheduler(gen_length=0)
