"""A stand-in for the parts of ComfyUI the early-exit node touches (ComfyUI is not installed in CI).

It follows ComfyUI's own code paths, re-written small: `ModelPatcher` (clone deep-copies `model_options` and copies
the keyed wrappers; `set_model_patch_replace` copies the dicts it changes), the wrapper executor (each wrapper gets the
executor, whose `class_obj` is the `BaseModel`), `BaseModel.apply_model` (APPLY_MODEL wrappers, then the diffusion
model at `model_sampling.timestep(sigma)`), the cond-batch step (the model's wrappers merged into
`transformer_options`, `"sigmas"` set per call), the three `model_sampling` kinds, and tiny diffusion models whose
forward honours `transformer_options["patches_replace"]["dit"]` the way ComfyUI's Flux and MMDiT forwards do.
"""

# ruff: noqa: B006  (the signatures are ComfyUI's, `transformer_options={}` defaults included)
from __future__ import annotations

import copy
import math

import torch
from torch import nn

APPLY_MODEL = "apply_model"
DIFFUSION_MODEL = "diffusion_model"


# ------------------------------------------------------------------ patcher_extension
class WrapperExecutor:
    def __init__(self, original, class_obj, wrappers, idx):
        self.original, self.class_obj, self.wrappers, self.idx = original, class_obj, list(wrappers), idx

    def __call__(self, *args, **kwargs):
        return WrapperExecutor(self.original, self.class_obj, self.wrappers, self.idx + 1).execute(*args, **kwargs)

    def execute(self, *args, **kwargs):
        if self.idx == len(self.wrappers):
            return self.original(*args, **kwargs)
        return self.wrappers[self.idx](self, *args, **kwargs)


def get_all_wrappers(wrapper_type: str, transformer_options: dict) -> list:
    return [w for ws in transformer_options.get("wrappers", {}).get(wrapper_type, {}).values() for w in ws]


def merge_wrappers(target: dict, wrappers: dict) -> None:
    for wrapper_type, keyed in wrappers.items():
        for key, ws in keyed.items():
            target.setdefault(wrapper_type, {}).setdefault(key, []).extend(ws)


def set_model_options_patch_replace(model_options, patch, name, block_name, number):
    to = model_options["transformer_options"].copy()
    to["patches_replace"] = dict(to.get("patches_replace", {}))
    to["patches_replace"][name] = dict(to["patches_replace"].get(name, {}))
    to["patches_replace"][name][(block_name, number)] = patch
    model_options["transformer_options"] = to
    return model_options


# ------------------------------------------------------------------ model_sampling
class ModelSamplingDiscreteFlow(nn.Module):
    def __init__(self, shift=3.0, multiplier=1000):
        super().__init__()
        self.shift, self.multiplier = shift, multiplier
        self.register_buffer("sigmas", self.sigma(torch.arange(1, 1001) / 1000 * multiplier))

    @property
    def sigma_max(self):
        return self.sigmas[-1]

    def timestep(self, sigma):
        return sigma * self.multiplier

    def sigma(self, timestep):
        t = timestep / self.multiplier
        return self.shift * t / (1 + (self.shift - 1) * t)

    def percent_to_sigma(self, percent):
        if percent <= 0.0:
            return 1.0
        if percent >= 1.0:
            return 0.0
        t = 1.0 - percent
        return self.shift * t / (1 + (self.shift - 1) * t)


class ModelSamplingFlux(nn.Module):
    def __init__(self, shift=1.15):
        super().__init__()
        self.shift = shift
        self.register_buffer("sigmas", self.sigma(torch.arange(1, 10001) / 10000))

    @property
    def sigma_max(self):
        return self.sigmas[-1]

    def timestep(self, sigma):
        return sigma

    def sigma(self, timestep):
        return math.exp(self.shift) / (math.exp(self.shift) + (1 / timestep - 1))

    def percent_to_sigma(self, percent):
        if percent <= 0.0:
            return 1.0
        if percent >= 1.0:
            return 0.0
        return math.exp(self.shift) / (math.exp(self.shift) + (1 / (1.0 - percent) - 1))


class ModelSamplingDiscrete(nn.Module):
    def __init__(self):
        super().__init__()
        betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
        alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        sigmas = ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5
        self.num_timesteps = 1000
        self.register_buffer("sigmas", sigmas.float())
        self.register_buffer("log_sigmas", sigmas.log().float())

    @property
    def sigma_max(self):
        return self.sigmas[-1]

    def timestep(self, sigma):
        dists = sigma.log() - self.log_sigmas[:, None]
        return dists.abs().argmin(dim=0).view(sigma.shape)

    def sigma(self, timestep):
        t = torch.clamp(timestep.float(), min=0, max=len(self.sigmas) - 1)
        low, high, w = t.floor().long(), t.ceil().long(), t.frac()
        return ((1 - w) * self.log_sigmas[low] + w * self.log_sigmas[high]).exp()

    def percent_to_sigma(self, percent):
        if percent <= 0.0:
            return 999999999.9
        if percent >= 1.0:
            return 0.0
        return self.sigma(torch.tensor((1.0 - percent) * 999.0)).item()


# ------------------------------------------------------------------ tiny diffusion models
class TinyBlock(nn.Module):
    """A block on the image stream (and the text stream when `joint`)."""

    def __init__(self, dim: int, joint: bool):
        super().__init__()
        self.img = nn.Linear(dim, dim)
        self.txt = nn.Linear(dim, dim) if joint else None

    def forward(self, img, txt=None, vec=None):
        img = img + torch.tanh(self.img(img) + vec[:, None])
        if self.txt is None:
            return img
        return img, txt + torch.tanh(self.txt(txt))


class TinyFlux(nn.Module):
    """Double-stream then single-stream blocks; its forward reads `patches_replace["dit"]` as ComfyUI's Flux does."""

    def __init__(self, dim=8, depth=3, depth_single_blocks=5):
        super().__init__()
        self.time_in = nn.Linear(1, dim)
        self.double_blocks = nn.ModuleList([TinyBlock(dim, joint=True) for _ in range(depth)])
        self.single_blocks = nn.ModuleList([TinyBlock(dim, joint=False) for _ in range(depth_single_blocks)])
        self.final_layer = nn.Linear(dim, dim)

    def forward(self, x, timestep, context=None, control=None, transformer_options={}, **kwargs):
        img, txt = x, context
        vec = self.time_in(timestep.float().reshape(-1, 1) / 1000.0)
        blocks_replace = transformer_options.get("patches_replace", {}).get("dit", {})
        img, txt = _double_stream(self.double_blocks, img, txt, vec, transformer_options)
        img = torch.cat((txt, img), 1)
        for i, block in enumerate(self.single_blocks):
            if ("single_block", i) in blocks_replace:

                def block_wrap(args, block=block):
                    return {"img": block(args["img"], vec=args["vec"])}

                out = blocks_replace[("single_block", i)](
                    {"img": img, "vec": vec, "transformer_options": transformer_options},
                    {"original_block": block_wrap},
                )
                img = out["img"]
            else:
                img = block(img, vec=vec)
        return self.final_layer(img[:, txt.shape[1] :])


def _double_stream(blocks, img, txt, vec, transformer_options):
    """Two-stream blocks under the keys `("double_block", i)`, each replaceable through `patches_replace["dit"]` the
    way ComfyUI's Flux and MMDiT forwards do it."""
    blocks_replace = transformer_options.get("patches_replace", {}).get("dit", {})
    for i, block in enumerate(blocks):
        if ("double_block", i) in blocks_replace:

            def block_wrap(args, block=block):
                out = {}
                out["img"], out["txt"] = block(args["img"], args["txt"], args["vec"])
                return out

            out = blocks_replace[("double_block", i)](
                {"img": img, "txt": txt, "vec": vec, "transformer_options": transformer_options},
                {"original_block": block_wrap},
            )
            txt, img = out["txt"], out["img"]
        else:
            img, txt = block(img, txt, vec)
    return img, txt


class TinyMMDiT(nn.Module):
    """One stream of joint blocks under the keys `("double_block", i)`, as ComfyUI's SD3 MMDiT forward."""

    def __init__(self, dim=8, depth=6):
        super().__init__()
        self.time_in = nn.Linear(1, dim)
        self.joint_blocks = nn.ModuleList([TinyBlock(dim, joint=True) for _ in range(depth)])

    def forward(self, x, timestep, context=None, control=None, transformer_options={}, **kwargs):
        vec = self.time_in(timestep.float().reshape(-1, 1) / 1000.0)
        return _double_stream(self.joint_blocks, x, context, vec, transformer_options)[0]


class TinyUNet(nn.Module):
    """A model whose forward does not read `patches_replace["dit"]`."""

    def __init__(self, dim=8):
        super().__init__()
        self.input_blocks = nn.ModuleList([nn.Linear(dim, dim)])

    def forward(self, x, timestep, context=None, control=None, transformer_options={}, **kwargs):
        return self.input_blocks[0](x)


# The names ComfyUI gives these classes: the node recognises a family by its class's module and name.
TinyFlux.__module__, TinyFlux.__qualname__ = "comfy.ldm.flux.model", "Flux"
TinyMMDiT.__module__, TinyMMDiT.__qualname__ = "comfy.ldm.modules.diffusionmodules.mmdit", "MMDiT"
TinyUNet.__module__, TinyUNet.__qualname__ = "comfy.ldm.modules.diffusionmodules.openaimodel", "UNetModel"


# ------------------------------------------------------------------ model_base / model_patcher
class BaseModel(nn.Module):
    def __init__(self, diffusion_model: nn.Module, model_sampling: nn.Module):
        super().__init__()
        self.diffusion_model, self.model_sampling = diffusion_model, model_sampling

    def apply_model(self, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={}, **kwargs):
        executor = WrapperExecutor(self._apply_model, self, get_all_wrappers(APPLY_MODEL, transformer_options), 0)
        return executor.execute(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)

    def _apply_model(self, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={}, **kwargs):
        timestep = self.model_sampling.timestep(t).float()
        executor = WrapperExecutor(
            self.diffusion_model, self.diffusion_model, get_all_wrappers(DIFFUSION_MODEL, transformer_options), 0
        )
        return executor.execute(x, timestep, c_crossattn, control, transformer_options, **kwargs)


class ModelPatcher:
    def __init__(self, model: BaseModel):
        self.model = model
        self.model_options = {"transformer_options": {}}
        self.wrappers: dict = {}
        self.object_patches: dict = {}

    def clone(self) -> ModelPatcher:
        n = self.__class__(self.model)
        n.model_options = copy.deepcopy(self.model_options)
        n.object_patches = self.object_patches.copy()
        for k, w in self.wrappers.items():
            n.wrappers[k] = {k1: w1.copy() for k1, w1 in w.items()}
        return n

    def set_model_patch_replace(self, patch, name, block_name, number):
        self.model_options = set_model_options_patch_replace(self.model_options, patch, name, block_name, number)

    def add_wrapper_with_key(self, wrapper_type, key, wrapper):
        self.wrappers.setdefault(wrapper_type, {}).setdefault(key, []).append(wrapper)

    def remove_wrappers_with_key(self, wrapper_type, key):
        self.wrappers.get(wrapper_type, {}).pop(key, None)

    def get_wrappers(self, wrapper_type, key):
        return self.wrappers.get(wrapper_type, {}).get(key, [])

    def add_object_patch(self, name, obj):
        self.object_patches[name] = obj

    def get_model_object(self, name):
        if name in self.object_patches:
            return self.object_patches[name]
        obj = self.model
        for attribute in name.split("."):
            obj = getattr(obj, attribute)
        return obj


def predict(patcher: ModelPatcher, x: torch.Tensor, sigma: float, context: torch.Tensor, model_options=None):
    """One model call as ComfyUI's sampler makes it (prepare_model_patcher, then _calc_cond_batch)."""
    model_options = copy.deepcopy(patcher.model_options) if model_options is None else model_options
    merge_wrappers(model_options["transformer_options"].setdefault("wrappers", {}), patcher.wrappers)
    sigmas = torch.full((x.shape[0],), float(sigma))
    transformer_options = dict(model_options["transformer_options"])
    transformer_options["sigmas"] = sigmas
    return patcher.model.apply_model(x, sigmas, c_crossattn=context, transformer_options=transformer_options)


def make_patcher(kind: str = "flux", sampling: str = "flow", **sizes) -> ModelPatcher:
    torch.manual_seed(0)
    diffusion_model = {"flux": TinyFlux, "mmdit": TinyMMDiT, "unet": TinyUNet}[kind](**sizes)
    model_sampling = {"flow": ModelSamplingDiscreteFlow, "flux": ModelSamplingFlux, "discrete": ModelSamplingDiscrete}
    return ModelPatcher(BaseModel(diffusion_model, model_sampling[sampling]()))
