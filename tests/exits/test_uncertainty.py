"""DeeDiff's dynamic exit: heads decide at run time, blocks after a sample's exit really do not run for it.

Most tests run one call under DeeDiff's released per-block rule (`decision="per_block"`); the default rule decides a
call from the previous call's uncertainties (`previous_step`), tested at the end against the per-block one."""

import pytest
import torch

from ee_diffusion import ExitSchedule, apply_exit_schedule, remove_exit_schedule
from ee_diffusion.exits import (
    ExitHeads,
    apply_uncertainty_exit,
    get_uncertainty_exit_stats,
    remove_uncertainty_exit,
    reset_uncertainty_exit_stats,
)
from ee_diffusion.exits.heads import block_outputs, exit_predictions
from tests.conftest import make_tiny_dit

NUM_BLOCKS = 4


def trained_looking_heads(seed: int = 0) -> ExitHeads:
    """Heads whose adapters and uncertainties are not trivial (fresh ones have zero adapters)."""
    torch.manual_seed(seed)
    heads = ExitHeads(num_blocks=NUM_BLOCKS, hidden_size=16)
    for parameter in heads.parameters():
        torch.nn.init.normal_(parameter, std=0.2)
    return heads.eval()


def inputs(batch: int = 6, seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    sample = torch.randn(batch, 4, 8, 8, generator=generator)
    timesteps = torch.randint(0, 1000, (batch,), generator=generator)
    labels = torch.randint(0, 1000, (batch,), generator=generator)
    return sample, timesteps, labels


class RowsPerBlock:
    """Samples each block really ran on, counted by plain torch forward hooks on the blocks' attention."""

    def __init__(self, model):
        self.rows = [0] * len(model.transformer_blocks)
        self.handles = [
            block.attn1.register_forward_hook(self._hook(i)) for i, block in enumerate(model.transformer_blocks)
        ]

    def _hook(self, index):
        def hook(module, args, output):
            self.rows[index] += output.shape[0]

        return hook


def run(model, sample, timesteps, labels):
    with torch.no_grad():
        return model(sample, timesteps, class_labels=labels).sample


def uncertainties(model, heads, sample, timesteps, labels) -> torch.Tensor:
    """Every exit point's uncertainty for every sample (exit points x batch), on the full model."""
    with torch.no_grad(), block_outputs(model) as outputs:
        model(sample, timesteps, class_labels=labels)
        embedding = heads.embed(timesteps)
        return torch.stack([heads.uncertainty(k, outputs[c - 1], embedding) for k, c in enumerate(heads.exit_blocks)])


def test_threshold_zero_runs_every_block_and_is_bit_identical_and_removal_restores():
    model, heads, x = make_tiny_dit(NUM_BLOCKS), trained_looking_heads(), inputs()
    reference = run(model, *x)
    heads.set_exit_rule(threshold=0)
    apply_uncertainty_exit(model, heads)
    counter = RowsPerBlock(model)
    assert torch.equal(run(model, *x), reference)
    assert counter.rows == [6] * NUM_BLOCKS
    stats = get_uncertainty_exit_stats(model)
    assert stats.calls[-1].depths == (NUM_BLOCKS,) * 6
    uem, _ = heads.cost_in_blocks(model.transformer_blocks[0])
    assert stats.block_fraction == pytest.approx(1 + 3 * uem / NUM_BLOCKS)  # the UEMs' work is counted
    remove_uncertainty_exit(model)
    assert torch.equal(run(model, *x), reference)


def test_a_huge_threshold_exits_at_the_first_head_and_runs_one_block():
    model, heads, x = make_tiny_dit(NUM_BLOCKS), trained_looking_heads(), inputs()
    with torch.no_grad(), block_outputs(model) as outputs:
        model(x[0], x[1], class_labels=x[2])
        first = exit_predictions(
            model,
            heads,
            outputs,
            heads.embed(x[1]),
            lambda k: model(x[0].repeat(k, 1, 1, 1), x[1].repeat(k), class_labels=x[2].repeat(k)).sample,
        )[0]
    heads.set_exit_rule(threshold=1.0, decision="per_block")  # an uncertainty is a sigmoid, at most 1
    apply_uncertainty_exit(model, heads)
    counter = RowsPerBlock(model)
    torch.testing.assert_close(run(model, *x), first)
    assert counter.rows == [6, 0, 0, 0]
    stats = get_uncertainty_exit_stats(model)
    assert stats.calls[-1].depths == (1,) * 6 and stats.mean_depth_per_call == [1.0]
    uem, adapter = heads.cost_in_blocks(model.transformer_blocks[0])
    assert stats.block_fraction == pytest.approx((1 + uem + adapter) / NUM_BLOCKS)


def test_exit_depth_follows_the_threshold():
    model, heads, x = make_tiny_dit(NUM_BLOCKS), trained_looking_heads(), inputs(batch=16)
    u = uncertainties(model, heads, *x)
    apply_uncertainty_exit(model, heads)
    depths = []
    for threshold in sorted(set(torch.quantile(u.flatten(), torch.tensor([0.0, 0.3, 0.6, 1.0])).tolist())):
        heads.set_exit_rule(threshold=threshold, policy="per_sample", decision="per_block")
        run(model, *x)
        depths.append(sum(get_uncertainty_exit_stats(model).calls[-1].depths))
    assert depths == sorted(depths, reverse=True) and depths[0] > depths[-1]


def test_per_sample_exits_run_fewer_rows_and_equal_each_sample_run_alone():
    model, heads, x = make_tiny_dit(NUM_BLOCKS), trained_looking_heads(), inputs(batch=8)
    u = uncertainties(model, heads, *x)
    heads.set_exit_rule(threshold=float(u.median()), policy="per_sample", decision="per_block")
    apply_uncertainty_exit(model, heads)
    counter = RowsPerBlock(model)
    batched = run(model, *x)
    depths = get_uncertainty_exit_stats(model).calls[-1].depths
    assert len(set(depths)) > 1  # samples left at different blocks
    assert counter.rows == [sum(d > i for d in depths) for i in range(NUM_BLOCKS)]  # compacted: real work only
    for i in range(8):
        alone = run(model, *(t[i : i + 1] for t in x))
        assert get_uncertainty_exit_stats(model).calls[-1].depths == (depths[i],)
        torch.testing.assert_close(batched[i : i + 1], alone, rtol=1e-4, atol=1e-5)  # in the original order


def test_guidance_pairs_exit_together():
    model, heads, x = make_tiny_dit(NUM_BLOCKS), trained_looking_heads(), inputs(batch=8)
    u = uncertainties(model, heads, *x)
    heads.set_exit_rule(threshold=float(u.median()), policy="per_sample", decision="per_block")
    apply_uncertainty_exit(model, heads, paired=True)
    run(model, *x)
    depths = get_uncertainty_exit_stats(model).calls[-1].depths
    assert depths[:4] == depths[4:] and len(set(depths)) > 1
    apply_uncertainty_exit(model, heads, paired=False)
    run(model, *x)
    unpaired = get_uncertainty_exit_stats(model).calls[-1].depths
    assert unpaired[:4] != unpaired[4:]  # alone, the halves would leave at different blocks
    assert all(p >= q for p, q in zip(depths, unpaired))  # a pair leaves when its slower half may
    with pytest.raises(ValueError, match="even size"):
        apply_uncertainty_exit(model, heads, paired=True)
        run(model, *inputs(batch=3))


def test_per_batch_exits_together_when_every_sample_may():
    model, heads, x = make_tiny_dit(NUM_BLOCKS), trained_looking_heads(), inputs(batch=8)
    u = uncertainties(model, heads, *x)
    heads.set_exit_rule(threshold=float(u[1].max()), policy="per_batch", decision="per_block")  # all may leave at 2
    apply_uncertainty_exit(model, heads)
    run(model, *x)
    depths = get_uncertainty_exit_stats(model).calls[-1].depths
    first = next(k for k in range(3) if bool((u[k] <= float(u[1].max())).all()))
    assert set(depths) == {heads.exit_blocks[first]}


def test_check_every_skips_exit_points():
    model, heads, x = make_tiny_dit(NUM_BLOCKS), trained_looking_heads(), inputs()
    heads.set_exit_rule(threshold=1.0, check_every=2, decision="per_block")  # points 0 and 2: after blocks 1, 3
    apply_uncertainty_exit(model, heads)
    run(model, *x)
    assert get_uncertainty_exit_stats(model).calls[-1].depths == (1,) * 6
    reset_uncertainty_exit_stats(model)
    assert get_uncertainty_exit_stats(model).calls == []


def test_heads_save_and_load(tmp_path):
    heads = trained_looking_heads()
    heads.set_exit_rule(threshold=0.3, policy="per_sample")
    heads.save_pretrained(tmp_path)
    loaded = ExitHeads.from_pretrained(tmp_path)
    assert loaded.config.threshold == 0.3 and loaded.config.policy == "per_sample"
    assert loaded.exit_blocks == [1, 2, 3]
    for (name, a), (_, b) in zip(heads.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name


def test_bad_heads_and_rules_are_refused():
    model = make_tiny_dit(NUM_BLOCKS)
    with pytest.raises(ValueError, match="for a denoiser with 6 blocks of width 16; this DiTTransformer2DModel has 4"):
        apply_uncertainty_exit(model, ExitHeads(num_blocks=6, hidden_size=16))
    with pytest.raises(ValueError, match="`threshold` must be"):
        ExitHeads(num_blocks=4, hidden_size=16, threshold=-0.1)
    with pytest.raises(ValueError, match=r"`threshold` must lie in \[0, 1\] \(an uncertainty is a sigmoid\), got 5"):
        ExitHeads(num_blocks=4, hidden_size=16).set_exit_rule(threshold=5)
    with pytest.raises(ValueError, match="`policy` must be one of"):
        ExitHeads(num_blocks=4, hidden_size=16).set_exit_rule(policy="per_token")
    with pytest.raises(ValueError, match=r"`decision` must be one of \('previous_step', 'per_block'\)"):
        ExitHeads(num_blocks=4, hidden_size=16).set_exit_rule(decision="per_token")
    with pytest.raises(ValueError, match="`exit_blocks` must be increasing block counts in 1..3"):
        ExitHeads(num_blocks=4, hidden_size=16, exit_blocks=[2, 4])
    with pytest.raises(TypeError, match=r"`exit_blocks` must be an integer, got 1.7"):  # never truncated
        ExitHeads(num_blocks=4, hidden_size=16, exit_blocks=[1.7, 2.9])
    with pytest.raises(TypeError, match="`exit_blocks` must be a sequence of block counts"):
        ExitHeads(num_blocks=4, hidden_size=16, exit_blocks="12")
    with pytest.raises(ValueError, match="`timestep_channels` must be an integer >= 2, got 0"):
        ExitHeads(num_blocks=4, hidden_size=16, timestep_channels=0)
    with pytest.raises(TypeError, match="`heads` must be ExitHeads"):
        apply_uncertainty_exit(model, "heads")
    with pytest.raises(TypeError, match="`paired` must be True or False, got 'yes'"):
        apply_uncertainty_exit(model, ExitHeads(num_blocks=4, hidden_size=16), paired="yes")
    apply_exit_schedule(model, ExitSchedule.linear(NUM_BLOCKS, 2))
    with pytest.raises(ValueError, match="already carries hooks"):
        apply_uncertainty_exit(model, ExitHeads(num_blocks=4, hidden_size=16))
    remove_exit_schedule(model)
    apply_uncertainty_exit(model, ExitHeads(num_blocks=4, hidden_size=16))
    with pytest.raises(ValueError, match="carries uncertainty exits; remove them"):
        apply_exit_schedule(model, ExitSchedule.linear(NUM_BLOCKS, 2))


def test_unet_is_refused():
    from diffusers import UNet2DModel

    unet = UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        block_out_channels=(8, 8),
        norm_num_groups=4,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
    )
    with pytest.raises(TypeError, match="do not support UNet2DModel; supported: DiTTransformer2DModel"):
        apply_uncertainty_exit(unet, ExitHeads(num_blocks=4, hidden_size=16))


@pytest.mark.parametrize("policy, paired", [("per_sample", False), ("per_sample", True), ("per_batch", False)])
def test_previous_step_decides_a_call_as_the_per_block_rule_decided_the_call_before(policy, paired):
    """Under `previous_step`, a run's first call runs every block (and evaluates every point); the next call exits
    where the first call's uncertainties allowed, so with the same inputs twice it makes the per-block rule's
    decisions, runs the same rows per block, and gives the same output."""
    model, heads, x = make_tiny_dit(NUM_BLOCKS), trained_looking_heads(), inputs(batch=8)
    u = uncertainties(model, heads, *x)
    threshold = float(u.median()) if policy == "per_sample" else float(u[1].max())
    heads.set_exit_rule(threshold=threshold, policy=policy, decision="per_block")
    apply_uncertainty_exit(model, heads, paired=paired)
    counter = RowsPerBlock(model)
    expected = run(model, *x)
    expected_depths, expected_rows = get_uncertainty_exit_stats(model).calls[-1].depths, list(counter.rows)
    assert len(set(expected_depths)) > 1 or policy == "per_batch"

    heads.set_exit_rule(decision="previous_step")
    reset_uncertainty_exit_stats(model)
    counter.rows = [0] * NUM_BLOCKS
    first = run(model, *x)
    assert counter.rows == [8] * NUM_BLOCKS  # nothing known yet: every block
    torch.testing.assert_close(first, run_plain(model, *x))
    counter.rows = [0] * NUM_BLOCKS
    second = run(model, *x)
    stats = get_uncertainty_exit_stats(model)
    assert stats.calls[0].depths == (NUM_BLOCKS,) * 8 and stats.calls[1].depths == expected_depths
    assert counter.rows == expected_rows
    torch.testing.assert_close(second, expected, rtol=1e-4, atol=1e-5)
    run(model, *inputs(batch=6))  # another batch size: nothing known for it, every block
    assert get_uncertainty_exit_stats(model).calls[-1].depths == (NUM_BLOCKS,) * 6


def run_plain(model, *x):
    """The model's output without any hooks (a copy of its weights)."""
    plain = make_tiny_dit(NUM_BLOCKS)
    plain.load_state_dict(model.state_dict())
    return run(plain, *x)


def test_previous_step_makes_no_host_read_inside_a_call_and_per_block_one_per_checked_point():
    from tests.host_reads import HostReads

    model, heads, x = make_tiny_dit(NUM_BLOCKS), trained_looking_heads(), inputs(batch=8)
    u = uncertainties(model, heads, *x)
    apply_uncertainty_exit(model, heads)
    for policy, threshold in (("per_sample", float(u.median())), ("per_batch", float(u[1].max()))):
        heads.set_exit_rule(threshold=threshold, policy=policy, decision="previous_step")
        reset_uncertainty_exit_stats(model)
        with HostReads(model) as reads:
            for _ in range(3):
                run(model, *x)
        assert reads.per_call == [0, 0, 0], reads.kinds
        assert get_uncertainty_exit_stats(model).calls[-1].depths != (NUM_BLOCKS,) * 8  # and it did exit
    heads.set_exit_rule(threshold=0.0, decision="per_block", check_every=1)
    with HostReads(model) as reads:
        run(model, *x)
    assert reads.per_call == [len(heads.exit_blocks)]  # one read of the uncertainties per checked point
    # where samples leave, too: which of them leave is the one read of a point
    heads.set_exit_rule(threshold=float(u.median()), policy="per_sample", decision="per_block")
    with HostReads(model) as reads:
        run(model, *x)
    depths = get_uncertainty_exit_stats(model).calls[-1].depths
    assert min(depths) < max(depths)  # some left early, others went on
    assert reads.per_call == [sum(block <= max(depths) for block in heads.exit_blocks)], reads.kinds


def test_previous_step_at_threshold_zero_is_bit_identical_and_a_new_run_starts_at_full_depth():
    model, heads, x = make_tiny_dit(NUM_BLOCKS), trained_looking_heads(), inputs()
    reference = run(model, *x)
    heads.set_exit_rule(threshold=0)
    assert heads.config.decision == "previous_step"  # the default
    apply_uncertainty_exit(model, heads)
    for _ in range(3):
        assert torch.equal(run(model, *x), reference)
    heads.set_exit_rule(threshold=1.0)
    run(model, *x)  # decided from the previous call's uncertainties: every point allowed it
    assert get_uncertainty_exit_stats(model).calls[-1].depths == (1,) * 6
    reset_uncertainty_exit_stats(model)  # a new sampling run
    run(model, *x)
    assert get_uncertainty_exit_stats(model).calls == [get_uncertainty_exit_stats(model).calls[0]]
    assert get_uncertainty_exit_stats(model).calls[0].depths == (NUM_BLOCKS,) * 6
