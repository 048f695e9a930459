"""`--compile` compiles the denoiser block by block (`compile_blocks`): the same images as eager, and nothing the
methods do around or inside the blocks recompiles a graph.

The image test compiles with the bench's own backend (inductor). The others compile with a backend that runs the graph
dynamo captured as it is and counts the runs (`compile_blocks(pipe, backend=...)`, its documented knob): dynamo's
guards and recompilations are the same whatever the backend, the graph runs count the blocks that really ran,
independently of the bench's counters, and no kernel generation makes the tests slow.
"""

import pytest
import torch
from torch._dynamo.utils import counters

from ee_diffusion import ExitHeads, ExitSchedule
from ee_diffusion.bench.harness import BenchConfig, compile_blocks, load_pipe
from ee_diffusion.bench.methods import Target, build_method
from ee_diffusion.bench.noise_schedulers import build_scheduler
from ee_diffusion.schedules import REUSE

MODEL = "random:dit-tiny"  # 4 blocks


def _pipe(compile: bool = False):
    pipe = load_pipe(MODEL, BenchConfig(model=MODEL, compile=compile), torch.device("cpu"))
    pipe.scheduler = build_scheduler("dpm-solver++", pipe.scheduler.config)
    return pipe


def _generate(pipe, spec="baseline", steps=3):
    """Images and block fraction of one call of the bench's method `spec`, as the bench makes them."""
    method = build_method(spec, Target(MODEL, lambda model: pipe, steps))
    with method.session(pipe) as work:
        images = pipe(
            class_labels=[1, 2, 3],
            guidance_scale=1.0,
            num_inference_steps=steps,
            output_type="pt",
            generator=torch.Generator().manual_seed(0),
        ).images
        return images, work()


class GraphRuns:
    """A `torch.compile` backend that runs each captured graph as it is and counts the runs."""

    def __init__(self) -> None:
        self.runs = 0

    def __call__(self, graph: torch.fx.GraphModule, example_inputs: list) -> object:
        def run(*args):
            self.runs += 1
            return graph.forward(*args)

        return run


@pytest.fixture
def no_recompile():
    """Inside: a recompilation is an error; outside, dynamo starts afresh."""
    torch._dynamo.reset()
    counters.clear()
    yield torch._dynamo.config.patch(error_on_recompile=True)
    torch._dynamo.reset()


@pytest.mark.timeout(180)
def test_compiled_blocks_make_the_eager_images(no_recompile):
    eager, compiled = _pipe(), _pipe(compile=True)
    expected, _ = _generate(eager)
    images, _ = _generate(compiled)  # compiles the blocks (two graphs: the first block's input has other strides)
    torch.testing.assert_close(images, expected, atol=1e-4, rtol=0)  # float32, inductor against eager
    with no_recompile:
        images, fraction = _generate(compiled)
    torch.testing.assert_close(images, expected, atol=1e-4, rtol=0)
    assert fraction == 1.0 and not counters["graph_break"]


@pytest.mark.timeout(60)
def test_exits_at_changing_depths_and_reuse_steps_recompile_nothing(no_recompile, tmp_path):
    eager, compiled = _pipe(), _pipe()
    graphs = GraphRuns()
    compile_blocks(compiled, backend=graphs)
    _generate(compiled)  # compiles
    scheduler = build_scheduler("dpm-solver++", eager.scheduler.config)
    scheduler.set_timesteps(4)
    ExitSchedule.plan(4, scheduler.timesteps, [4, 1, REUSE, 3]).save_pretrained(tmp_path / "plan")
    with no_recompile:
        # depths 1, 2, 3 (noise to data); the plan: 4, 1, the last computed step's work reused (no block), 3
        for spec, steps, blocks_run in [("ase:linear:1", 3, 1 + 2 + 3), (f"ase:{tmp_path / 'plan'}", 4, 4 + 1 + 3)]:
            graphs.runs = 0
            images, fraction = _generate(compiled, spec, steps)
            assert graphs.runs == blocks_run  # the blocks that really ran, each one graph run
            expected, expected_fraction = _generate(eager, spec, steps)
            torch.testing.assert_close(images, expected, atol=1e-6, rtol=0)
            assert fraction == expected_fraction == blocks_run / (4 * steps)
    assert not counters["graph_break"]


@pytest.mark.timeout(60)
def test_hooks_put_on_and_taken_off_recompile_nothing_and_the_work_counts_as_eager(no_recompile):
    """FirstBlockCache hooks the blocks (the bench's counters sit on the attention and feed-forward modules inside
    them, counted by the compiled block); TaylorSeer hooks the attention modules inside the blocks, which then run
    eagerly over their modules' own graphs."""
    eager, compiled = _pipe(), _pipe()
    graphs = GraphRuns()
    compile_blocks(compiled, backend=graphs)
    specs = ["fbcache:0.5", "taylorseer:2", "layerskip:1", "fbcache:0.5", "baseline"]
    for spec in specs:  # each method's first calls make its graphs (TaylorSeer's: the attention modules' own)
        _generate(compiled, spec, steps=4)
    fractions = {}
    with no_recompile:
        for spec in specs:
            graphs.runs = 0
            images, fraction = _generate(compiled, spec, steps=4)
            expected, expected_fraction = _generate(eager, spec, steps=4)
            torch.testing.assert_close(images, expected, atol=1e-6, rtol=0)
            assert fraction == expected_fraction
            if spec.startswith("fbcache"):
                assert graphs.runs == pytest.approx(fraction * 4 * 4)  # the blocks that ran, of 4 steps of 4
            fractions[spec] = fraction
    assert fractions["fbcache:0.5"] < 1 and fractions["taylorseer:2"] < 1 and fractions["layerskip:1"] == 0.75
    assert not counters["graph_break"]


@pytest.mark.timeout(60)
def test_deediff_exits_recompile_nothing(no_recompile):
    """DeeDiff's hooks on the blocks, the whole batch leaving at the first exit point (`per_batch`), decided at each
    point or from the previous step."""
    eager, compiled = _pipe(), _pipe()
    compile_blocks(compiled, backend=GraphRuns())
    _generate(compiled)  # compiles
    torch.manual_seed(0)
    heads = ExitHeads(num_blocks=4, hidden_size=16)

    def generate(pipe, **rule):
        heads.set_exit_rule(**rule)
        pipe.exit_heads = heads
        try:
            generator = torch.Generator().manual_seed(0)
            images = pipe(
                class_labels=[1, 2, 3],
                guidance_scale=1.0,
                num_inference_steps=3,
                output_type="pt",
                generator=generator,
            ).images
            return images, pipe.exit_stats.block_fraction
        finally:
            pipe.exit_heads = None

    with no_recompile:
        for decision in ("per_block", "previous_step"):
            images, fraction = generate(compiled, threshold=1.0, policy="per_batch", decision=decision)
            expected, expected_fraction = generate(eager, threshold=1.0, policy="per_batch", decision=decision)
            torch.testing.assert_close(images, expected, atol=1e-6, rtol=0)
            assert fraction == expected_fraction < 1
