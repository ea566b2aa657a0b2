"""Fréchet distance and kernel (MMD) distance between feature sets, in float64.

FID = |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2)).

The trace of the matrix square root is taken as the sum of square roots of the
eigenvalues of the symmetric PSD matrix sqrt(S1) S2 sqrt(S1), which has the same
eigenvalues as S1 S2. Unlike `scipy.linalg.sqrtm(S1 @ S2)` this never yields
complex parts or NaN for singular (few-sample) covariances: both symmetric
eigendecompositions are stable and tiny negative eigenvalues from round-off are
clipped to zero.
"""
from __future__ import annotations

import numpy as np

from raygen.metrics.errors import MetricsError


def _as_float64(x) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().to("cpu").double().numpy()
    return np.asarray(x, dtype=np.float64)


def gaussian_stats(features) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (unbiased, N-1) covariance of features [N, D], float64."""
    f = _as_float64(features)
    if f.ndim != 2 or f.shape[0] < 2:
        raise MetricsError(f"need at least 2 feature vectors [N, D] for statistics (got shape {f.shape})")
    return f.mean(0), np.cov(f, rowvar=False).reshape(f.shape[1], f.shape[1])


def _psd_sqrt(s: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((s + s.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def trace_sqrt_product(sigma1, sigma2) -> float:
    """tr((S1 S2)^(1/2)) for symmetric PSD S1, S2."""
    s1, s2 = _as_float64(sigma1), _as_float64(sigma2)
    r = _psd_sqrt(s1)
    m = r @ s2 @ r
    w = np.linalg.eigvalsh((m + m.T) / 2)
    return float(np.sqrt(np.clip(w, 0, None)).sum())


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2)."""
    mu1, mu2 = _as_float64(mu1).ravel(), _as_float64(mu2).ravel()
    s1, s2 = np.atleast_2d(_as_float64(sigma1)), np.atleast_2d(_as_float64(sigma2))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.size, mu1.size):
        raise MetricsError(f"statistics do not match: mu {mu1.shape} vs {mu2.shape}, sigma {s1.shape} vs {s2.shape} "
                           "(were they computed with different extractors?)")
    if not (np.isfinite(mu1).all() and np.isfinite(mu2).all() and np.isfinite(s1).all() and np.isfinite(s2).all()):
        raise MetricsError("feature statistics hold NaN or inf: the images or the extractor produced non-finite values")
    diff = mu1 - mu2
    value = diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * trace_sqrt_product(s1, s2)
    return float(max(value, 0.0))  # round-off may leave -1e-12 for identical inputs


def kernel_distance(features1, features2, *, num_subsets: int = 100, subset_size: int = 1000,
                    seed: int = 0) -> tuple[float, float]:
    """KID: unbiased MMD^2 with the cubic polynomial kernel k(x, y) = (x.y / d + 1)^3,
    averaged over random subsets (Binkowski et al. 2018). Returns (mean, std).

    Unbiased, so it can be slightly negative for samples of one distribution;
    the subset size is min(subset_size, N1, N2)."""
    x_all, y_all = _as_float64(features1), _as_float64(features2)
    if x_all.ndim != 2 or y_all.ndim != 2 or x_all.shape[1] != y_all.shape[1]:
        raise MetricsError(f"feature sets must be [N, D] with the same D (got {x_all.shape} and {y_all.shape})")
    m = min(subset_size, len(x_all), len(y_all))
    if m < 2:
        raise MetricsError(f"KID needs at least 2 samples on each side (got {len(x_all)} and {len(y_all)})")
    d = x_all.shape[1]
    rng = np.random.default_rng(seed)
    values = np.empty(num_subsets)
    for i in range(num_subsets):
        x = x_all[rng.choice(len(x_all), m, replace=False)]
        y = y_all[rng.choice(len(y_all), m, replace=False)]
        kxx = (x @ x.T / d + 1) ** 3
        kyy = (y @ y.T / d + 1) ** 3
        kxy = (x @ y.T / d + 1) ** 3
        same = (kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (m * (m - 1))
        values[i] = same - 2.0 * kxy.mean()
    return float(values.mean()), float(values.std())
