"""DeeDiff's heads training: the uncertainty-aware layer-wise loss, frozen and joint modes, checkpoints, the CLI."""

import pytest
import torch
from diffusers import DDPMScheduler

from ee_diffusion import EarlyExitDiTPipeline, load_early_exit_pipeline
from ee_diffusion.cli import main
from ee_diffusion.exits import ExitHeads
from ee_diffusion.training import TrainConfig, exit_head_losses, train_exit_heads
from tests.conftest import save_digits_shaped_dit
from tests.training.test_denoiser import NUM_BLOCKS, QUICK, tiny_data, tiny_dit


def heads_for(model) -> ExitHeads:
    torch.manual_seed(0)
    return ExitHeads(num_blocks=NUM_BLOCKS, hidden_size=16)


def fixed_batch(data):
    g = torch.Generator().manual_seed(7)
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    timesteps = torch.randint(0, 1000, (len(data),), generator=g)
    noise = torch.randn(data.images.shape, generator=g)
    return scheduler.add_noise(data.images, noise, timesteps), timesteps, data.labels, noise


def total(terms):
    return sum(terms.values())


@pytest.mark.parametrize("joint", [False, True], ids=["frozen", "joint"])
def test_a_training_step_reduces_the_loss(joint):
    model, data = tiny_dit().eval(), tiny_data()
    heads, batch = heads_for(model), fixed_batch(data)
    trained = [*heads.parameters(), *(model.parameters() if joint else [])]
    model.requires_grad_(joint)
    optimizer = torch.optim.Adam(trained, lr=1e-2)
    before = exit_head_losses(model, heads, *batch, joint=joint)
    assert set(before) == {"simple", "uncertainty", "layerwise"} and (before["simple"] > 0) == joint
    optimizer.zero_grad()
    total(before).backward()
    assert all(p.grad is None for p in model.parameters()) != joint  # frozen: no gradient reaches the model
    optimizer.step()
    with torch.no_grad():
        assert total(exit_head_losses(model, heads, *batch, joint=joint)) < total(before)


def test_pseudo_uncertainty_and_layerwise_loss_follow_the_formulas():
    model, data = tiny_dit().eval(), tiny_data(8)  # eval: no label dropout
    heads = heads_for(model)
    noisy, timesteps, labels, target = fixed_batch(data)
    with torch.no_grad():
        terms = exit_head_losses(model, heads, noisy, timesteps, labels, target, joint=True)
        # a fresh head is the model's own output layer on the block's hidden state: ASE's exit, done by hand
        from ee_diffusion.exits.heads import block_outputs

        with block_outputs(model) as outputs:
            final = model(noisy, timesteps, class_labels=labels).sample
        embedding = heads.embed(timesteps)
        u, predictions = [], []
        for point, count in enumerate(heads.exit_blocks):
            blocks, model.transformer_blocks = model.transformer_blocks, model.transformer_blocks[:count]
            predictions.append(model(noisy, timesteps, class_labels=labels).sample)
            model.transformer_blocks = blocks
            u.append(heads.uncertainty(point, outputs[count - 1], embedding))
        u, errors = torch.stack(u), torch.stack(predictions) - target
        pseudo = torch.tanh(errors.abs()).mean(dim=(2, 3, 4))
    torch.testing.assert_close(terms["simple"], (final - target).pow(2).mean())
    torch.testing.assert_close(terms["uncertainty"], (u - pseudo).pow(2).sum(0).mean())
    torch.testing.assert_close(terms["layerwise"], ((1 - u) * errors.pow(2).mean(dim=(2, 3, 4))).sum(0).mean())


def test_frozen_training_leaves_the_model_bit_identical_and_joint_changes_it():
    data, config = tiny_data(), TrainConfig(**{**QUICK, "steps": 3})
    model, reference = tiny_dit(), tiny_dit()
    heads = heads_for(model)
    before = {k: v.clone() for k, v in heads.state_dict().items()}
    result = train_exit_heads(model, heads, data, config, progress=False)
    assert result.steps_run == 3 and len(result.losses) == 3
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), reference.state_dict().values()))
    assert any(not torch.equal(v, heads.state_dict()[k]) for k, v in before.items())
    train_exit_heads(model, heads_for(model), data, config, joint=True, progress=False)
    assert any(not torch.equal(a, b) for a, b in zip(model.state_dict().values(), reference.state_dict().values()))
    assert all(p.requires_grad for p in model.parameters()) and not model.training


def test_resume_continues_bit_identically(tmp_path):
    data, config = tiny_data(), TrainConfig(**{**QUICK, "steps": 4, "checkpoint_every": 2})
    model = tiny_dit()
    straight = heads_for(model)
    train_exit_heads(model, straight, data, config, out_dir=tmp_path / "straight", progress=False)
    first = heads_for(model)
    train_exit_heads(
        model,
        first,
        data,
        TrainConfig(**{**QUICK, "steps": 4, "checkpoint_every": 2}),
        out_dir=tmp_path / "resumed",
        progress=False,
    )
    (tmp_path / "resumed" / "checkpoint.pt").unlink()
    interrupted = heads_for(model)
    calls = []

    def crash_on_third_step(module, args):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt

    handle = interrupted.time_embedding.register_forward_pre_hook(crash_on_third_step)
    with pytest.raises(KeyboardInterrupt):
        train_exit_heads(model, interrupted, data, config, out_dir=tmp_path / "resumed", progress=False)
    handle.remove()
    resumed = ExitHeads(num_blocks=NUM_BLOCKS, hidden_size=16)  # the checkpoint, not the initialisation, decides
    result = train_exit_heads(model, resumed, data, config, out_dir=tmp_path / "resumed", resume=True, progress=False)
    assert (result.steps_run, result.total_steps) == (2, 4)
    for a, b in zip(straight.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="was written by another run"):
        train_exit_heads(
            model,
            heads_for(model),
            data,
            config,
            out_dir=tmp_path / "resumed",
            resume=True,
            joint=True,
            progress=False,
        )


def test_train_uem_command_frozen_and_joint(tmp_path):
    save_digits_shaped_dit(tmp_path / "model")
    heads_folder, joint_folder = tmp_path / "heads", tmp_path / "joint"
    common = ["--steps", "2", "--batch-size", "4", "--threads", "1", "--model", str(tmp_path / "model")]
    assert (
        main(["train-uem", *common, "--out", str(heads_folder), "--threshold", "0.2", "--policy", "per_sample"]) == 0
    )
    heads = ExitHeads.from_pretrained(heads_folder)
    assert (heads.exit_blocks, heads.config.threshold, heads.config.policy) == ([1], 0.2, "per_sample")
    assert "ee-diffusion train-uem" in (heads_folder / "README.md").read_text()
    assert next(heads_folder.glob("*.safetensors")).stat().st_size < 50_000  # fp16
    pipe = EarlyExitDiTPipeline.from_pretrained(tmp_path / "model", exit_heads=heads)
    pipe.set_progress_bar_config(disable=True)
    pipe(class_labels=[1, 2], num_inference_steps=2, guidance_scale=2.0, output_type="np")
    assert len(pipe.exit_stats.calls) == 2 and len(pipe.exit_stats.calls[0].depths) == 4

    assert main(["train-uem", *common, "--out", str(joint_folder), "--joint"]) == 0
    loaded = load_early_exit_pipeline(str(joint_folder))
    assert isinstance(loaded.exit_heads, ExitHeads) and loaded.exit_schedule is None


def test_train_uem_refuses_a_unet(capsys):
    assert main(["train-uem", "--model", "digits-unet", "--out", "/tmp/ee-uem-unet", "--steps", "1"]) == 2
    assert "digits-unet has a UNet2DModel; exit heads are for DiTTransformer2DModel" in capsys.readouterr().err


def test_train_uem_seeds_the_heads_too(tmp_path):
    """Two runs of one command give the same heads: `--seed` seeds their initialisation as well as the data."""
    from safetensors.torch import load_file

    command = ["train-uem", "--model", "digits-dit", "--steps", "2", "--batch-size", "4", "--warmup-steps", "1"]
    for name in ("a", "b"):
        assert main([*command, "--checkpoint-every", "2", "--out", str(tmp_path / name)]) == 0
    a, b = (load_file(tmp_path / name / "diffusion_pytorch_model.safetensors") for name in ("a", "b"))
    assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)


def test_a_resumed_runs_card_gives_the_command_that_makes_the_model_afresh():
    import argparse

    from ee_diffusion.cli.arguments import card_command

    argv = ["train-uem", "--model", "digits-dit", "--out", "out/heads", "--resume", "--overwrite", "--threads", "2"]
    assert card_command(argparse.Namespace(argv=argv)) == (
        "ee-diffusion train-uem --model digits-dit --out out/heads --threads 2"
    )
