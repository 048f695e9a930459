"""Shared test helpers: tiny denoisers built from configs, and independent counting of the work they do."""

from __future__ import annotations

import hashlib
import ipaddress
import socket
from pathlib import Path

import pytest
import torch
from diffusers import DiTTransformer2DModel
from diffusers.models.attention_processor import Attention


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        return host == "localhost"


@pytest.fixture(autouse=True, scope="session")
def offline():
    """The suite runs offline: a connection to anything but this machine (the hub, a download) raises in the test that
    tries it. Loopback stays open (the two-process bench test talks to itself)."""
    connect = socket.socket.connect

    def local_connect(sock: socket.socket, address) -> None:
        if sock.family in (socket.AF_INET, socket.AF_INET6) and not _loopback(str(address[0])):
            raise OSError(f"the test suite runs offline: refused a connection to {address}")
        return connect(sock, address)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(socket.socket, "connect", local_connect)
        yield


SHIPPED_ASSETS = Path(__file__).resolve().parents[1] / "ee_diffusion" / "assets"


def asset_hashes() -> dict[str, str]:
    """The SHA-256 of every file of the shipped models, by path."""
    return {
        path.relative_to(SHIPPED_ASSETS).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(SHIPPED_ASSETS.rglob("*"))
        if path.is_file() and "__pycache__" not in path.parts
    }


@pytest.fixture(autouse=True, scope="session")
def shipped_assets_unchanged():
    """No test writes into the shipped models: their files hash the same after the whole suite as before it."""
    before = asset_hashes()
    yield
    after = asset_hashes()
    changed = sorted(name for name in before.keys() | after.keys() if before.get(name) != after.get(name))
    assert not changed, f"the test suite changed the shipped models: {changed}"


# Outputs of a model reloaded from disk against the model that was saved. The weights are bit-identical, but they live
# at other memory addresses (safetensors' buffers), and torch's CPU matrix kernels may take another code path for them:
# on torch 2.14.1 a plain diffusers DDPM round trip, with no exit schedule, differs by up to 2.3e-6 (images in [0, 1]),
# while torch 2.15 happens to give the same bits. So a reload is compared within 1e-5, about 4x what was seen.
RELOAD_ATOL = 1e-5


def assert_same_after_reload(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """`actual`, made by a reloaded pipeline, equals `expected` up to the CPU kernels' numerics (`RELOAD_ATOL`)."""
    torch.testing.assert_close(torch.as_tensor(actual), torch.as_tensor(expected), rtol=0, atol=RELOAD_ATOL)


def make_tiny_dit(num_layers: int = 4, sample_size: int = 8, seed: int = 0) -> DiTTransformer2DModel:
    """A randomly initialised class-conditional DiT with learned variance, small enough for CPU tests."""
    torch.manual_seed(seed)
    model = DiTTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=8,
        num_layers=num_layers,
        sample_size=sample_size,
        patch_size=2,
        norm_num_groups=1,
        num_embeds_ada_norm=1000,
    )
    return model.eval()


class AttentionCounter:
    """Counts real attention work with plain torch forward hooks, independently of the exit hooks' own records.

    `counts[i]` is how many times attention module `i` (in `named_modules` order) ran its forward.
    """

    def __init__(self, model: torch.nn.Module, modules: list[torch.nn.Module] | None = None) -> None:
        self.modules = modules if modules is not None else [m for m in model.modules() if isinstance(m, Attention)]
        self.counts = [0] * len(self.modules)
        self.events: list[int] = []  # module index of every attention forward, in order
        self._handles = [m.register_forward_hook(self._hook(i)) for i, m in enumerate(self.modules)]

    def _hook(self, index: int):
        def hook(module, args, output):
            self.counts[index] += 1
            self.events.append(index)

        return hook

    def reset(self) -> None:
        self.counts = [0] * len(self.modules)
        self.events.clear()

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


@pytest.fixture
def tiny_dit() -> DiTTransformer2DModel:
    return make_tiny_dit()


def save_digits_shaped_dit(folder, exit_schedule=None) -> None:
    """A tiny randomly initialised pixel-space DiT shaped like the digits models (1 x 32 x 32, 10 classes, 2 blocks),
    saved as a pipeline folder (scored against the held-out digits by the bench)."""
    from ee_diffusion.training import save_digits_pipeline

    torch.manual_seed(0)
    model = DiTTransformer2DModel(
        in_channels=1,
        out_channels=1,
        sample_size=32,
        patch_size=8,
        num_layers=2,
        num_attention_heads=2,
        attention_head_dim=8,
        num_embeds_ada_norm=10,
    )
    save_digits_pipeline(model, folder, exit_schedule=exit_schedule)
