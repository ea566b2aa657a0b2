"""FID and KID between generated images and a reference set.

`compute_fid` is the one entry point; `FIDEvaluator` keeps the extractor and the
reference statistics in memory for a trainer that evaluates every N steps, and
`get_dataset_extractor` turns `track.fid.extractor` into an extractor, training
the dataset's domain feature net once and reusing it afterwards. `fid_floor` is
the real-vs-real score (train images against the reference) that a model's FID
reads against.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

from raygen.metrics.errors import MetricsError
from raygen.metrics.extractors import TorchExtractor, load_extractor
from raygen.metrics.frechet import frechet_distance, gaussian_stats, kernel_distance
from raygen.metrics.preprocess import out_of_range_fraction
from raygen.metrics.reference import ReferenceStats, dataset_checksum, reference_stats


def _check_compatible(stats: ReferenceStats, extractor) -> None:
    if stats.extractor != extractor.name:
        raise MetricsError(f"reference statistics were computed with extractor '{stats.extractor}', not "
                           f"'{extractor.name}': recompute them with the extractor used for the generated images")
    if stats.preprocess and stats.preprocess != extractor.preprocess.key():
        raise MetricsError(f"reference statistics used preprocessing {stats.preprocess}, the extractor uses "
                           f"{extractor.preprocess.key()}: recompute them with the same settings")


def compute_fid(generated: torch.Tensor, reference: torch.Tensor | ReferenceStats, extractor, *,
                reference_count: int | None = None, cache_dir: str | Path | None = None,
                reference_checksum: str | None = None, kid_subsets: int = 100, kid_subset_size: int = 1000,
                seed: int = 0, bootstrap: int = 0) -> dict:
    """FID and KID of `generated` ([N, C, H, W] in the extractor's value range, any
    device) against reference images or precomputed `ReferenceStats`.

    Returns {"fid", "kid", "kid_std", "n_generated", "n_reference", "extractor",
    "generated_out_of_range"} (the last: fraction of generated sub-pixels the
    clamp to the value range changed; large values point at a range bug).
    FID is biased upward at small N: compare scores computed with the same N.
    With `bootstrap` > 0 the result also holds "fid_stderr" (see `fid_standard_error`)."""
    if generated.dim() != 4 or generated.shape[0] < 2:
        raise MetricsError(f"generated images must be [N, C, H, W] with N >= 2 (got shape {tuple(generated.shape)})")
    if isinstance(reference, ReferenceStats):
        stats = reference
    else:
        stats = reference_stats(reference, extractor, count=reference_count, seed=seed, cache_dir=cache_dir,
                                checksum=reference_checksum)
    _check_compatible(stats, extractor)
    features = extractor(generated)
    if not torch.isfinite(features).all():
        raise MetricsError("the extractor returned NaN/inf features for the generated images "
                           "(are there NaNs in the samples?)")
    mu, sigma = gaussian_stats(features)
    kid, kid_std = kernel_distance(features, stats.features, num_subsets=kid_subsets, subset_size=kid_subset_size,
                                   seed=seed)
    out = {"fid": frechet_distance(mu, sigma, stats.mu, stats.sigma), "kid": kid, "kid_std": kid_std,
           "n_generated": int(generated.shape[0]), "n_reference": int(stats.n), "extractor": extractor.name,
           "generated_out_of_range": out_of_range_fraction(generated, extractor.preprocess.value_range)}
    if bootstrap:
        out["fid_stderr"] = fid_standard_error(features, stats, rounds=bootstrap, seed=seed)
    return out


def fid_standard_error(features, stats: ReferenceStats, *, rounds: int = 20, seed: int = 0) -> float:
    """Standard error of FID from the finite generated sample, by bootstrap:
    resample the generated features with replacement `rounds` times, recompute
    FID against the same reference statistics, and take the standard deviation
    of those FIDs. It measures how much the score would move with another draw
    of the same number of samples (the reference side is fixed), so two trials
    whose FIDs differ by less than about two standard errors are not told apart.
    Costs `rounds` Fréchet distances on the features already extracted."""
    import numpy as np

    f = features.detach().to("cpu").double().numpy() if hasattr(features, "detach") else np.asarray(features, float)
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(rounds):
        mu, sigma = gaussian_stats(f[rng.integers(0, len(f), len(f))])
        values.append(frechet_distance(mu, sigma, stats.mu, stats.sigma))
    return float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


class FIDEvaluator:
    """Extractor + reference statistics, kept for repeated evaluation during training."""

    def __init__(self, extractor, reference: torch.Tensor | ReferenceStats, *, reference_count: int | None = None,
                 cache_dir: str | Path | None = None, seed: int = 0, **kid_options):
        self.extractor = extractor
        self.seed = seed
        self.kid_options = kid_options
        self.stats = reference if isinstance(reference, ReferenceStats) else reference_stats(
            reference, extractor, count=reference_count, seed=seed, cache_dir=cache_dir)

    def __call__(self, generated: torch.Tensor) -> dict:
        return compute_fid(generated, self.stats, self.extractor, seed=self.seed, **self.kid_options)


def get_dataset_extractor(fid_spec_extractor: str, dataset_dir: str | Path | None = None,
                          images: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                          cache_dir: str | Path = "runs/metrics-cache", *, device: str | torch.device = "cpu",
                          **fit_options) -> TorchExtractor:
    """The extractor `track.fid.extractor` asks for.

    "domain": the domain feature net of this dataset, fit on first use and
    cached under `cache_dir` by its id, which hashes the fit images, labels and
    recipe. A prepared `dataset_dir` is always fit on `fit_images(dataset_dir)`,
    whatever split the caller scores against, so training, `raygen eval` and
    `raygen metrics fid` share one net; `images`/`labels` are for data held
    only in memory (give one or the other). "domain:PATH_OR_ID" and
    "inception:PATH" load as is. `fit_options` are `DomainFitConfig` fields
    (e.g. steps)."""
    if fid_spec_extractor != "domain":
        return load_extractor(fid_spec_extractor, cache_dir=cache_dir, device=device)
    from raygen.metrics.domain import fit_domain_features, fit_images
    if images is not None and dataset_dir is not None:
        raise MetricsError("get_dataset_extractor: give dataset_dir or images, not both (a dataset folder is "
                           "always fit on its own first train images, so one dataset has one feature net)")
    if images is None:
        if dataset_dir is None:
            raise MetricsError("track.fid.extractor 'domain' needs the dataset: pass dataset_dir or images (and labels)")
        images, labels = fit_images(dataset_dir)
    return fit_domain_features(images, labels, cache_dir=cache_dir, **fit_options).to(device)


def fid_floor(train_images: torch.Tensor, reference: torch.Tensor | ReferenceStats, extractor, *,
              cache_dir: str | Path | None = None, seed: int = 0) -> float:
    """Real-vs-real FID: the first n train images against the reference, where n is
    the reference's size. It is what a generator that reproduced the data would
    score at this n with this extractor (FID is biased upward at small n), so a
    model's FID reads against it. With `cache_dir`, the reference statistics are
    cached as usual and the floor is written next to them (`floor-<key>.json`)."""
    if isinstance(reference, ReferenceStats):
        stats = reference
    else:
        stats = reference_stats(reference, extractor, seed=seed, cache_dir=cache_dir)
    _check_compatible(stats, extractor)
    real = train_images[:stats.n]
    if real.dim() != 4 or real.shape[0] < 2:
        raise MetricsError(f"the FID floor needs at least 2 train images [N, C, H, W] (got shape {tuple(real.shape)})")
    path = None
    if cache_dir is not None and stats.key:
        spec = {"v": 1, "reference": stats.key, "train": dataset_checksum(real), "extractor": extractor.name,
                "preprocess": extractor.preprocess.key()}
        key = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:20]
        path = Path(cache_dir) / f"floor-{key}.json"
        if path.is_file():
            return float(json.loads(path.read_text())["fid_floor"])
    mu, sigma = gaussian_stats(extractor(real))
    value = frechet_distance(mu, sigma, stats.mu, stats.sigma)
    if path is not None:
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"fid_floor": value, "n_train": int(real.shape[0]), "n_reference": int(stats.n),
                                   "extractor": extractor.name, "reference_key": stats.key}))
        os.replace(tmp, path)  # readers never see a half-written file
    return value
