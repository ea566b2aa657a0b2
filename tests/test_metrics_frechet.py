"""Fréchet distance against closed forms; KID on same vs shifted distributions."""
import numpy as np
import pytest
import scipy.linalg
import torch

from raygen.metrics import MetricsError, frechet_distance, gaussian_stats, kernel_distance


def test_fid_diagonal_covariances_closed_form():
    rng = np.random.default_rng(0)
    d = 16
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    v1, v2 = rng.uniform(0.1, 3, d), rng.uniform(0.1, 3, d)
    # commuting (diagonal) covariances: tr term is sum (sqrt v1 - sqrt v2)^2
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(v1) - np.sqrt(v2)) ** 2)
    assert frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2)) == pytest.approx(expected, rel=1e-10)


def test_fid_commuting_rotated_covariances_closed_form():
    rng = np.random.default_rng(1)
    d = 32
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))  # same eigenvectors, so S1 and S2 commute
    v1, v2 = rng.uniform(0.0, 2, d), rng.uniform(0.0, 2, d)
    v1[:5] = 0.0  # singular: the case where sqrtm of a product goes complex
    s1, s2 = q @ np.diag(v1) @ q.T, q @ np.diag(v2) @ q.T
    mu = rng.normal(size=d)
    expected = 4.0 * d + np.sum((np.sqrt(v1) - np.sqrt(v2)) ** 2)  # |mu - (mu + 2)|^2 = 4d
    assert frechet_distance(mu, s1, mu + 2.0, s2) == pytest.approx(expected, rel=1e-8)


def test_fid_from_samples_matches_scipy_reference_and_known_gaussians():
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(4000, 8, generator=gen, dtype=torch.float64)
    b = torch.randn(4000, 8, generator=gen, dtype=torch.float64) * 2.0 + 1.0
    mu1, s1 = gaussian_stats(a)
    mu2, s2 = gaussian_stats(b)
    ours = frechet_distance(mu1, s1, mu2, s2)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real  # the reference implementation's route
    ref = np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * covmean)
    assert ours == pytest.approx(ref, rel=1e-8)
    # population value: 8 * 1^2 (means) + 8 * (1 - 2)^2 (std 1 vs 2) = 16
    assert ours == pytest.approx(16.0, rel=0.1)


def test_fid_is_zero_for_identical_and_finite_for_rank_deficient():
    f = torch.randn(10, 64)  # fewer samples than dims: singular covariance
    mu, s = gaussian_stats(f)
    assert frechet_distance(mu, s, mu, s) == pytest.approx(0.0, abs=1e-6)
    mu2, s2 = gaussian_stats(torch.randn(10, 64) + 1)
    value = frechet_distance(mu, s, mu2, s2)
    assert np.isfinite(value) and value > 0


def test_fid_rejects_mismatched_or_nan_stats():
    with pytest.raises(MetricsError, match="do not match"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(MetricsError, match="NaN"):
        frechet_distance(np.array([np.nan, 0.0]), np.eye(2), np.zeros(2), np.eye(2))


def test_kid_near_zero_for_same_distribution_and_positive_when_shifted():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(600, 16, generator=gen)
    y = torch.randn(600, 16, generator=gen)
    z = torch.randn(600, 16, generator=gen) + 0.5
    same, same_std = kernel_distance(x, y, num_subsets=20, subset_size=300)
    shifted, _ = kernel_distance(x, z, num_subsets=20, subset_size=300)
    assert abs(same) < 0.02
    assert shifted > 0.2 and shifted > 10 * max(abs(same), same_std)


def test_kid_unbiased_formula_by_hand():
    x = np.array([[1.0, 0.0], [0.0, 1.0]])
    y = np.array([[1.0, 1.0], [0.0, 0.0]])
    k = lambda a, b: (a @ b / 2 + 1) ** 3  # noqa: E731
    same = (k(x[0], x[1]) * 2 + k(y[0], y[1]) * 2) / 2
    cross = np.mean([k(a, b) for a in x for b in y])
    kid, std = kernel_distance(x, y, num_subsets=3, subset_size=2)
    assert kid == pytest.approx(same - 2 * cross) and std == pytest.approx(0.0)
