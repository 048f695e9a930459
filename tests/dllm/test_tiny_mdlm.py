"""Quality of the shipped `tiny-mdlm` (slow: `make test-slow`)."""

import pytest

from ee_diffusion import MaskedDiffusionLMPipeline
from ee_diffusion.dllm.cli_commands import TINY_MDLM
from ee_diffusion.dllm.tasks import exact_match, make_problems


@pytest.mark.slow
@pytest.mark.parametrize("task", ["addition", "sorting"])
def test_shipped_model_solves_fresh_problems_with_full_decoding(task):
    pipe = MaskedDiffusionLMPipeline.from_pretrained(TINY_MDLM)
    problems = make_problems(task, 200, seed=99)
    out = pipe(prompt=[p.prompt for p in problems])
    assert exact_match(problems, out.texts) >= 0.95
    assert (out.nfe <= pipe.config.steps).all()
