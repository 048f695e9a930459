"""The sampling loop of class-conditional image denoisers (DiT, UNet2DModel), in latent space or in pixel space.

It is diffusers' `DiTPipeline.__call__` (same arguments, noise, guidance and decoding: with DDIM or DPM-Solver++ and a
VAE the images are bit-identical) except where that loop is tied to DiT-XL/2 or is wrong for some schedulers:

- the VAE is optional: without one the denoised pixels are the images, so a 10-class pixel-space DiT or U-Net trained
  in this package samples through the same loop as DiT-XL/2;
- the unconditional label is the model's own null class (`null_class_label`; 1000 for DiT-XL/2, as in diffusers);
- the first noise is scaled by the scheduler's `init_noise_sigma` (`DiTPipeline` does not, so under Euler, whose first
  sigma is 157 with DiT-XL/2's betas, it starts from noise 157 times too small);
- a stochastic scheduler (DDPM) draws its noise from `generator` (`DiTPipeline` draws it from torch's global random
  state, so its samples do not follow the generator);
- `output_type="latent"` returns the denoised latents undecoded, as other diffusers pipelines do (`DiTPipeline` has
  no such option);
- bad arguments (labels outside the model's classes, zero steps, a non-finite guidance scale) raise before sampling.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from diffusers import DiTTransformer2DModel, UNet2DModel
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor

from ..validation import as_int, as_number


def null_class_label(denoiser: torch.nn.Module) -> int:
    """The label that means "no class" for classifier-free guidance.

    A class-conditional `DiTTransformer2DModel` keeps it after its `num_embeds_ada_norm` classes (1000 for DiT-XL/2).
    A `UNet2DModel` has no such slot of its own: by this package's convention, its last class embedding is the null
    class (the digits U-Net has `num_class_embeds=11`: digits 0-9 and the null label 10).
    """
    if isinstance(denoiser, DiTTransformer2DModel):
        return int(denoiser.config.num_embeds_ada_norm)
    if isinstance(denoiser, UNet2DModel) and denoiser.config.num_class_embeds:
        return int(denoiser.config.num_class_embeds) - 1
    raise TypeError(f"{type(denoiser).__name__} is not a class-conditional DiTTransformer2DModel or UNet2DModel.")


def _checked_labels(class_labels: Any, num_classes: int) -> torch.Tensor:
    """`class_labels` as a flat long tensor, every label a class id in `[0, num_classes)` (the null class excluded)."""
    labels = torch.as_tensor(class_labels).reshape(-1)
    if labels.numel() == 0:
        raise ValueError("`class_labels` is empty: give one class id per image.")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"`class_labels` must be integer class ids, got {class_labels!r}.")
    bad = labels[(labels < 0) | (labels >= num_classes)]
    if bad.numel():
        raise ValueError(
            f"`class_labels` must lie in [0, {num_classes - 1}] (this model has {num_classes} classes; "
            f"{num_classes} is its null class), got {bad.tolist()}."
        )
    return labels.long()


class ClassConditionalSamplingMixin:
    """`__call__` for pipelines whose denoiser (attribute `_denoiser_name`) takes `(sample, timestep, class_labels)`.

    The pipeline has a `scheduler`, an optional `vae` (`None`: pixel space) and the usual `progress_bar`.
    """

    _denoiser_name = "transformer"

    @torch.no_grad()
    def __call__(
        self,
        class_labels: list[int] | torch.Tensor,
        guidance_scale: float = 4.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        num_inference_steps: int = 50,
        output_type: str | None = "pil",
        return_dict: bool = True,
    ) -> ImagePipelineOutput | tuple:
        """Generate one image per class label.

        Args:
            class_labels: Class ids, one per image.
            guidance_scale: Classifier-free guidance scale; guidance (a doubled batch) is on when it is above 1.
            generator: Generator(s) of the initial noise and of stochastic scheduler steps.
            num_inference_steps: Number of scheduler steps.
            output_type: `"pil"`, `"np"` (NHWC in [0, 1]), `"pt"` (NCHW in [0, 1]) or `"latent"` (the denoised
                latents, NCHW, undecoded).
            return_dict: Return an `ImagePipelineOutput` instead of a tuple.
        """
        if output_type not in ("pil", "np", "pt", "latent"):
            raise ValueError(f"`output_type` must be 'pil', 'np', 'pt' or 'latent', got {output_type!r}.")
        as_int("num_inference_steps", num_inference_steps, low=1)
        as_number("guidance_scale", guidance_scale)
        denoiser = getattr(self, self._denoiser_name)
        device = self._execution_device
        labels = _checked_labels(class_labels, null_class_label(denoiser)).to(device)
        guided = guidance_scale > 1
        channels, size = denoiser.config.in_channels, denoiser.config.sample_size
        latents = randn_tensor(
            (len(labels), channels, size, size), generator=generator, device=device, dtype=denoiser.dtype
        )
        if guided:
            labels = torch.cat([labels, torch.full_like(labels, null_class_label(denoiser))])
        latents = latents * self.scheduler.init_noise_sigma

        self.scheduler.set_timesteps(num_inference_steps, device=device)
        step_kwargs = (
            {"generator": generator} if "generator" in inspect.signature(self.scheduler.step).parameters else {}
        )
        for t in self.progress_bar(self.scheduler.timesteps):
            model_input = torch.cat([latents, latents]) if guided else latents
            model_input = self.scheduler.scale_model_input(model_input, t)
            timesteps = t.expand(len(model_input)) if torch.is_tensor(t) else torch.full((len(model_input),), t)
            noise_pred = denoiser(model_input, timesteps.to(device), class_labels=labels).sample
            noise_pred = noise_pred[:, :channels]  # a learned variance (DiT's extra channels) is not used to sample
            if guided:
                cond, uncond = noise_pred.chunk(2)
                noise_pred = uncond + guidance_scale * (cond - uncond)
            latents = self.scheduler.step(noise_pred, t, latents, **step_kwargs).prev_sample

        images = latents if output_type == "latent" else self._decode(latents, output_type)
        self.maybe_free_model_hooks()
        return ImagePipelineOutput(images=images) if return_dict else (images,)

    def _decode(self, latents: torch.Tensor, output_type: str) -> Any:
        """Images in [0, 1] of the denoised latents (pixels without a VAE), as `output_type` asks."""
        vae = getattr(self, "vae", None)
        images = latents if vae is None else vae.decode(1 / vae.config.scaling_factor * latents).sample
        images = (images / 2 + 0.5).clamp(0, 1)
        if output_type != "pt":
            images = images.cpu().permute(0, 2, 3, 1).float().numpy()
            if output_type == "pil":
                images = self.numpy_to_pil(images)
        return images
