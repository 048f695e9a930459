"""The digits-flux recipe: tokenizer and text encoders, VAE and flow-matching losses, the shared loop's resume, the
flow-matching schedulers of the bench, and the train-flux command's folder."""

import pytest
import torch
from diffusers import (
    DDPMScheduler,
    DiffusionPipeline,
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
)

from ee_diffusion import ExitSchedule
from ee_diffusion.bench.noise_schedulers import SCHEDULERS, build_scheduler, is_flow_matching, schedulers_for
from ee_diffusion.cli import main
from ee_diffusion.data.digits import digit_prompt
from ee_diffusion.exits import get_exit_schedule
from ee_diffusion.schedules import DROP, REUSE
from ee_diffusion.training import TrainConfig
from ee_diffusion.training.digits_flux import digits_flux_scheduler, prompt_tables
from ee_diffusion.training.digits_text import (
    EOS,
    PAD,
    UNK,
    VOCABULARY,
    build_text_encoders,
    build_word_tokenizer,
)
from ee_diffusion.training.digits_vae import build_digits_vae, latent_normalisation, train_vae, vae_loss
from ee_diffusion.training.flow_matching import (
    FlowMatchingConfig,
    LatentDigits,
    flow_batch,
    flux_velocity,
    image_shift,
    pack,
    padding_bias,
    sample_sigmas,
    sample_text_lengths,
    train_flow_transformer,
)
from ee_diffusion.training.loop import optimise


def tiny_flux(seed: int = 0) -> FluxTransformer2DModel:
    torch.manual_seed(seed)
    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=8,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        axes_dims_rope=(2, 2, 4),
    )


def tiny_latents(n: int = 40) -> LatentDigits:
    """2 x 4 x 4 latents with a class-dependent bright spot, prompts of the text encoders' tables."""
    clip, t5 = build_text_encoders()
    tokenizer = build_word_tokenizer()
    pipe = FluxPipeline(
        scheduler=digits_flux_scheduler(),
        vae=None,
        text_encoder=clip,
        tokenizer=tokenizer,
        text_encoder_2=t5,
        tokenizer_2=tokenizer,
        transformer=None,
    )
    embeds, pooled, padding = prompt_tables(pipe, [digit_prompt(d) for d in range(10)] + [""])
    labels = torch.arange(n) % 10
    means = -torch.ones(n, 2, 4, 4)
    means.view(n, 2, 16)[torch.arange(n), 0, labels] = 1.0
    return LatentDigits(means, 0.05 * torch.ones_like(means), labels, embeds, pooled, padding, 10, 0.0, 1.0)


def fixed_loss(model: FluxTransformer2DModel, data: LatentDigits) -> float:
    config = TrainConfig(steps=1, batch_size=64, class_dropout=0.0)
    g = torch.Generator().manual_seed(123)
    noisy, sigmas, prompts, target, bias = flow_batch(data, config, FlowMatchingConfig(), digits_flux_scheduler(), g)
    with torch.no_grad():
        prediction = flux_velocity(
            model, noisy, sigmas, data.prompt_embeds[prompts], data.pooled_prompt_embeds[prompts], (4, 4), bias
        )
    return (prediction - target).pow(2).mean().item()


def test_word_tokenizer_pads_truncates_and_ends_prompts_as_flux_pipeline_calls_it(tmp_path):
    tokenizer = build_word_tokenizer(max_length=8)
    ids = tokenizer(
        ["a handwritten Seven", "", "a handwritten seven."],
        padding="max_length",
        max_length=8,
        truncation=True,
        return_tensors="pt",
    ).input_ids
    word = VOCABULARY.index
    assert ids.shape == (3, 8) and tokenizer.model_max_length == 8
    assert ids[0].tolist() == [word("a"), word("handwritten"), word("seven"), word(EOS)] + [word(PAD)] * 4
    assert ids[1].tolist() == [word(EOS)] + [word(PAD)] * 7
    assert ids[2, 3] == word(UNK)  # "." is no word of the vocabulary
    assert tokenizer(["a " * 20], padding="max_length", max_length=8, truncation=True).input_ids[0][-1] == word(EOS)
    tokenizer.save_pretrained(tmp_path)
    from transformers import AutoTokenizer

    again = AutoTokenizer.from_pretrained(tmp_path)
    assert again("a handwritten nine").input_ids == tokenizer("a handwritten nine").input_ids


def test_digit_prompts_and_their_refusal():
    assert digit_prompt(7) == "a handwritten seven" and digit_prompt(0) == "a handwritten zero"
    with pytest.raises(ValueError, match="got 10"):
        digit_prompt(10)
    with pytest.raises(ValueError, match="at least 4"):
        build_word_tokenizer(max_length=3)


def test_frozen_text_encoders_are_seeded_and_tell_the_prompts_apart():
    data = tiny_latents()
    clip, _ = build_text_encoders()
    again, _ = build_text_encoders()
    assert all(torch.equal(a, b) for a, b in zip(clip.state_dict().values(), again.state_dict().values()))
    assert not any(p.requires_grad for p in clip.parameters())
    pooled = torch.nn.functional.normalize(data.pooled_prompt_embeds, dim=1)
    similarity = pooled @ pooled.T
    assert (similarity - torch.eye(11)).max() < 0.99  # eleven different vectors
    assert data.prompt_embeds.shape == (11, 8, 32)


def test_t5_tokens_and_the_flux_output_are_the_same_at_any_max_sequence_length_the_training_emulates():
    """The T5 encoder acts on each token alone, so FluxPipeline's padding to `max_sequence_length` leaves the prompt's
    tokens as they are and adds identical ones, whose weight in attention the training emulates exactly."""
    data = tiny_latents()
    clip, t5 = build_text_encoders()
    tokenizer = build_word_tokenizer()
    pipe = FluxPipeline(digits_flux_scheduler(), None, clip, tokenizer, t5, tokenizer, None)
    prompts = ["a handwritten seven", ""]
    with torch.no_grad():
        long, pooled, _ = pipe.encode_prompt(prompts, None, device=torch.device("cpu"), max_sequence_length=40)
    short = data.prompt_embeds[[7, 10]]
    assert torch.equal(long[:, :8], short) and torch.equal(pooled, data.pooled_prompt_embeds[[7, 10]])
    assert torch.equal(long[:, 8:], long[:, 7:8].expand(-1, 32, -1))  # all padding tokens alike
    model = tiny_flux()
    for parameter in model.parameters():  # no zero-initialised layer left: every path counts
        parameter.data.normal_(0, 0.1, generator=torch.Generator().manual_seed(parameter.numel()))
    noisy, sigmas = torch.randn(2, 4, 8), torch.tensor([0.3, 0.9])
    with torch.no_grad():
        real = flux_velocity(model, noisy, sigmas, long, pooled, (4, 4))
        bias = padding_bias(data.padding[[7, 10]], torch.tensor([40.0, 40.0]))
        emulated = flux_velocity(model, noisy, sigmas, short, pooled, (4, 4), bias)
        plain = flux_velocity(model, noisy, sigmas, short, pooled, (4, 4))
    torch.testing.assert_close(emulated, real, rtol=0, atol=1e-5)
    assert (plain - real).abs().max() > 1e-2
    lengths = sample_text_lengths(1000, torch.Generator().manual_seed(0), FlowMatchingConfig(), 8)
    assert (lengths == 8).float().mean() == pytest.approx(0.5, abs=0.05) and 8 <= lengths.min() <= lengths.max() <= 512


def test_sigmas_follow_the_schedulers_shift_at_the_token_count():
    scheduler = digits_flux_scheduler()
    mu = image_shift(scheduler.config, 16)
    assert mu == pytest.approx(0.5 + (1.15 - 0.5) / (4096 - 256) * (16 - 256))
    u = torch.rand(1000, generator=torch.Generator().manual_seed(0))
    sigmas = sample_sigmas(1000, torch.Generator().manual_seed(0), FlowMatchingConfig("uniform"), scheduler, 16)
    torch.testing.assert_close(sigmas, scheduler.time_shift(mu, 1.0, u))
    # The sampler's grid at 16 tokens is shifted the same way.
    scheduler.set_timesteps(sigmas=[0.5], mu=mu)
    assert scheduler.sigmas[0].item() == pytest.approx(scheduler.time_shift(mu, 1.0, torch.tensor(0.5)).item())
    logit = sample_sigmas(4000, torch.Generator().manual_seed(0), FlowMatchingConfig(), scheduler, 16)
    assert 0 < logit.min() and logit.max() < 1 and abs(logit.median().item() - 1 / (1 + torch.e**-mu)) < 0.03
    with pytest.raises(ValueError, match="'normal'"):
        FlowMatchingConfig("normal")


def test_flow_batch_interpolates_latents_and_noise_and_targets_their_difference():
    data = tiny_latents()
    exact = LatentDigits(**{**data.__dict__, "stds": torch.zeros_like(data.stds), "shift_factor": 0.5})
    config = TrainConfig(steps=1, batch_size=16, class_dropout=0.5)
    generator = torch.Generator().manual_seed(0)
    index = torch.randint(len(exact), (16,), generator=torch.Generator().manual_seed(0))
    batch = flow_batch(exact, config, FlowMatchingConfig(), digits_flux_scheduler(), generator)
    noisy, sigmas, prompts, target, bias = batch
    x0 = pack((exact.means[index] - 0.5) * exact.scaling_factor)
    s = sigmas.view(-1, 1, 1)
    torch.testing.assert_close(noisy - s * target, x0, atol=1e-5, rtol=0)  # x_t = (1 - s) x0 + s n, target n - x0
    assert noisy.shape == (16, 4, 8) and ((prompts == 10) | (prompts == exact.prompts[index])).all()
    assert (prompts == 10).any()
    assert bias.shape == (16, 8) and (bias[~exact.padding[prompts]] == 0).all() and (bias > 0).any()


def test_flow_matching_training_reduces_the_loss_on_a_tiny_config():
    data, model = tiny_latents(), tiny_flux()
    before = fixed_loss(model, data)
    config = TrainConfig(steps=40, batch_size=32, learning_rate=3e-3, warmup_steps=5, ema_decay=0.9)
    result = train_flow_transformer(model, data, config, digits_flux_scheduler(), progress=False)
    assert result.steps_run == 40 and fixed_loss(model, data) < 0.6 * before


@pytest.mark.parametrize(
    "schedule",
    [
        ExitSchedule.step(2, [2, 2, 1, 1]),
        ExitSchedule.plan(2, [999, 666, 333, 0], [1, REUSE, 2, DROP]),  # reuse and drop: nothing to train
    ],
    ids=["schedule", "plan"],
)
def test_ase_flow_matching_runs_each_block_only_for_the_samples_of_its_depths_and_keeps_the_timestep_embedding(
    schedule,
):
    data, model = tiny_latents(), tiny_flux()
    frozen = {n: p.clone() for n, p in model.named_parameters() if "timestep_embedder" in n}
    assert frozen
    calls = []  # per transformer call: its timesteps as the schedule reads them (sigma * 1000)
    model.register_forward_pre_hook(lambda m, a, kw: calls.append((kw["timestep"] * 1000).tolist()), with_kwargs=True)
    runs = {0: [], 1: []}  # per exit unit (the double-, then the single-stream block): the batch of each run
    for unit, block in enumerate([model.transformer_blocks[0], model.single_transformer_blocks[0]]):
        # the block's normalisation: a skipped block's own call still reaches its hooks, not its inner modules
        count = lambda m, a, kw, u=unit: runs[u].append(len(a[0] if a else kw["hidden_states"]))  # noqa: E731
        (block.norm1 if unit == 0 else block.norm).register_forward_pre_hook(count, with_kwargs=True)
    config = TrainConfig(steps=3, batch_size=16, warmup_steps=1, freeze_timestep_embedding=True)
    train_flow_transformer(model, data, config, digits_flux_scheduler(), exit_schedule=schedule, progress=False)

    assert get_exit_schedule(model) is None and all(p.requires_grad for p in model.parameters())
    expected = {0: [], 1: []}
    for timesteps in calls:
        (depth,) = set(schedule.depths_for(timesteps))  # one depth per group
        assert depth in (1, 2)  # reused and dropped steps' samples never run
        for unit in range(depth):
            expected[unit].append(len(timesteps))
    assert runs == expected and len(calls) > 3
    assert sum(map(len, calls)) < 3 * 16 or schedule.config.shape != "plan"
    for name, parameter in model.named_parameters():
        if name in frozen:
            assert torch.equal(parameter, frozen[name]), name


def test_ase_flow_matching_without_a_schedule_is_the_plain_loss():
    """The grouped loss of one group (no schedule) is the plain mean squared error, bit for bit."""
    data, scheduler = tiny_latents(), digits_flux_scheduler()
    config = TrainConfig(steps=2, batch_size=8, warmup_steps=1)
    trained = tiny_flux()
    result = train_flow_transformer(trained, data, config, scheduler, progress=False)
    model, generator = tiny_flux(), torch.Generator().manual_seed(config.seed)
    noisy, sigmas, prompts, target, bias = flow_batch(data, config, FlowMatchingConfig(), scheduler, generator)
    prediction = flux_velocity(
        model, noisy, sigmas, data.prompt_embeds[prompts], data.pooled_prompt_embeds[prompts], (4, 4), bias
    )
    assert result.losses[0] == (prediction - target).pow(2).mean().item()


def test_ase_flow_matching_from_the_teacher_learns_the_full_depth_velocity_of_the_model_it_started_from():
    data, model = tiny_latents(), tiny_flux()
    config = TrainConfig(steps=1, batch_size=16, warmup_steps=1, target="teacher")
    assert train_flow_transformer(model, data, config, digits_flux_scheduler(), progress=False).losses == [0.0]
    schedule = ExitSchedule.step(2, [2, 1])  # the noisy half exits after the double-stream block
    config = TrainConfig(steps=30, batch_size=16, warmup_steps=1, learning_rate=3e-3, target="teacher")
    losses = train_flow_transformer(
        model, data, config, digits_flux_scheduler(), exit_schedule=schedule, progress=False
    ).losses
    assert losses[0] > 0 and sum(losses[-5:]) < 0.5 * sum(losses[:5])


def test_flow_matching_refuses_what_it_cannot_train():
    data = tiny_latents()
    with pytest.raises(ValueError, match="16 channels per token"):
        model = tiny_flux()
        model.register_to_config(in_channels=16)
        train_flow_transformer(model, data, TrainConfig(steps=1), digits_flux_scheduler(), progress=False)
    with pytest.raises(ValueError, match="'min-snr'"):
        config = TrainConfig(steps=1, loss_weight="min-snr")
        train_flow_transformer(tiny_flux(), data, config, digits_flux_scheduler(), progress=False)


def test_vae_training_reduces_its_loss_and_normalises_its_latents():
    images = -torch.ones(16, 1, 32, 32)
    images[torch.arange(16), 0, 2 * torch.arange(16)] = 1.0
    vae = build_digits_vae()

    def loss() -> float:
        with torch.no_grad():
            return vae_loss(vae, images, torch.Generator().manual_seed(1), 1e-4)[0].item()

    before = loss()
    config = TrainConfig(steps=15, batch_size=8, learning_rate=3e-3, warmup_steps=2, ema_decay=0.5)
    train_vae(vae, images, config, kl_weight=1e-4, progress=False)
    assert loss() < 0.7 * before
    means, stds = torch.randn(50, 4, 8, 8) * 3 + 2, torch.full((50, 4, 8, 8), 0.5)
    shift, scale = latent_normalisation(means, stds)
    normalised = (means + stds * torch.randn(means.shape) - shift) * scale
    assert abs(normalised.mean().item()) < 0.05 and abs(normalised.std().item() - 1) < 0.05


def test_an_interrupted_run_resumed_from_its_checkpoint_ends_where_an_uninterrupted_one_does(tmp_path):
    data = tiny_latents()
    config = TrainConfig(steps=6, batch_size=8, checkpoint_every=2, warmup_steps=1)
    scheduler = digits_flux_scheduler()
    whole = tiny_flux()
    train_flow_transformer(whole, data, config, scheduler, checkpoint=tmp_path / "a.pt", progress=False)

    calls = []
    model = tiny_flux()

    def interrupted(generator: torch.Generator) -> torch.Tensor:
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        noisy, sigmas, prompts, target, bias = flow_batch(data, config, FlowMatchingConfig(), scheduler, generator)
        prediction = flux_velocity(
            model, noisy, sigmas, data.prompt_embeds[prompts], data.pooled_prompt_embeds[prompts], (4, 4), bias
        )
        return (prediction - target).pow(2).mean()

    settings = {
        **FlowMatchingConfig().__dict__,
        "scheduler": {k: v for k, v in scheduler.config.items() if not k.startswith("_")},
        "latents": list(data.means.shape),
    }
    with pytest.raises(KeyboardInterrupt):
        optimise(
            {"model": model}, interrupted, config, checkpoint=tmp_path / "b.pt", settings=settings, progress=False
        )
    resumed = tiny_flux(seed=1)  # other weights: the checkpoint's replace them
    result = train_flow_transformer(
        resumed, data, config, scheduler, checkpoint=tmp_path / "b.pt", resume=True, progress=False
    )
    assert result.steps_run == 4
    for a, b in zip(whole.parameters(), resumed.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="was written by another run"):
        other = TrainConfig(steps=7, batch_size=8, checkpoint_every=2, warmup_steps=1)
        train_flow_transformer(tiny_flux(), data, other, scheduler, checkpoint=tmp_path / "b.pt", resume=True)


def test_bench_names_build_flow_matching_schedulers_for_a_flow_model_and_refuse_the_others():
    flow = digits_flux_scheduler().config
    assert is_flow_matching(flow) and schedulers_for(flow) == ["dpm-solver++", "euler"]
    solver = build_scheduler("dpm-solver++", flow)
    assert isinstance(solver, DPMSolverMultistepScheduler)
    assert solver.config.use_flow_sigmas and solver.config.prediction_type == "flow_prediction"
    assert solver.config.use_dynamic_shifting and solver.config.algorithm_type == "dpmsolver++"
    euler = build_scheduler("euler", solver.config)  # built back from a solver's config: no flow-sigma settings left
    assert type(euler) is FlowMatchEulerDiscreteScheduler and "use_flow_sigmas" not in euler.config
    for name in ("ddim", "ddpm"):
        with pytest.raises(ValueError, match=f"'{name}' samples DDPM-trained models.*dpm-solver\\+\\+, euler"):
            build_scheduler(name, flow)
    ddpm = DDPMScheduler(num_train_timesteps=1000, prediction_type="v_prediction").config
    assert not is_flow_matching(ddpm) and schedulers_for(ddpm) == list(SCHEDULERS)
    assert not build_scheduler("dpm-solver++", ddpm).config.use_flow_sigmas
    static = FlowMatchEulerDiscreteScheduler(shift=3.0).config
    assert build_scheduler("dpm-solver++", static).config.flow_shift == 3.0


def test_train_flux_writes_a_flux_pipeline_folder_that_loads_and_samples(tmp_path):
    out = tmp_path / "flux"
    argv = ["train-flux", "--out", str(out), "--vae-steps", "1", "--vae-batch-size", "4", "--steps", "1"]
    argv += ["--batch-size", "4", "--eval-samples", "2", "--eval-steps", "1", "--eval-text-lengths", "8,16"]
    argv += ["--threads", "1"]
    assert main(argv) == 0
    assert (out / "checkpoint.pt").exists() and (out / "vae" / "checkpoint.pt").exists()
    card = (out / "README.md").read_text()
    assert "ee-diffusion train-flux --out" in card and "| euler | 1 | 8 | off |" in card
    assert "| euler | 1 | 16 | off |" in card and "| dpm-solver++ | 1 | 8 | 2 |" in card
    from safetensors.torch import load_file

    assert all(
        t.dtype == torch.float16
        for t in load_file(out / "transformer" / "diffusion_pytorch_model.safetensors").values()
    )
    pipe = DiffusionPipeline.from_pretrained(out)
    assert type(pipe) is FluxPipeline and pipe.vae_scale_factor == 4
    pipe.set_progress_bar_config(disable=True)
    images = pipe(
        "a handwritten seven", height=32, width=32, num_inference_steps=2, max_sequence_length=8, output_type="pt"
    ).images
    assert images.shape == (1, 1, 32, 32) and torch.isfinite(images).all()
    with pytest.raises(SystemExit):
        main([*argv[:3], "--eval-cfg", "1"])  # guidance scales above 1 only
    assert main([*argv[:3], "--eval-text-lengths", "8,600"]) == 2  # FluxPipeline's limit, before any training
