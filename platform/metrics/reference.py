"""Reference statistics of a dataset, computed once and cached on disk.

The cache key is (dataset checksum, extractor name, preprocessing, count, seed):
change any of them and the statistics are recomputed, never silently reused.
Files are safetensors (mu and sigma in float64, features in float32 for KID).
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import load_file, save_file

from raygen.metrics.errors import MetricsError
from raygen.metrics.frechet import gaussian_stats

KID_FEATURES_MAX = 10_000  # KID uses subsets of ~1000; more stored features only cost disk


def dataset_checksum(images: torch.Tensor, labels: torch.Tensor | None = None) -> str:
    """Content hash of a dataset: the images quantized to uint8 (so the float and
    uint8 forms of one dataset agree), their shape, and the labels if given."""
    x = images.detach().cpu()
    if x.dtype != torch.uint8:
        from raygen.images import quantize
        x = quantize(x)  # the one rounding rule (raygen.images)
    h = hashlib.sha256(repr(tuple(x.shape)).encode())
    h.update(x.contiguous().numpy().tobytes())
    if labels is not None:
        h.update(torch.as_tensor(labels).detach().cpu().long().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


@dataclass
class ReferenceStats:
    mu: np.ndarray              # [D] float64
    sigma: np.ndarray           # [D, D] float64
    features: np.ndarray        # [M, D] float32, M <= KID_FEATURES_MAX, for KID
    n: int                      # images the statistics were computed from
    extractor: str
    preprocess: dict = field(default_factory=dict)
    key: str = ""

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {"n": str(self.n), "extractor": self.extractor, "preprocess": json.dumps(self.preprocess),
                "key": self.key}
        fd, tmp = tempfile.mkstemp(prefix=".ref-", suffix=".tmp", dir=path.parent)
        os.close(fd)
        save_file({"mu": np.ascontiguousarray(self.mu, np.float64),
                   "sigma": np.ascontiguousarray(self.sigma, np.float64),
                   "features": np.ascontiguousarray(self.features, np.float32)}, tmp, metadata=meta)
        os.replace(tmp, path)  # readers never see a half-written file
        return path

    @classmethod
    def load(cls, path: str | Path) -> "ReferenceStats":
        from safetensors import safe_open
        with safe_open(str(path), framework="numpy") as f:
            meta = f.metadata() or {}
        t = load_file(str(path))
        return cls(mu=t["mu"], sigma=t["sigma"], features=t["features"], n=int(meta.get("n", len(t["features"]))),
                   extractor=meta.get("extractor", ""), preprocess=json.loads(meta.get("preprocess", "{}")),
                   key=meta.get("key", ""))


def stats_key(checksum: str, extractor, count: int | None, seed: int) -> str:
    spec = {"v": 1, "dataset": checksum, "extractor": extractor.name, "preprocess": extractor.preprocess.key(),
            "count": count, "seed": seed}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:20]


def stats_from_features(features: torch.Tensor, extractor, *, key: str = "", seed: int = 0) -> ReferenceStats:
    f = features.detach().cpu().double().numpy()
    mu, sigma = gaussian_stats(f)
    kid = f
    if len(f) > KID_FEATURES_MAX:
        kid = f[np.sort(np.random.default_rng(seed).choice(len(f), KID_FEATURES_MAX, replace=False))]
    return ReferenceStats(mu=mu, sigma=sigma, features=kid.astype(np.float32), n=len(f), extractor=extractor.name,
                          preprocess=extractor.preprocess.key(), key=key)


def reference_stats(images: torch.Tensor, extractor, *, count: int | None = None, seed: int = 0,
                    cache_dir: str | Path | None = None, checksum: str | None = None) -> ReferenceStats:
    """Statistics of `extractor` features over `images` (at most `count`, a seeded
    random subset). With `cache_dir`, read from / written to
    `cache_dir/ref-<key>.safetensors`."""
    if images.dim() != 4:
        raise MetricsError(f"reference images must be [N, C, H, W] (got shape {tuple(images.shape)})")
    n = images.shape[0]
    if count is not None and count < 2:
        raise MetricsError(f"reference count must be at least 2 (got {count})")
    key = path = None
    if cache_dir is not None:
        key = stats_key(checksum or dataset_checksum(images), extractor, count, seed)
        path = Path(cache_dir) / f"ref-{key}.safetensors"
        if path.is_file():
            return ReferenceStats.load(path)
    if count is not None and count < n:
        idx = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:count].sort().values
        images = images[idx]
    stats = stats_from_features(extractor(images), extractor, key=key or "", seed=seed)
    if path is not None:
        stats.save(path)
    return stats
