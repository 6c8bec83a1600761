"""The evaluation's metrics against values known in closed form or from a reference implementation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pigeon.evaluation.metrics import (
    FrechetReference,
    accuracy,
    bootstrap_ci,
    cosine_similarity,
    frechet_distance,
    gaussian_stats,
    gaussian_window,
    mixture_stats,
    psnr,
    ssim,
)


def _images(seed: int, n: int = 3, size: int = 32) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_gaussian_window_is_normalised_and_symmetric():
    w = gaussian_window(11, 1.5)
    assert w.shape == (11, 11)
    assert float(w.sum()) == pytest.approx(1.0, abs=1e-12)
    assert torch.allclose(w, w.T) and torch.allclose(w, w.flip(0))
    assert int(w.argmax()) == 5 * 11 + 5


def test_ssim_identical_images_is_one():
    x = _images(0)
    assert torch.allclose(ssim(x, x), torch.ones(3), atol=1e-6)


def test_ssim_of_two_constant_images_is_the_luminance_term():
    # Constant images: zero variance, so SSIM = (2ab + C1) / (a² + b² + C1) exactly.
    a, b = 0.2, 0.7
    x, y = torch.full((1, 3, 16, 16), a), torch.full((1, 3, 16, 16), b)
    c1 = 0.01**2
    expected = (2 * a * b + c1) / (a * a + b * b + c1)
    assert float(ssim(x, y)[0]) == pytest.approx(expected, rel=1e-4)  # float32 moments


def test_ssim_matches_a_direct_windowed_computation():
    # Reference: loop over every valid 11 × 11 window with explicit gaussian-weighted statistics.
    x, y = _images(1, 1, 13)[:, :1].double(), _images(2, 1, 13)[:, :1].double()
    w = gaussian_window(11, 1.5)
    c1, c2 = 0.01**2, 0.03**2
    values = []
    for i in range(3):
        for j in range(3):
            px, py = x[0, 0, i:i + 11, j:j + 11], y[0, 0, i:i + 11, j:j + 11]
            mx, my = (w * px).sum(), (w * py).sum()
            vx, vy = (w * (px - mx) ** 2).sum(), (w * (py - my) ** 2).sum()
            cxy = (w * (px - mx) * (py - my)).sum()
            values.append(((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2)))
    assert float(ssim(x.float(), y.float())[0]) == pytest.approx(float(torch.stack(values).mean()), abs=1e-4)


@pytest.mark.parametrize("size,data_range", [(32, 1.0), (64, 1.0), (32, 2.0)])
def test_ssim_matches_torchmetrics(size, data_range):
    """torchmetrics' SSIM map with the same settings: an 11 × 11 gaussian window (σ = 1.5), K1 = 0.01,
    K2 = 0.03, the given data range, population statistics. torchmetrics pads the images by reflection
    and averages the whole map; ours averages the valid windows only (as the original definition and
    scikit-image do), so its map is cropped by the window's half-width first."""
    from torchmetrics.functional.image import structural_similarity_index_measure as library_ssim

    x = _images(5, 4, size)
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(6))
    y = torch.cat([(x[:2] + 0.1 * noise[:2]).clamp(0, 1), x[2:3].flip(-1), 1 - x[3:]])
    x, y = x * data_range, y * data_range
    _, full_map = library_ssim(y, x, gaussian_kernel=True, sigma=1.5, kernel_size=11, data_range=data_range,
                               k1=0.01, k2=0.03, reduction="none", return_full_image=True)
    half = 11 // 2
    expected = full_map[..., half:-half, half:-half].mean(dim=(1, 2, 3))
    ours = ssim(y, x, data_range=data_range)
    assert expected.shape == ours.shape == (4,)
    assert float(expected.std()) > 0.3  # rows of clearly different similarity (noisy, mirrored, inverted)
    assert torch.allclose(ours, expected.float(), atol=1e-5), (ours - expected).abs().max()  # fp32: ~1e-7


def test_ssim_drops_with_noise_and_for_inverted_images():
    x = _images(3)
    noisy = (x + 0.2 * torch.randn(x.shape, generator=torch.Generator().manual_seed(4))).clamp(0, 1)
    assert (ssim(x, noisy) < 0.9).all()
    assert (ssim(x, 1 - x) < 0).all()


def test_psnr_known_values():
    x = torch.zeros(2, 3, 8, 8)
    y = x + 0.1  # MSE = 0.01 → 20 dB
    assert torch.allclose(psnr(x, y), torch.full((2,), 20.0), atol=1e-4)
    assert torch.allclose(psnr(x, x + 0.5), torch.full((2,), 10 * math.log10(4)), atol=1e-4)
    assert float(psnr(x, x)[0]) == pytest.approx(100.0)


def test_cosine_similarity_rows():
    a = torch.tensor([[1.0, 0.0], [1.0, 1.0], [2.0, 0.0]])
    b = torch.tensor([[0.0, 3.0], [2.0, 2.0], [-1.0, 0.0]])
    assert torch.allclose(cosine_similarity(a, b), torch.tensor([0.0, 1.0, -1.0]), atol=1e-6)


def test_frechet_distance_closed_form_for_diagonal_gaussians():
    mu_a, mu_b = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    var_a, var_b = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 1.0])
    expected = ((mu_a - mu_b) ** 2).sum() + ((np.sqrt(var_a) - np.sqrt(var_b)) ** 2).sum()
    assert frechet_distance(mu_a, np.diag(var_a), mu_b, np.diag(var_b)) == pytest.approx(expected, rel=1e-9)
    assert frechet_distance(mu_a, np.diag(var_a), mu_a, np.diag(var_a)) == pytest.approx(0.0, abs=1e-9)


def test_frechet_distance_matches_scipy_sqrtm():
    linalg = pytest.importorskip("scipy.linalg")
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(200, 6)) @ rng.normal(size=(6, 6)), rng.normal(1.0, 2.0, size=(150, 6))
    (ma, ca), (mb, cb) = gaussian_stats(a), gaussian_stats(b)
    root = linalg.sqrtm(ca @ cb).real
    expected = ((ma - mb) ** 2).sum() + np.trace(ca + cb - 2 * root)
    assert frechet_distance(ma, ca, mb, cb) == pytest.approx(expected, rel=1e-6)
    assert FrechetReference(ma, ca).distance_to_features(b) == pytest.approx(expected, rel=1e-6)


def test_mixture_stats_equal_pooled_samples():
    rng = np.random.default_rng(1)
    x, y = rng.normal(0, 1, size=(300, 4)), rng.normal(3, 2, size=(100, 4))
    mean, cov = mixture_stats([gaussian_stats(x), gaussian_stats(y)], np.array([300, 100]))
    pooled_mean, pooled_cov = gaussian_stats(np.concatenate([x, y]))
    assert np.allclose(mean, pooled_mean) and np.allclose(cov, pooled_cov)


def test_bootstrap_ci_is_seeded_and_covers_the_mean():
    rng = np.random.default_rng(2)
    values = rng.normal(5.0, 2.0, size=400)
    point, low, high = bootstrap_ci(values, resamples=2000, seed=7)
    assert point == pytest.approx(values.mean())
    assert low < point < high
    # The percentile interval of a mean ≈ ± 1.96 σ / √n.
    assert (high - low) == pytest.approx(2 * 1.96 * values.std() / math.sqrt(len(values)), rel=0.15)
    assert bootstrap_ci(values, 2000, seed=7) == (point, low, high)
    assert bootstrap_ci(values, 2000, seed=8) != (point, low, high)


def test_bootstrap_ci_of_constant_and_custom_statistic():
    assert bootstrap_ci(np.full(10, 0.5), 100, 0) == (0.5, 0.5, 0.5)
    point, low, high = bootstrap_ci(np.arange(100.0), 500, 0, statistic=np.median)
    assert point == pytest.approx(49.5) and low < 49.5 < high


def test_bootstrap_ci_recentred_interval_contains_a_biased_statistic():
    rng = np.random.default_rng(3)
    features = rng.normal(size=(60, 8))
    reference = FrechetReference(*gaussian_stats(rng.normal(size=(2000, 8))))
    point, low, high = bootstrap_ci(features, 200, 0, statistic=reference.distance_to_features)
    assert low > point  # repeated rows inflate every resampled FD
    point_r, low_r, high_r = bootstrap_ci(features, 200, 0, statistic=reference.distance_to_features, recentre=True)
    assert point_r == point and low_r < point < high_r
    assert high_r - low_r == pytest.approx(high - low)


def test_accuracy():
    assert accuracy(np.array([1, 2, 3, 4]), np.array([1, 0, 3, 0])) == 0.5
    with pytest.raises(ValueError):
        accuracy(np.array([1, 2]), np.array([1]))
