"""FID and KID between generated images and a reference set.

`compute_fid` is the one entry point; `FIDEvaluator` keeps the extractor and the
reference statistics in memory for a trainer that evaluates every N steps, and
`get_dataset_extractor` turns `track.fid.extractor` into an extractor, training
the dataset's domain feature net once and reusing it afterwards.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from raygen.metrics.errors import MetricsError
from raygen.metrics.extractors import TorchExtractor, load_extractor
from raygen.metrics.frechet import frechet_distance, gaussian_stats, kernel_distance
from raygen.metrics.preprocess import out_of_range_fraction
from raygen.metrics.reference import ReferenceStats, dataset_checksum, reference_stats
from raygen.locks import file_lock


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
                seed: int = 0) -> dict:
    """FID and KID of `generated` ([N, C, H, W] in the extractor's value range, any
    device) against reference images or precomputed `ReferenceStats`.

    Returns {"fid", "kid", "kid_std", "n_generated", "n_reference", "extractor",
    "generated_out_of_range"} (the last: fraction of generated sub-pixels the
    clamp to the value range changed; large values point at a range bug).
    FID is biased upward at small N: compare scores computed with the same N."""
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
    return {"fid": frechet_distance(mu, sigma, stats.mu, stats.sigma), "kid": kid, "kid_std": kid_std,
            "n_generated": int(generated.shape[0]), "n_reference": int(stats.n), "extractor": extractor.name,
            "generated_out_of_range": out_of_range_fraction(generated, extractor.preprocess.value_range)}


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

    "domain": the domain feature net of this dataset, trained on first use (on
    `images`/`labels`, or the train split read from `dataset_dir`) and cached
    under `cache_dir` keyed by the dataset checksum; later calls (other runs,
    other trials) load it. "domain:PATH_OR_ID" and "inception:PATH" load as is.
    `fit_options` go to `fit_domain_features` (e.g. max_seconds)."""
    if fid_spec_extractor != "domain":
        return load_extractor(fid_spec_extractor, cache_dir=cache_dir, device=device)
    from raygen.metrics.domain import fit_domain_features, load_domain_extractor
    if images is None:
        if dataset_dir is None:
            raise MetricsError("track.fid.extractor 'domain' needs the dataset: pass images (and labels) or dataset_dir")
        from raygen.metrics.imageio import load_dataset_images
        images, labels, _ = load_dataset_images(dataset_dir, "train")
    cache_dir = Path(cache_dir)
    checksum = dataset_checksum(images, labels)
    index = cache_dir / f"domain-data-{checksum}.json"

    def cached():
        if index.is_file():
            ident = json.loads(index.read_text())["id"]
            if (cache_dir / f"domain-{ident}").is_dir():
                return load_domain_extractor(ident, cache_dir=cache_dir, device=device)
        return None

    ext = cached()
    if ext is not None:
        return ext
    with file_lock(cache_dir / f".domain-{checksum}.lock"):
        ext = cached()  # another process may have finished while this one waited
        if ext is not None:
            return ext
        ext = fit_domain_features(images, labels, cache_dir=cache_dir, dataset_checksum=checksum, **fit_options)
        tmp = index.with_suffix(".tmp")
        tmp.write_text(json.dumps({"id": ext.id, "dataset_checksum": checksum,
                                   "dataset_dir": str(dataset_dir) if dataset_dir else None}))
        os.replace(tmp, index)
    return ext.to(device)
