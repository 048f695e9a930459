"""Quality of the shipped language models (slow: `make test-slow`): full decoding solves fresh problems of every task
each was trained on, and on `tiny-mdlm-puzzles` committing the whole answer after one pass does not."""

import pytest

from ee_diffusion import MaskedDiffusionLMPipeline, SchEDCommit
from ee_diffusion.dllm.tasks import accuracy, make_problems

TRAINED = [
    ("tiny-mdlm", "addition"),
    ("tiny-mdlm", "sorting"),
    ("tiny-mdlm-puzzles", "permutation"),
    ("tiny-mdlm-puzzles", "digitsum"),
    ("tiny-mdlm-puzzles", "longadd"),
]


@pytest.mark.slow
@pytest.mark.parametrize("model, task", TRAINED)
def test_shipped_model_solves_fresh_problems_with_full_decoding(model, task):
    pipe = MaskedDiffusionLMPipeline.from_pretrained(model)
    problems = make_problems(task, 200, seed=99)
    out = pipe(prompt=[p.prompt for p in problems])
    assert accuracy(problems, out.texts) >= 0.95
    assert (out.nfe <= pipe.config.steps).all()


@pytest.mark.slow
@pytest.mark.parametrize("task", ["permutation", "digitsum", "longadd"])
def test_puzzles_need_more_than_one_pass(task):
    pipe = MaskedDiffusionLMPipeline.from_pretrained("tiny-mdlm-puzzles")
    problems = make_problems(task, 200, seed=99)
    at_once = pipe(prompt=[p.prompt for p in problems], early_commit=SchEDCommit(tau_high=0.0, tau_low=0.0))
    assert (at_once.nfe == 1).all()
    assert accuracy(problems, at_once.texts) < 0.9
