"""The drop-in DiT and PixArt-alpha pipelines with DeeDiff's `exit_heads` component."""

import pytest
import torch
from diffusers import DPMSolverMultistepScheduler

from ee_diffusion import EarlyExitDiTPipeline, ExitSchedule, UncertaintyExitStats, load_early_exit_pipeline
from ee_diffusion.exits import ExitHeads
from tests.conftest import make_tiny_dit
from tests.exits.test_uncertainty import RowsPerBlock
from tests.pipelines.conftest import NUM_PIXART_BLOCKS, make_pixart_pipe, pixart_inputs


def random_heads(num_blocks: int, threshold: float, policy: str = "per_sample") -> ExitHeads:
    torch.manual_seed(0)
    heads = ExitHeads(num_blocks=num_blocks, hidden_size=16, threshold=threshold, policy=policy)
    for parameter in heads.parameters():
        torch.nn.init.normal_(parameter, std=0.2)
    return heads


def dit_pipe(**kwargs) -> EarlyExitDiTPipeline:
    pipe = EarlyExitDiTPipeline(
        transformer=make_tiny_dit(4), vae=None, scheduler=DPMSolverMultistepScheduler(), **kwargs
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sample(pipe, guidance=2.0):
    return pipe(
        class_labels=[1, 2, 3],
        guidance_scale=guidance,
        num_inference_steps=3,
        output_type="pt",
        generator=torch.Generator().manual_seed(0),
    ).images


def test_dit_pipeline_with_heads_pairs_guidance_halves_and_goes_back_to_the_full_model(tmp_path):
    pipe = dit_pipe()
    full = sample(pipe)
    pipe.exit_heads = random_heads(4, threshold=0.5)
    counter = RowsPerBlock(pipe.transformer)
    exited = sample(pipe)
    stats = pipe.exit_stats
    assert isinstance(stats, UncertaintyExitStats) and len(stats.calls) == 3
    assert all(call.depths[:3] == call.depths[3:] for call in stats.calls)  # guidance pairs leave together
    assert sum(counter.rows) == sum(sum(call.depths) for call in stats.calls) < 3 * 6 * 4
    assert not torch.equal(exited, full)
    pipe.exit_heads = None
    assert torch.equal(sample(pipe), full) and pipe.exit_stats is None


def test_heads_save_and_load_with_the_pipeline(tmp_path):
    pipe = dit_pipe(exit_heads=random_heads(4, threshold=0.5))
    images = sample(pipe)
    pipe.save_pretrained(tmp_path / "pipe")
    loaded = load_early_exit_pipeline(str(tmp_path / "pipe"))
    loaded.set_progress_bar_config(disable=True)
    assert isinstance(loaded.exit_heads, ExitHeads) and loaded.exit_heads.config.threshold == 0.5
    torch.testing.assert_close(sample(loaded), images, rtol=0, atol=1e-5)
    assert "exit_heads" not in dit_pipe().components and "exit_heads" in pipe.components


def test_a_schedule_and_heads_together_are_refused():
    with pytest.raises(ValueError, match="got both `exit_schedule` and `exit_heads`"):
        dit_pipe(exit_schedule=ExitSchedule.linear(4, 2), exit_heads=random_heads(4, 0.5))
    pipe = dit_pipe(exit_heads=random_heads(4, 0.5))
    with pytest.raises(ValueError, match="got both"):  # refused at the assignment, which is undone
        pipe.exit_schedule = ExitSchedule.linear(4, 2)
    assert pipe.exit_schedule is None and pipe.exit_heads is not None
    sample(pipe)
    with pytest.raises(TypeError, match="`exit_heads` must be an ExitHeads or None"):
        pipe.exit_heads = "heads"


def test_pixart_pipeline_with_heads_runs_fewer_blocks():
    pipe = make_pixart_pipe()
    pipe.exit_heads = random_heads(NUM_PIXART_BLOCKS, threshold=1.0)  # every sample leaves at the first head
    counter = RowsPerBlock(pipe.transformer)
    pipe(
        **pixart_inputs(),
        num_inference_steps=2,
        guidance_scale=4.5,
        output_type="latent",
        generator=torch.Generator().manual_seed(0),
    )
    # the first step of the run runs every block (nothing is known yet under the default `previous_step` decision),
    # the second leaves at the first head: a guided batch of 2 each time
    assert counter.rows == [2 * 2] + [2] * (NUM_PIXART_BLOCKS - 1)
    assert [call.depths for call in pipe.exit_stats.calls] == [(NUM_PIXART_BLOCKS,) * 2, (1, 1)]
