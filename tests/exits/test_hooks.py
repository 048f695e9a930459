import numpy as np
import pytest
import torch
from diffusers import DiTTransformer2DModel, SD3Transformer2DModel, UNet2DModel
from diffusers.models.attention import BasicTransformerBlock

from ee_diffusion import (
    ExitArchitecture,
    ExitSchedule,
    apply_exit_schedule,
    exit_units,
    get_exit_schedule,
    get_exit_stats,
    num_exit_blocks,
    register_exit_architecture,
    remove_exit_schedule,
    reset_exit_stats,
)
from tests.conftest import AttentionCounter


def dit_inputs(batch=2, timestep=900, sample_size=8):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 4, sample_size, sample_size, generator=generator)
    t = torch.full((batch,), timestep) if isinstance(timestep, int) else torch.tensor(timestep)
    return x, t, torch.arange(batch) % 10


def block_counter(model):
    return AttentionCounter(model, [block.attn1 for block in model.transformer_blocks])


@torch.no_grad()
def test_executed_depth_follows_schedule_counted_independently(tiny_dit):
    schedule = ExitSchedule.linear(num_blocks=4, min_blocks=1)
    apply_exit_schedule(tiny_dit, schedule)
    counter = block_counter(tiny_dit)
    for t in [999, 700, 400, 100, 0]:
        counter.reset()
        x, ts, y = dit_inputs(timestep=t)
        tiny_dit(x, timestep=ts, class_labels=y)
        depth = schedule.blocks_at(t)
        assert counter.counts == [1] * depth + [0] * (4 - depth), t
    assert get_exit_stats(tiny_dit).blocks_per_call == [schedule.blocks_at(t) for t in [999, 700, 400, 100, 0]]


@torch.no_grad()
def test_exit_equals_a_model_truncated_to_that_depth(tiny_dit):
    """ASE's exit: the output layer reads the hidden state after block S(t); same as a DiT built with S(t) layers."""
    truncated = DiTTransformer2DModel(**{**tiny_dit.config, "num_layers": 2}).eval()
    truncated.load_state_dict(tiny_dit.state_dict(), strict=False)
    assert torch.equal(
        truncated.transformer_blocks[1].ff.net[2].weight, tiny_dit.transformer_blocks[1].ff.net[2].weight
    )
    apply_exit_schedule(tiny_dit, ExitSchedule.constant(4, 2))
    x, t, y = dit_inputs()
    assert torch.equal(tiny_dit(x, timestep=t, class_labels=y).sample, truncated(x, timestep=t, class_labels=y).sample)


@torch.no_grad()
def test_pixart_exit_equals_a_pixart_truncated_to_that_depth():
    from diffusers import PixArtTransformer2DModel

    config = dict(
        sample_size=8,
        num_layers=4,
        patch_size=2,
        attention_head_dim=8,
        num_attention_heads=2,
        caption_channels=16,
        in_channels=4,
        cross_attention_dim=16,
        out_channels=8,
        attention_bias=True,
        activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000,
        norm_type="ada_norm_single",
        norm_elementwise_affine=False,
        norm_eps=1e-6,
    )
    torch.manual_seed(0)
    full = PixArtTransformer2DModel(**config).eval()
    truncated = PixArtTransformer2DModel(**{**config, "num_layers": 2}).eval()
    truncated.load_state_dict(full.state_dict(), strict=False)
    inputs = dict(
        hidden_states=torch.randn(2, 4, 8, 8),
        encoder_hidden_states=torch.randn(2, 6, 16),
        timestep=torch.tensor([900, 100]),
        added_cond_kwargs={"resolution": None, "aspect_ratio": None},
    )
    apply_exit_schedule(full, ExitSchedule.constant(4, 2))
    assert torch.equal(full(**inputs).sample, truncated(**inputs).sample)
    remove_exit_schedule(full)
    assert not torch.equal(full(**inputs).sample, truncated(**inputs).sample)


@torch.no_grad()
def test_remove_restores_bit_identical_output(tiny_dit):
    x, t, y = dit_inputs()
    reference = tiny_dit(x, timestep=t, class_labels=y).sample
    apply_exit_schedule(tiny_dit, ExitSchedule.constant(4, 1))
    assert not torch.equal(tiny_dit(x, timestep=t, class_labels=y).sample, reference)
    remove_exit_schedule(tiny_dit)
    assert torch.equal(tiny_dit(x, timestep=t, class_labels=y).sample, reference)
    assert get_exit_schedule(tiny_dit) is None
    counter = block_counter(tiny_dit)
    tiny_dit(x, timestep=t, class_labels=y)
    assert counter.counts == [1, 1, 1, 1]
    remove_exit_schedule(tiny_dit)  # removing twice is a no-op


@torch.no_grad()
def test_full_depth_schedule_is_bit_identical(tiny_dit):
    x, t, y = dit_inputs()
    reference = tiny_dit(x, timestep=t, class_labels=y).sample
    apply_exit_schedule(tiny_dit, ExitSchedule.constant(4, 4))
    assert torch.equal(tiny_dit(x, timestep=t, class_labels=y).sample, reference)


@torch.no_grad()
def test_per_sample_timesteps_get_per_sample_depths(tiny_dit):
    schedule = ExitSchedule.step(4, [4, 3, 2, 1])
    apply_exit_schedule(tiny_dit, schedule)
    x, _, y = dit_inputs(batch=3)
    timesteps = torch.tensor([950, 50, 600])
    counter = block_counter(tiny_dit)
    batched = tiny_dit(x, timestep=timesteps, class_labels=y).sample
    assert counter.counts == [1, 1, 1, 1]  # runs to the deepest sample only
    call = get_exit_stats(tiny_dit).calls[-1]
    assert call.depths == (1, 4, 2) and call.units_executed == 4
    for i in range(3):
        alone = tiny_dit(x[i : i + 1], timestep=timesteps[i : i + 1], class_labels=y[i : i + 1]).sample
        torch.testing.assert_close(batched[i : i + 1], alone, rtol=1e-5, atol=1e-6)
    counter.reset()
    tiny_dit(x, timestep=torch.tensor([950, 940, 960]), class_labels=y)
    assert counter.counts == [1, 0, 0, 0]


@torch.no_grad()
def test_stateless_across_calls(tiny_dit):
    apply_exit_schedule(tiny_dit, ExitSchedule.linear(4, 1))
    x, t, y = dit_inputs(timestep=999)
    first = tiny_dit(x, timestep=t, class_labels=y).sample
    tiny_dit(x, timestep=torch.zeros_like(t), class_labels=y)
    assert torch.equal(tiny_dit(x, timestep=t, class_labels=y).sample, first)
    assert get_exit_stats(tiny_dit).blocks_per_call == [1, 4, 1]
    reset_exit_stats(tiny_dit)
    assert get_exit_stats(tiny_dit).calls == [] and get_exit_stats(tiny_dit).block_fraction == 1.0


@torch.no_grad()
def test_scalar_and_python_timesteps_passed_positionally():
    model = make_tiny_unet()
    apply_exit_schedule(model, ExitSchedule.linear(6, 1))
    x = torch.randn(2, 1, 8, 8)
    model(x, torch.tensor(999))
    model(x, 999)
    model(x, timestep=0)
    assert get_exit_stats(model).blocks_per_call == [1, 1, 6]


def test_reapplying_replaces_the_schedule(tiny_dit):
    apply_exit_schedule(tiny_dit, ExitSchedule.constant(4, 1))
    apply_exit_schedule(tiny_dit, ExitSchedule.constant(4, 3))
    counter = block_counter(tiny_dit)
    x, t, y = dit_inputs()
    with torch.no_grad():
        tiny_dit(x, timestep=t, class_labels=y)
    assert counter.counts == [1, 1, 1, 0]
    assert get_exit_schedule(tiny_dit) == ExitSchedule.constant(4, 3)


def test_gradients_flow_through_an_exited_model(tiny_dit):
    apply_exit_schedule(tiny_dit, ExitSchedule.constant(4, 2))
    x, t, y = dit_inputs()
    tiny_dit(x, timestep=t, class_labels=y).sample.square().mean().backward()
    assert tiny_dit.transformer_blocks[1].attn1.to_q.weight.grad is not None
    assert tiny_dit.transformer_blocks[2].attn1.to_q.weight.grad is None


def make_tiny_sd3(num_layers=3):
    torch.manual_seed(0)
    return SD3Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=4,
        num_layers=num_layers,
        attention_head_dim=8,
        num_attention_heads=2,
        caption_projection_dim=16,
        joint_attention_dim=16,
        pooled_projection_dim=16,
        out_channels=4,
    ).eval()


@pytest.mark.parametrize("depth", [1, 2, 3])
@torch.no_grad()
def test_sd3_exit_matches_diffusers_skip_layers(depth):
    """SD3's own `skip_layers` skips blocks the same way; the last block stays context_pre_only."""
    model = make_tiny_sd3()
    assert model.transformer_blocks[-1].context_pre_only
    generator = torch.Generator().manual_seed(0)
    inputs = dict(
        hidden_states=torch.randn(2, 4, 8, 8, generator=generator),
        encoder_hidden_states=torch.randn(2, 5, 16, generator=generator),
        pooled_projections=torch.randn(2, 16, generator=generator),
        timestep=torch.tensor([500.0, 500.0]),
    )
    reference = model(**inputs, skip_layers=list(range(depth, 3))).sample
    apply_exit_schedule(model, ExitSchedule.constant(3, depth))
    assert torch.equal(model(**inputs).sample, reference)
    assert get_exit_stats(model).blocks_per_call == [depth]


def make_tiny_unet():
    torch.manual_seed(0)
    return UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
        attention_head_dim=4,
    ).eval()


@torch.no_grad()
def test_unet_units_are_decoder_resnets_and_attentions_and_skips_keep_the_merge():
    model = make_tiny_unet()
    units = exit_units(model)
    expected = []
    for up_block in model.up_blocks:
        for i, resnet in enumerate(up_block.resnets):
            expected.append(resnet)
            if getattr(up_block, "attentions", None):
                expected.append(up_block.attentions[i])
    assert units == expected and num_exit_blocks(model) == 6
    depth = 2
    apply_exit_schedule(model, ExitSchedule.constant(6, depth))
    seen = {}
    handles = [u.register_forward_hook(lambda m, a, o: seen.__setitem__(m, (a, o))) for u in units]
    convs = AttentionCounter(model, [u.conv1 for u in units if hasattr(u, "conv1")])
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    out = model(x, torch.tensor([900, 900])).sample
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert convs.counts == [1, 0, 0, 0]  # units 0 (resnet) and 1 (attention) ran, no later resnet did
    for unit in units[depth:]:
        (inputs, *_), output = seen[unit]
        if hasattr(unit, "conv_shortcut"):  # skipped resnet: only the 1x1 merge of the encoder skip
            assert unit.conv_shortcut is not None and inputs.shape[1] != output.shape[1]
            torch.testing.assert_close(output, unit.conv_shortcut(inputs) / unit.output_scale_factor)
        else:  # skipped attention: its residual
            torch.testing.assert_close(output, inputs / unit.rescale_output_factor)
    for handle in handles:
        handle.remove()


def test_num_blocks_mismatch_raises(tiny_dit):
    with pytest.raises(ValueError, match=r"num_blocks=28, but this DiTTransformer2DModel has 4 skippable blocks"):
        apply_exit_schedule(tiny_dit, ExitSchedule.linear(28, 14))


def test_bad_arguments_raise(tiny_dit):
    with pytest.raises(TypeError, match="must be an ExitSchedule"):
        apply_exit_schedule(tiny_dit, {"num_blocks": 4})
    with pytest.raises(TypeError, match="Expected a denoiser model or a diffusers pipeline"):
        apply_exit_schedule("model", ExitSchedule.linear(4, 2))
    with pytest.raises(ValueError, match="No exit schedule is applied"):
        get_exit_stats(tiny_dit)
    for scale, error in ((-1000, ValueError), (0, ValueError), (1000.0, TypeError), (True, TypeError)):
        with pytest.raises(error, match=f"`num_train_timesteps` must be an integer( >= 1)?, got {scale!r}"):
            apply_exit_schedule(tiny_dit, ExitSchedule.linear(4, 2), num_train_timesteps=scale)
    apply_exit_schedule(tiny_dit, ExitSchedule.linear(4, 2), num_train_timesteps=np.int64(1000))
    x, _, y = dit_inputs()
    with pytest.raises(ValueError, match="timestep=None"):
        tiny_dit(x, timestep=None, class_labels=y)


class TinyStack(torch.nn.Module):
    """A denoiser class the registry does not know."""

    def __init__(self):
        super().__init__()
        self.layers = torch.nn.ModuleList(BasicTransformerBlock(8, 2, 4) for _ in range(3))

    def forward(self, hidden_states, timestep):
        for layer in self.layers:
            hidden_states = layer(hidden_states)
        return hidden_states


def test_unsupported_class_names_the_supported_ones_and_can_be_registered():
    model = TinyStack().eval()
    with pytest.raises(TypeError, match=r"does not support TinyStack\. Supported classes: ") as refused:
        apply_exit_schedule(model, ExitSchedule.linear(3, 1))
    for supported in (
        "DiTTransformer2DModel",
        "PixArtTransformer2DModel",
        "SD3Transformer2DModel",
        "UNet2DModel",
        "UNet2DConditionModel",
        "FluxTransformer2DModel",
        "WanTransformer3DModel",
        "ZImageTransformer2DModel",
    ):
        assert supported in str(refused.value)
    register_exit_architecture(TinyStack, ExitArchitecture(units=lambda m: list(m.layers)))
    apply_exit_schedule(model, ExitSchedule.constant(3, 1))
    counter = AttentionCounter(model, [layer.attn1 for layer in model.layers])
    x = torch.randn(1, 4, 8)
    with torch.no_grad():
        assert torch.equal(model(x, timestep=500), model.layers[0](x))
    assert counter.counts == [2, 0, 0]
    with pytest.raises(TypeError, match="must be a torch.nn.Module subclass"):
        register_exit_architecture(int, ExitArchitecture(units=list))


class TinyFractionStack(TinyStack):
    """A denoiser class whose pipeline would hand it `t / 1000`, like Flux's."""


def test_a_registered_timestep_convention_is_read_back_to_the_schedulers_timestep():
    from ee_diffusion import TimestepConvention
    from ee_diffusion.exits import scheduler_timesteps

    model = TinyFractionStack().eval()
    register_exit_architecture(
        TinyFractionStack,
        ExitArchitecture(units=lambda m: list(m.layers), timestep_convention=TimestepConvention(divisor=1000)),
    )
    schedule = ExitSchedule.linear(3, 1)
    apply_exit_schedule(model, schedule)
    counter = AttentionCounter(model, [layer.attn1 for layer in model.layers])
    x = torch.randn(1, 4, 8)
    with torch.no_grad():
        for t in (1000, 500, 0):
            model(x, timestep=torch.tensor([t / 1000]))
    assert get_exit_stats(model).blocks_per_call == [schedule.blocks_at(t) for t in (1000, 500, 0)] == [1, 2, 3]
    assert counter.counts == [3, 2, 1]
    assert [call.timesteps for call in get_exit_stats(model).calls] == [(1000.0,), (500.0,), (0.0,)]
    assert scheduler_timesteps(model, (x,), {"timestep": torch.tensor([0.25, 0.75])}) == [250.0, 750.0]
    reversed_ = TimestepConvention(divisor=1000, reversed=True)
    assert reversed_.to_scheduler(1.0) == 0.0 and reversed_.to_model(250.0) == 0.75
    assert reversed_.describe() == "(1000 - t) / 1000" and TimestepConvention().describe() == "t"


def test_bad_timestep_conventions_raise():
    from ee_diffusion import TimestepConvention

    for divisor, error in ((0, ValueError), (-1.0, ValueError), ("1000", TypeError), (True, TypeError)):
        with pytest.raises(error, match=f"`divisor` must be a positive number, got {divisor!r}"):
            TimestepConvention(divisor=divisor)
    with pytest.raises(TypeError, match="`timestep_convention` must be a TimestepConvention or a function"):
        ExitArchitecture(units=list, timestep_convention=1000)
    architecture = ExitArchitecture(units=list, timestep_convention=lambda model: 1000)
    with pytest.raises(TypeError, match="The timestep convention of TinyStack must be a TimestepConvention, got int"):
        architecture.convention_of(TinyStack())


def test_a_bare_models_calls_carry_no_denoiser_name_and_branch_by_call_order(tiny_dit):
    apply_exit_schedule(tiny_dit, ExitSchedule.constant(4, 2))
    x, t, y = dit_inputs()
    with torch.no_grad():
        for timestep in (t, t, t // 2):
            tiny_dit(x, timestep=timestep, class_labels=y)
    calls = get_exit_stats(tiny_dit).calls
    assert [call.branch for call in calls] == [0, 1, 0] and {call.denoiser for call in calls} == {None}
