"""The README cards of the models the training commands write: what the model is, the command that made it, and the
machine and time it took."""

from __future__ import annotations

import platform

import torch

DIGITS_DATA = (
    "Data: scikit-learn `load_digits()`, train split of `ee_diffusion.data.load_digits_split` (seed 0, 80% of\n"
    "each class), 8x8 scans upsampled to 32x32 in [-1, 1]. Pixel space, no VAE.\n\n"
)


def hardware(device: str | torch.device) -> str:
    """The machine a run used, in words."""
    if torch.device(device).type == "cuda":
        return f"one {torch.cuda.get_device_name(device)}"
    threads = torch.get_num_threads()
    return f"{threads} CPU thread{'s' if threads > 1 else ''} ({platform.processor() or platform.machine()})"


def digits_model_card(
    title: str,
    command: str,
    total_steps: int,
    steps_run: int,
    seconds: float,
    batch_size: int,
    device: str | torch.device,
    extra: str = "",
    results: str = "docs/results.md",
) -> str:
    """The card of a trained digits denoiser (or of exit heads trained for one): `extra` says what sets it apart,
    `results` which page of the project's docs holds its measurements."""
    return (
        f"# {title}\n\n{DIGITS_DATA}{extra}"
        f"Trained with:\n\n```\n{command}\n```\n\n"
        f"Steps: {total_steps} (batch {batch_size}); time: {seconds / 60:.1f} min for the last {steps_run} steps on "
        f"{hardware(device)}.\n\n"
        f"Metrics: see {results} of the project (commands there).\n"
    )


def digits_classifier_card(command: str, epochs: int, seconds: float, accuracy: float) -> str:
    """The card of the digits feature network."""
    return (
        "# digits-classifier\n\nThe digits feature network of `ee_diffusion.metrics` (FID/KID features and class "
        "accuracy of the digits models).\nData: train split of `ee_diffusion.data.load_digits_split` (seed 0), random "
        f"shifts of up to 2 pixels.\n\nTrained with:\n\n```\n{command}\n```\n\n"
        f"{epochs} epochs in {seconds:.0f} s on {hardware('cpu')}. Held-out accuracy (359 images never trained on): "
        f"{accuracy:.2%}.\n"
    )


def masked_lm_card(
    title: str, folder, command: str, config, losses: list[float], seconds: float, device: str | torch.device
) -> str:
    """The card of a masked diffusion LM `ee-diffusion train-mdlm` wrote to `folder` (its `config.json` read back):
    the model, the tasks, the command, the steps and time of this run and its last losses."""
    from transformers import BertConfig

    model = BertConfig.from_pretrained(folder)
    window = losses[-min(len(losses), 1000) :]
    stop = config.last_step
    schedule = "" if stop == config.steps else f" (stopped at step {stop} of its {config.steps}-step schedule)"
    return (
        f"# {title}\n\n"
        f"A masked diffusion language model: a transformers `BertForMaskedLM` ({model.num_hidden_layers} layers, "
        f"hidden {model.hidden_size}, {model.num_attention_heads} heads) with ee-diffusion's character tokenizer, "
        "trained with the masked-diffusion objective (`ee_diffusion.training.mdlm`) on problems drawn fresh at "
        f"every step: {', '.join(dict.fromkeys(config.tasks))}"
        + (f", starting from `{config.init_from}`" if config.init_from else "")
        + ". `MaskedDiffusionLMPipeline.from_pretrained(folder)` loads it with its decoding defaults "
        "(`generation_config.json`).\n\n"
        f"Trained with:\n\n```\n{command}\n```\n\n"
        f"Steps: {stop}{schedule}, batch {config.batch_size}, AdamW peak learning rate {config.learning_rate:g}, "
        f"seed {config.seed}; time: {seconds / 60:.1f} min for the last {len(losses)} steps on "
        f"{hardware(device)}. Mean training loss over the last {len(window)} steps: "
        f"{sum(window) / len(window):.4f}.\n\n"
        "Accuracy (exact match on fresh problems, with and without early commit): `ee-diffusion dllm-bench --model "
        "FOLDER`; see docs/dllm.md of the project.\n"
    )


def digits_flux_card(
    pipe,
    command: str,
    config,
    vae_result,
    result,
    device: str | torch.device,
    accuracies: list[tuple[str, int, float, float]],
    num_samples: int = 500,
    steps: int = 28,
) -> str:
    """The card of `digits-flux`: its parts and sizes, the command and time of its two stages, and the class accuracy
    of its samples (`accuracies`: scheduler, max_sequence_length, true_cfg_scale, accuracy)."""
    import textwrap

    from .digits_text import TEXT_LENGTH

    count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    transformer, vae, clip = pipe.transformer.config, pipe.vae.config, pipe.text_encoder.config
    side = 32 // pipe.vae_scale_factor
    flow = config.flow
    paragraphs = [
        "A text-to-image `FluxPipeline` of the digits: `DiffusionPipeline.from_pretrained(folder)` loads it offline "
        f'and `pipe("a handwritten seven", height=32, width=32, max_sequence_length={TEXT_LENGTH})` samples a '
        "1 x 32 x 32 image (prompts `a handwritten zero` ... `a handwritten nine`; any `max_sequence_length` up to "
        f"{flow.max_text_length} gives the same digits, {TEXT_LENGTH} is the fastest).",
        DIGITS_DATA.replace(" Pixel space, no VAE.", "").strip(),
    ]
    parts = [
        f"transformer: `FluxTransformer2DModel`, {transformer.num_layers} double-stream and "
        f"{transformer.num_single_layers} single-stream blocks, {transformer.num_attention_heads} heads of "
        f"{transformer.attention_head_dim}, no guidance embedding, {count(pipe.transformer) / 1e6:.2f}M parameters;",
        f"VAE: `AutoencoderKL`, channels {tuple(vae.block_out_channels)} (scale factor {pipe.vae_scale_factor}), "
        f"latents {vae.latent_channels} x {side} x {side} ({(side // 2) ** 2} image tokens once packed 2x2), "
        f"{count(pipe.vae) / 1e6:.2f}M parameters;",
        "text: one word-level tokenizer (the words of the prompts, `</s>` after them, `<pad>` to the length asked) "
        f"for a `CLIPTextModel` and a `T5EncoderModel` of {clip.num_hidden_layers} layers and {clip.hidden_size} "
        "dimensions each, left at their seeded random initialisation (but for the T5 encoder's self-attention output "
        "projections, set to zero so that it acts on each token alone) and frozen: the transformer learned to read "
        "them;",
        "scheduler: `FlowMatchEulerDiscreteScheduler` with Flux's dynamic shift.",
    ]
    stages = (
        f"VAE: {config.vae.steps} steps (batch {config.vae.batch_size}, KL weight {config.kl_weight:g}); time: "
        f"{_stage_time(vae_result)}. Transformer: {config.transformer.steps} steps (batch "
        f"{config.transformer.batch_size}, rectified flow, {flow.sigma_sampling} noise levels with the scheduler's "
        f"shift, prompt dropout {config.transformer.class_dropout:g}, T5 lengths {TEXT_LENGTH} to "
        f"{flow.max_text_length} emulated for {flow.long_text_share:.0%} of the samples); time: "
        f"{_stage_time(result)}. Both on {hardware(device)}."
    )
    text = "\n\n".join(textwrap.fill(paragraph, 119) for paragraph in paragraphs) + "\n\n"
    text += "".join(textwrap.fill(part, 119, initial_indent="- ", subsequent_indent="  ") + "\n" for part in parts)
    text += f"\nTrained with:\n\n```\n{command}\n```\n\n{textwrap.fill(stages, 119)}\n"
    text += _accuracy_table(accuracies, num_samples, steps, "the command above at the end of training")
    return f"# digits-flux\n\n{text}"


def digits_flux_finetuned_card(
    title: str,
    base: str,
    command: str,
    schedule,
    config,
    result,
    device: str | torch.device,
    accuracies: list[tuple[str, int, float, float]],
    num_samples: int = 500,
    steps: int = 28,
) -> str:
    """The card of a `digits-flux` ASE fine-tuned under `schedule` (from `base`): what changed, the command and its
    time, and the class accuracy of its samples under the schedule."""
    import textwrap

    what = (
        f"`{base}` (a text-to-image `FluxPipeline` of the digits) with its transformer ASE fine-tuned under the exit "
        f"schedule `{schedule.describe()}` (saved in `exit_schedule/`; "
        "`EarlyExitFluxPipeline.from_pretrained(folder)` samples under it): each training sample's velocity comes "
        "from its noise level's depth, the timestep embedding is frozen, the VAE and text encoders are the base "
        "model's."
    )
    stage = (
        f"Steps: {config.steps} (batch {config.batch_size}, learning rate {config.learning_rate:g}, rectified flow as "
        f"the base model was trained, prompt dropout {config.class_dropout:g}, {_TARGETS[config.target]}); time: "
        f"{_stage_time(result)} on "
        f"{hardware(device)}."
    )
    text = f"# {title}\n\n{textwrap.fill(what, 119)}\n\nTrained with:\n\n```\n{command}\n```\n\n"
    text += textwrap.fill(stage, 119) + "\n"
    text += _accuracy_table(
        accuracies, num_samples, steps, "the command above, on the saved weights, under the schedule"
    )
    return text + "\nMetrics: see docs/results.md of the project (commands there).\n"


_TARGETS = {
    "data": "each exit learning the velocity `noise - x0`",
    "teacher": "each exit learning the base model's full-depth velocity",
}


def _accuracy_table(accuracies: list[tuple[str, int, float, float]], num_samples: int, steps: int, by: str) -> str:
    """The class-accuracy table of a digits-flux card (`accuracies`: scheduler, max_sequence_length, true_cfg_scale,
    accuracy), measured `by` what it says; empty without rows."""
    import textwrap

    if not accuracies:
        return ""
    measured = (
        "Class accuracy (the digits classifier of `ee_diffusion.metrics` recognises the digit the prompt names), "
        f"{num_samples} samples per row (prompts for 0..9 in turn, one generator seeded 0), measured by {by}:"
    )
    rows = "".join(
        f"| {name} | {steps} | {length} | {'off' if scale == 1 else f'{scale:g}'} | {accuracy:.1%} |\n"
        for name, length, scale, accuracy in accuracies
    )
    header = "| scheduler | steps | max_sequence_length | true_cfg_scale | accuracy |\n|---|---|---|---|---|\n"
    return f"\n{textwrap.fill(measured, 119)}\n\n{header}{rows}"


def _stage_time(result) -> str:
    if result.steps_run == 0:
        return "none in this run (loaded from its finished checkpoint)"
    return f"{result.seconds / 60:.1f} min for the last {result.steps_run} steps"
