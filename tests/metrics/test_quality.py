import urllib.request

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from ee_diffusion.data import load_digits_split
from ee_diffusion.metrics import (
    INCEPTION_FILENAME,
    INCEPTION_URL,
    FeatureExtractor,
    InceptionWeightsNotFoundError,
    ReferenceStatistics,
    compute_fid_kid,
    frechet_distance,
    kernel_distance,
    load_reference_statistics,
    save_reference_statistics,
)
from ee_diffusion.metrics import features as features_module


@pytest.fixture(scope="module")
def digits():
    """Two sets of real digits in [0, 1]: 300 from the train split, the 359 held-out ones."""
    train, heldout = load_digits_split("train"), load_digits_split("heldout")
    return (train.images[:300] + 1) / 2, (heldout.images + 1) / 2


def write_pngs(images: torch.Tensor, folder) -> None:
    folder.mkdir()
    for index, image in enumerate(images):
        pixels = (image.clamp(0, 1) * 255).round().to(torch.uint8)
        array = pixels[0].numpy() if len(pixels) == 1 else pixels.permute(1, 2, 0).numpy()
        Image.fromarray(array).save(folder / f"{index:03d}.png")


def quantised(images: torch.Tensor) -> torch.Tensor:
    return (images * 255).round() / 255


class Projection(nn.Module):
    """A tiny custom feature module: flatten, a fixed random linear map to 6 features."""

    def __init__(self, in_features: int, num_features: int = 6):
        super().__init__()
        self.linear = nn.Linear(in_features, num_features)
        nn.init.normal_(self.linear.weight, generator=torch.Generator().manual_seed(0))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.linear(images.flatten(1))


def test_fid_of_a_set_with_itself_is_zero(digits):
    generated, _ = digits
    result = compute_fid_kid(generated, generated)
    assert result.backend == "digits"  # the default for (N, 1, 32, 32) images
    assert abs(result.fid) < 1e-6
    assert (result.num_samples, result.num_reference) == (300, 300)


def test_fid_and_kid_grow_monotonically_with_the_shift_of_one_set(digits):
    generated, real = digits
    extractor = FeatureExtractor("digits")
    reference = ReferenceStatistics.from_features(extractor.features(real), backend="digits")
    results = [
        compute_fid_kid((generated + shift).clamp(0, 1), reference, extractor=extractor, kid_subsets=10)
        for shift in (0.0, 0.05, 0.1, 0.2, 0.4)
    ]
    fids, kids = [r.fid for r in results], [r.kid for r in results]
    assert all(a < b for a, b in zip(fids, fids[1:])), fids
    assert all(a < b for a, b in zip(kids, kids[1:])), kids
    assert fids[-1] > 10 * fids[0]


@pytest.mark.parametrize("backend", ["ee_diffusion", "torchmetrics"])
def test_kid_is_unbiased_on_equal_distributions_and_positive_on_different_ones(backend):
    # Many independent pairs of small sets from one distribution: the unbiased KID averages to 0 (single draws
    # are often negative), where the biased estimator (keeping the kernel diagonals) would sit well above 0.
    generator = torch.Generator().manual_seed(0)
    module = nn.Flatten() if backend == "torchmetrics" else None
    extractor = FeatureExtractor("torchmetrics", feature_module=module) if module is not None else None
    same, biased = [], []
    for _ in range(60):
        a, b = torch.rand(2, 16, 1, 2, 3, generator=generator)
        if extractor is None:  # our kernel_distance on the 6 pixel values as features
            kid, _ = kernel_distance(a.flatten(1), b.flatten(1), subset_size=16, num_subsets=1)
        else:
            kid = compute_fid_kid(a, b, extractor=extractor, kid_subsets=1).kid
        same.append(kid)
        x, y = a.flatten(1).double(), b.flatten(1).double()
        k = lambda u, v: (u @ v.T / 6 + 1) ** 3  # noqa: E731
        biased.append((k(x, x).mean() + k(y, y).mean() - 2 * k(x, y).mean()).item())
    same = torch.tensor(same)
    standard_error = same.std() / len(same) ** 0.5
    assert abs(same.mean()) < 3 * standard_error
    assert (same < 0).any()
    assert torch.tensor(biased).mean() > 10 * standard_error
    a, b = torch.rand(2, 128, 1, 2, 3, generator=generator)
    b = b / 2  # uniform on [0, 1/2] against uniform on [0, 1]
    if extractor is None:
        different, std = kernel_distance(a.flatten(1), b.flatten(1), subset_size=64, num_subsets=20)
    else:
        result = compute_fid_kid(a, b, extractor=extractor, kid_subset_size=64, kid_subsets=20)
        different, std = result.kid, result.kid_std
    assert different > 5 * std > 0


def test_npz_round_trip_gives_the_same_fid_and_kid_as_the_in_memory_reference(digits, tmp_path):
    generated, real = digits
    features = FeatureExtractor("digits").features(real)
    path = tmp_path / "reference.npz"
    save_reference_statistics(path, features, backend="digits")
    with np.load(path) as archive:
        assert set(archive.files) == {"mu", "sigma", "features", "num_images", "backend"}
        assert archive["features"].shape == (359, 128) and archive["num_images"] == 359
        assert str(archive["backend"]) == "digits"
    in_memory = compute_fid_kid(generated, real, kid_subsets=10)
    from_file = compute_fid_kid(generated, path, kid_subsets=10)
    assert from_file.fid == pytest.approx(in_memory.fid, rel=1e-9, abs=1e-9)
    assert from_file.kid == pytest.approx(in_memory.kid, rel=1e-6)
    assert from_file.num_reference == 359 and from_file.backend == "digits"
    # A subset of the features for KID; mu and sigma still come from all of them.
    small = save_reference_statistics(tmp_path / "small.npz", features, backend="digits", max_features=100)
    loaded = load_reference_statistics(tmp_path / "small.npz")
    assert loaded.features.shape == (100, 128) and torch.equal(loaded.mu, small.mu)
    assert compute_fid_kid(generated, loaded).fid == pytest.approx(in_memory.fid, rel=1e-9)
    # A clean-fid statistics file (only mu and sigma) gives the FID, and no KID.
    np.savez(tmp_path / "clean_fid_style.npz", mu=small.mu.numpy(), sigma=small.sigma.numpy())
    fid_only = compute_fid_kid(generated, tmp_path / "clean_fid_style.npz")
    assert fid_only.fid == pytest.approx(in_memory.fid, rel=1e-9) and fid_only.kid is None
    # Statistics of one network are never compared with features of another.
    with pytest.raises(ValueError, match="computed with the 'digits' backend, not 'torchmetrics'"):
        compute_fid_kid(generated, path, backend="torchmetrics", feature_module=nn.Flatten())


def test_a_folder_of_images_works_as_reference(digits, tmp_path):
    generated, real = digits
    write_pngs(real[:40], tmp_path / "real")
    from_folder = compute_fid_kid(generated, tmp_path / "real", kid_subsets=10)
    in_memory = compute_fid_kid(generated, quantised(real[:40]), kid_subsets=10)
    assert from_folder.num_reference == 40
    assert from_folder.fid == pytest.approx(in_memory.fid, rel=1e-9)
    assert from_folder.kid == pytest.approx(in_memory.kid, rel=1e-9)
    with pytest.raises(ValueError, match="No image files"):
        compute_fid_kid(generated, tmp_path)  # tmp_path holds a folder, no images


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a download was attempted")

    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    import cleanfid.downloads_helper

    monkeypatch.setattr(cleanfid.downloads_helper, "check_download_inception", refuse)


def test_missing_inception_file_names_the_file_its_folder_the_url_and_the_option(tmp_path, monkeypatch, no_network):
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setattr(features_module, "clean_fid_inception_dir", lambda: empty)
    images = torch.rand(4, 3, 16, 16)
    with pytest.raises(InceptionWeightsNotFoundError) as caught:
        compute_fid_kid(images, images)  # 3-channel images: the clean-fid backend by default
    message = str(caught.value)
    assert str(empty / INCEPTION_FILENAME) in message and INCEPTION_URL in message and "inception_path=" in message
    assert isinstance(caught.value, FileNotFoundError)
    other = tmp_path / "weights"
    other.mkdir()
    with pytest.raises(InceptionWeightsNotFoundError, match="inception_path") as caught:
        FeatureExtractor("clean-fid", inception_path=other)
    assert str(other / INCEPTION_FILENAME) in str(caught.value)
    with pytest.raises(ValueError, match="named 'inception-2015-12-05.pt'"):
        FeatureExtractor("clean-fid", inception_path=other / "inception.pt")


def write_fake_inception(folder) -> None:
    """A stand-in with the interface clean-fid expects of its TorchScript file (`.layers` maps 299x299 to 2048)."""

    class Layers(nn.Module):
        def __init__(self):
            super().__init__()
            self.pool = nn.AdaptiveAvgPool2d(4)
            self.linear = nn.Linear(48, 2048)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.shape[2] != 299 or x.shape[3] != 299 or x.min() < -1 or x.max() > 1:
                raise ValueError("clean-fid feeds 299x299 images in [-1, 1]")
            return self.linear(self.pool(x).flatten(1))

    class Base(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = Layers()

        def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
            return self.layers(x)

    torch.manual_seed(0)
    torch.jit.save(torch.jit.script(Base()), str(folder / INCEPTION_FILENAME))


def test_clean_fid_backend_runs_clean_fids_network_on_its_resized_images(tmp_path, no_network):
    write_fake_inception(tmp_path)
    extractor = FeatureExtractor("clean-fid", inception_path=tmp_path / INCEPTION_FILENAME)
    generator = torch.Generator().manual_seed(0)
    gray = torch.rand(6, 1, 16, 16, generator=generator)
    features = extractor.features(gray)
    assert features.shape == (6, 2048)
    assert torch.equal(features, extractor.features(gray.expand(-1, 3, -1, -1)))  # grayscale goes in as RGB
    assert torch.equal(features, extractor.features(quantised(gray)))  # images are quantised to 8 bits first
    write_pngs(gray, tmp_path / "pngs")
    assert torch.equal(features, extractor.features(tmp_path / "pngs"))
    result = compute_fid_kid(gray, gray, extractor=extractor)
    assert result.backend == "clean-fid" and abs(result.fid) < 1e-3


@pytest.mark.filterwarnings("ignore:.*will save all extracted features:UserWarning")
def test_torchmetrics_backend_with_a_custom_module_agrees_with_our_distances(tmp_path):
    generator = torch.Generator().manual_seed(0)
    a, b = torch.rand(80, 3, 4, 4, generator=generator), torch.rand(70, 3, 4, 4, generator=generator).sqrt()
    module = Projection(3 * 4 * 4)
    with torch.no_grad():
        features_a, features_b = module(a), module(b)
    result = compute_fid_kid(a, b, backend="torchmetrics", feature_module=module, kid_subset_size=70, kid_subsets=3)
    assert result.backend == "torchmetrics"
    assert result.fid == pytest.approx(frechet_distance(features_a, features_b), rel=1e-6)
    # Subsets as large as the smaller set: the KID estimate no longer depends on which subsets are drawn.
    ours, _ = kernel_distance(features_a[:70], features_b, subset_size=70, num_subsets=1)
    full = compute_fid_kid(a[:70], b, backend="torchmetrics", feature_module=module, kid_subset_size=70, kid_subsets=3)
    assert full.kid == pytest.approx(ours, rel=1e-6)
    # Its KID standard deviation is the sample one over the subsets, as our backends' (torchmetrics': the population's)
    import math

    from torchmetrics.image.kid import KernelInceptionDistance

    drawn = compute_fid_kid(a, b, backend="torchmetrics", feature_module=module, kid_subset_size=20, kid_subsets=5)
    from ee_diffusion.metrics.quality import _Precomputed

    metric = KernelInceptionDistance(feature=_Precomputed(features_a.shape[1]), subsets=5, subset_size=20)
    metric.update(features_b.double(), real=True)
    metric.update(features_a.double(), real=False)
    with torch.random.fork_rng(devices=[]):  # the same subsets: drawn as the backend draws them, from seed 0
        torch.manual_seed(int(torch.randint(2**62, (), generator=torch.Generator().manual_seed(0))))
        population = metric.compute()[1].item()
    assert drawn.kid_std == pytest.approx(population * math.sqrt(5 / 4), rel=1e-6)
    # The reference as cached statistics gives the same FID.
    save_reference_statistics(tmp_path / "b.npz", features_b, backend="torchmetrics")
    cached = compute_fid_kid(a, tmp_path / "b.npz", feature_module=module, kid_subset_size=70, kid_subsets=3)
    assert cached.fid == pytest.approx(result.fid, rel=1e-9)


def test_bad_arguments_name_what_is_accepted():
    images = torch.rand(4, 1, 32, 32)
    with pytest.raises(ValueError, match="'inception'.*clean-fid, torchmetrics, digits"):
        FeatureExtractor("inception")
    with pytest.raises(ValueError, match="feature_module is only used by the 'torchmetrics' backend"):
        FeatureExtractor("digits", feature_module=nn.Flatten())
    with pytest.raises(TypeError, match="must be a torch.nn.Module"):
        FeatureExtractor("torchmetrics", feature_module=lambda x: x)
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        compute_fid_kid(images[0], images)
    with pytest.raises(ValueError, match=r"\(N, 1, 32, 32\)"):
        compute_fid_kid(torch.rand(4, 3, 32, 32), images, backend="digits")
    with pytest.raises(ValueError, match="disagrees with the given extractor"):
        compute_fid_kid(images, images, backend="clean-fid", extractor=FeatureExtractor("digits"))
