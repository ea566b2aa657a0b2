"""Feature extractors for FID/KID: always named, preprocessing explicit.

An extractor is anything with `.name` (identifies the features: two feature sets
are comparable only when their names match), `.dim`, `.preprocess` and
`__call__(images [N, C, H, W] in [0, 1]) -> float32 features [N, D]` on the CPU.

`load_extractor` resolves the strings used by `track.fid.extractor`:
  "inception:PATH"      InceptionV3 pool3 features from a local weights file
  "domain:PATH"         a domain feature net folder written by `fit_domain_features`
  "domain:ID"           the same, looked up by content id under `cache_dir`
("domain" alone needs the dataset: see `raygen.metrics.get_dataset_extractor`.)
"""
from __future__ import annotations

from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
from torch import nn

from raygen.metrics.errors import MetricsError
from raygen.metrics.preprocess import Preprocess


@runtime_checkable
class FeatureExtractor(Protocol):
    name: str
    dim: int
    preprocess: Preprocess

    def __call__(self, images: torch.Tensor) -> torch.Tensor: ...


class TorchExtractor:
    """A network behind explicit preprocessing, run in batches without gradients.

    `net` takes preprocessed images (float [B, C, size, size] in [0, 1]) and
    returns [B, D]; any normalisation the network needs lives inside `net`.
    Inputs may sit on any device; features come back as float32 on the CPU.
    """

    def __init__(self, name: str, net: nn.Module, dim: int, preprocess: Preprocess, *,
                 batch_size: int = 64, device: str | torch.device = "cpu"):
        self.name = name
        self.dim = dim
        self.preprocess = preprocess
        self.batch_size = batch_size
        self.device = torch.device(device)
        self.net = net.eval().requires_grad_(False).to(self.device)

    def to(self, device: str | torch.device) -> "TorchExtractor":
        self.device = torch.device(device)
        self.net.to(self.device)
        return self

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if images.dim() != 4:
            raise MetricsError(f"images must be [N, C, H, W] (got shape {tuple(images.shape)})")
        out = []
        for start in range(0, images.shape[0], self.batch_size):
            x = self.preprocess(images[start:start + self.batch_size].to(self.device))
            out.append(self.net(x).float().flatten(1).cpu())
        if not out:
            return torch.zeros(0, self.dim)
        return torch.cat(out)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, dim={self.dim}, device={self.device})"


def load_extractor(spec: str, *, cache_dir: str | Path | None = None, device: str | torch.device = "cpu",
                   batch_size: int | None = None) -> TorchExtractor:
    """Resolve "inception:PATH", "domain:PATH" or "domain:ID" to an extractor."""
    kind, _, arg = spec.partition(":")
    kwargs = {"device": device}
    if batch_size:
        kwargs["batch_size"] = batch_size
    if kind == "inception":
        from raygen.metrics.inception import load_inception
        if not arg:
            raise MetricsError("extractor 'inception' needs the weights file: use inception:PATH "
                               "(e.g. inception:weights/pt_inception-2015-12-05-6726825d.pth)")
        return load_inception(arg, **kwargs)
    if kind == "domain":
        from raygen.metrics.domain import load_domain_extractor
        if not arg:
            raise MetricsError("extractor 'domain' alone names no feature net: call get_dataset_extractor(...) "
                               "with the dataset, or use domain:PATH (a folder from `raygen metrics fit-features`) "
                               "or domain:ID with cache_dir")
        return load_domain_extractor(arg, cache_dir=cache_dir, **kwargs)
    raise MetricsError(f"unknown extractor '{spec}'; use 'domain', 'domain:PATH_OR_ID' or 'inception:PATH'")
