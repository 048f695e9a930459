import pytest
import torch

from ee_diffusion.metrics import frechet_distance, kernel_distance


def gaussian(n: int, shift: float = 0.0, seed: int = 0, dim: int = 8) -> torch.Tensor:
    return torch.randn(n, dim, generator=torch.Generator().manual_seed(seed)) + shift


def test_fid_of_a_set_with_itself_is_zero_and_grows_with_a_shift():
    a = gaussian(500)
    assert abs(frechet_distance(a, a)) < 1e-6
    small, large = frechet_distance(a, gaussian(500, 0.5, seed=1)), frechet_distance(a, gaussian(500, 1.0, seed=1))
    assert 0.1 < small < large
    # A pure shift of the mean by s in every one of d dimensions adds d * s^2.
    assert frechet_distance(a, a + 1.0) == pytest.approx(8.0, rel=1e-6)


def test_fid_sees_a_change_of_spread():
    a = gaussian(2000).double()
    # Scaling by 2: the means differ by mu, and tr(S + 4S - 2 (4 S^2)^(1/2)) = tr(S).
    expected = a.mean(0).square().sum() + torch.cov(a.T).trace()
    assert frechet_distance(a, 2 * a) == pytest.approx(expected.item(), rel=1e-6)


def test_kid_is_unbiased_near_zero_on_the_same_distribution_and_grows_with_a_shift():
    a, b = gaussian(400, seed=0), gaussian(400, seed=1)
    same, std = kernel_distance(a, b, subset_size=200, num_subsets=50)
    assert abs(same) < 3 * std + 1e-3
    shifted, _ = kernel_distance(a, gaussian(400, 1.0, seed=1), subset_size=200, num_subsets=50)
    assert shifted > 10 * max(abs(same), std)
    assert kernel_distance(a, b) == kernel_distance(a, b)  # subsets drawn from a fixed seed by default


@pytest.mark.parametrize(
    "a, b, match",
    [
        (torch.zeros(5, 3), torch.zeros(5, 4), "same d"),
        (torch.zeros(5), torch.zeros(5, 4), "same d"),
        (torch.zeros(1, 3), torch.zeros(5, 3), "at least 2 samples"),
    ],
)
def test_bad_feature_sets(a, b, match):
    for metric in (frechet_distance, kernel_distance):
        with pytest.raises(ValueError, match=match):
            metric(a, b)
