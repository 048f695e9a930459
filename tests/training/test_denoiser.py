import pytest
import torch
from diffusers import DDPMScheduler, DiTTransformer2DModel, UNet2DModel

from ee_diffusion import ExitSchedule, apply_exit_schedule, num_exit_blocks, remove_exit_schedule
from ee_diffusion.data import DigitsSplit
from ee_diffusion.exits import get_exit_schedule
from ee_diffusion.schedules import REUSE
from ee_diffusion.training import TrainConfig, depth_groups, freeze_timestep_embedding, loss_weights, train_denoiser

NUM_BLOCKS = 4


def tiny_dit(seed: int = 0) -> DiTTransformer2DModel:
    torch.manual_seed(seed)
    return DiTTransformer2DModel(
        in_channels=1,
        out_channels=1,
        sample_size=8,
        patch_size=2,
        num_layers=NUM_BLOCKS,
        num_attention_heads=2,
        attention_head_dim=8,
        num_embeds_ada_norm=10,
    )


def tiny_unet(seed: int = 0) -> UNet2DModel:
    torch.manual_seed(seed)
    return UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        layers_per_block=1,
        block_out_channels=(8, 16),
        norm_num_groups=4,
        attention_head_dim=8,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        num_class_embeds=11,
    )


def tiny_data(n: int = 32) -> DigitsSplit:
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(n) % 10
    # A learnable pattern: a class-dependent bright row on a dark background.
    images = -torch.ones(n, 1, 8, 8)
    images[torch.arange(n), 0, labels % 8] = 1.0
    return DigitsSplit(images=images + 0.05 * torch.randn(images.shape, generator=g), labels=labels)


def fixed_loss(model: torch.nn.Module, data: DigitsSplit, prediction_type: str = "epsilon", low: int = 0) -> float:
    """MSE against the noise (or the velocity) on a fixed draw of timesteps (from `low` up) and noise."""
    g = torch.Generator().manual_seed(123)
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    timesteps = torch.randint(low, 1000, (len(data),), generator=g)
    noise = torch.randn(data.images.shape, generator=g)
    target = noise if prediction_type == "epsilon" else scheduler.get_velocity(data.images, noise, timesteps)
    with torch.no_grad():
        prediction = model(scheduler.add_noise(data.images, noise, timesteps), timesteps, class_labels=data.labels)
    return (prediction.sample - target).pow(2).mean().item()


QUICK = dict(steps=12, batch_size=16, learning_rate=2e-3, warmup_steps=1, checkpoint_every=100)


@pytest.mark.parametrize("make_model", [tiny_dit, tiny_unet], ids=["dit", "unet"])
def test_training_reduces_the_loss(make_model):
    model, data = make_model(), tiny_data()
    before = fixed_loss(model, data)
    result = train_denoiser(model, data, TrainConfig(**QUICK), progress=False)
    assert result.steps_run == 12 and len(result.losses) == 12
    assert fixed_loss(model, data) < 0.8 * before
    assert not model.training


@pytest.mark.parametrize("make_model", [tiny_dit, tiny_unet], ids=["dit", "unet"])
def test_training_learns_what_the_noise_scheduler_says_the_model_predicts(make_model):
    data, models = tiny_data(), {}
    for prediction_type in ("epsilon", "v_prediction"):
        models[prediction_type] = make_model()  # same initial weights, same batches and noise
        noise_scheduler = DDPMScheduler(num_train_timesteps=1000, prediction_type=prediction_type)
        train_denoiser(
            models[prediction_type], data, TrainConfig(**QUICK), noise_scheduler=noise_scheduler, progress=False
        )
    # Scored at the noisy steps, where the two targets part (the velocity is about minus the image, the noise about
    # the input): each model is the better one at its own target.
    for own, other in (("epsilon", "v_prediction"), ("v_prediction", "epsilon")):
        assert fixed_loss(models[own], data, own, low=800) < fixed_loss(models[other], data, own, low=800)


def test_training_refuses_a_prediction_type_it_cannot_train_before_any_step():
    noise_scheduler = DDPMScheduler(num_train_timesteps=1000, prediction_type="sample")
    with pytest.raises(ValueError, match="predicting 'sample'; expected one of \\('epsilon', 'v_prediction'\\)"):
        train_denoiser(tiny_dit(), tiny_data(), TrainConfig(**QUICK), noise_scheduler=noise_scheduler, progress=False)


@pytest.mark.parametrize("make_model", [tiny_dit, tiny_unet], ids=["dit", "unet"])
def test_ase_step_reduces_the_loss_under_the_schedule_and_keeps_the_timestep_embedding(make_model):
    model, data = make_model(), tiny_data()
    schedule = ExitSchedule.linear(num_exit_blocks(model), 1)
    frozen = {n: p.clone() for n, p in model.named_parameters() if "timestep_embedder" in n or "time_embedding" in n}
    assert frozen
    apply_exit_schedule(model, schedule)
    before = fixed_loss(model, data)
    remove_exit_schedule(model)
    config = TrainConfig(**QUICK, freeze_timestep_embedding=True, loss_weight="min-snr")
    train_denoiser(model, data, config, exit_schedule=schedule, progress=False)
    assert get_exit_schedule(model) is None  # the schedule is removed again after training
    apply_exit_schedule(model, schedule)
    assert fixed_loss(model, data) < 0.8 * before
    for name, parameter in model.named_parameters():
        if name in frozen:
            assert torch.equal(parameter, frozen[name]), name
        assert parameter.requires_grad


@pytest.mark.parametrize(
    "schedule",
    [
        ExitSchedule.step(NUM_BLOCKS, [4, 4, 3, 3, 2, 2, 1, 1, 1, 1]),
        ExitSchedule.plan(NUM_BLOCKS, [999, 666, 333, 0], [4, REUSE, 2, REUSE]),  # reuse steps: nothing to train
    ],
    ids=["schedule", "plan"],
)
def test_ase_training_runs_each_block_only_for_the_samples_that_use_it(schedule):
    model, data = tiny_dit(), tiny_data()
    calls = []  # per denoiser call: its timesteps
    block_batches = [[] for _ in range(NUM_BLOCKS)]  # per block: the batch size of each of its runs
    model.register_forward_pre_hook(lambda m, args, kwargs: calls.append(args[1].tolist()), with_kwargs=True)
    for i, block in enumerate(model.transformer_blocks):
        block.attn1.register_forward_pre_hook(
            lambda m, args, kwargs, i=i: block_batches[i].append(args[0].shape[0]), with_kwargs=True
        )
    train_denoiser(model, data, TrainConfig(**{**QUICK, "steps": 3}), exit_schedule=schedule, progress=False)

    assert len(calls) > 3  # more than one group per step
    expected = [[] for _ in range(NUM_BLOCKS)]
    for timesteps in calls:
        depths = set(schedule.depths_for(timesteps))
        assert len(depths) == 1, "a group mixes depths"
        for i in range(depths.pop()):
            expected[i].append(len(timesteps))
    assert block_batches == expected
    assert all(REUSE not in schedule.depths_for(timesteps) for timesteps in calls)
    executed = sum(map(sum, block_batches))
    assert executed == sum(sum(schedule.depths_for(t)) for t in calls) < 3 * QUICK["batch_size"] * NUM_BLOCKS


def test_ase_from_the_teacher_learns_the_full_depth_output_of_the_model_it_started_from():
    model, data = tiny_dit(), tiny_data()
    assert train_denoiser(
        model, data, TrainConfig(**{**QUICK, "steps": 1, "target": "teacher"}), progress=False
    ).losses == [0.0]
    teacher = tiny_dit()
    schedule = ExitSchedule.linear(NUM_BLOCKS, 1)
    config = TrainConfig(**{**QUICK, "steps": 30, "target": "teacher"})
    losses = train_denoiser(model, data, config, exit_schedule=schedule, progress=False).losses
    assert losses[0] > 0 and sum(losses[-5:]) < 0.5 * sum(losses[:5])

    def gap(student: torch.nn.Module) -> float:  # distance to the teacher's full-depth output, under the schedule
        timesteps = torch.arange(0, 1000, 1000 // len(data))[: len(data)]
        noisy = torch.randn(data.images.shape, generator=torch.Generator().manual_seed(5))
        apply_exit_schedule(student, schedule)
        try:
            with torch.no_grad():
                out = student(noisy, timesteps, class_labels=data.labels).sample
                return (out - teacher(noisy, timesteps, class_labels=data.labels).sample).pow(2).mean().item()
        finally:
            remove_exit_schedule(student)

    assert gap(model) < 0.5 * gap(tiny_dit())


def test_depth_groups():
    groups = depth_groups([3, 1, 3, 2])
    assert {depth: members.tolist() for depth, members in groups.items()} == {1: [1], 2: [3], 3: [0, 2]}


def test_resume_continues_bit_identically(tmp_path):
    data, config = tiny_data(), TrainConfig(**{**QUICK, "steps": 4, "checkpoint_every": 2})
    straight = tiny_dit()
    train_denoiser(straight, data, config, out_dir=tmp_path / "straight", progress=False)

    interrupted, forwards = tiny_dit(), []

    def crash_on_third_step(module, args):
        forwards.append(1)
        if len(forwards) == 3:
            raise KeyboardInterrupt

    handle = interrupted.register_forward_pre_hook(crash_on_third_step)
    with pytest.raises(KeyboardInterrupt):
        train_denoiser(interrupted, data, config, out_dir=tmp_path / "resumed", progress=False)
    handle.remove()
    resumed = tiny_dit()
    result = train_denoiser(resumed, data, config, out_dir=tmp_path / "resumed", resume=True, progress=False)
    assert (result.steps_run, result.total_steps) == (2, 4)
    for a, b in zip(straight.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)

    resume = dict(data=data, out_dir=tmp_path / "resumed", resume=True, progress=False)
    with pytest.raises(ValueError, match=r"written by another run \(steps: 4 there, 5 now\)"):
        train_denoiser(tiny_dit(), config=TrainConfig(**{**QUICK, "steps": 5, "checkpoint_every": 2}), **resume)
    # what else the run depends on: the model it started from, what it predicts, the schedule it is fine-tuned under
    with pytest.raises(ValueError, match=r"written by another run \(start_weights: "):
        train_denoiser(tiny_dit(seed=1), config=config, **resume)
    with pytest.raises(ValueError, match=r"written by another run \(noise_scheduler: "):
        scheduler = DDPMScheduler(num_train_timesteps=1000, prediction_type="v_prediction")
        train_denoiser(tiny_dit(), config=config, noise_scheduler=scheduler, **resume)
    with pytest.raises(ValueError, match=r"written by another run \(exit_schedule: None there, "):
        train_denoiser(tiny_dit(), config=config, exit_schedule=ExitSchedule.linear(NUM_BLOCKS, 1), **resume)
    checkpoint = tmp_path / "resumed" / "checkpoint.pt"
    checkpoint.write_bytes(checkpoint.read_bytes()[:100])  # cut short, as by a crash while writing it in place
    with pytest.raises(ValueError, match="it is not a readable checkpoint"):
        train_denoiser(tiny_dit(), config=config, **resume)
    with pytest.raises(FileNotFoundError, match="no checkpoint.pt"):
        train_denoiser(tiny_dit(), data, config, out_dir=tmp_path / "nothing", resume=True, progress=False)


def test_loss_weights():
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    timesteps = torch.tensor([0, 100, 500, 999])
    assert torch.equal(loss_weights(timesteps, scheduler, "constant"), torch.ones(4))
    weights = loss_weights(timesteps, scheduler, "min-snr", gamma=5.0)
    assert weights[0] < weights[1] < 1.0  # clean timesteps (high SNR) are down-weighted
    assert weights[2] == 1.0 and weights[3] == 1.0  # noisy ones keep full weight
    velocity = DDPMScheduler(num_train_timesteps=1000, prediction_type="v_prediction")
    snr = velocity.alphas_cumprod[timesteps] / (1 - velocity.alphas_cumprod[timesteps])
    # min(SNR, 5) / (SNR + 1): the velocity's error is (SNR + 1) times the noise's, weighted as the noise's would be
    torch.testing.assert_close(loss_weights(timesteps, velocity, "min-snr", gamma=5.0), snr.clamp(max=5) / (snr + 1))


@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(steps=0), "`steps` must be at least 1"),
        (dict(loss_weight="snr"), "`loss_weight` must be one of"),
        (dict(class_dropout=1.0), r"`class_dropout` must be in \[0, 1\)"),
        (dict(ema_decay=1.0), r"`ema_decay` must be in \(0, 1\)"),
        (dict(target="labels"), r"`target` must be one of \(.data., .teacher.\), got .labels."),
    ],
)
def test_bad_config(overrides, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**overrides)


def test_freeze_needs_a_timestep_embedding():
    with pytest.raises(ValueError, match="no timestep-embedding parameters"):
        freeze_timestep_embedding(torch.nn.Linear(2, 2))
