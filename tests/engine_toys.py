"""Tiny models and an in-memory batch source for engine tests.

The engine's properties (accumulation, exact resume, NaN guard) are tested
without Ray on a small real denoiser; its training step draws noise and uses
dropout so that RNG state restore is exercised too. `ToyMeans` is fitted
without gradients (capability 'fit'): running per-channel means of the
pixels it is shown, over a random half of them, so the RNG matters there too.
"""
from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

from raygen.models.base import DataInfo, Generator
from raygen.models.registry import Family, register_family
from raygen.models.sampling import check_generators, per_image_rand
from raygen.models.sampling import per_image_rand


class ToyConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    hidden: int = 8
    noise: float = 0.2
    dropout: float = 0.1


class ToyDenoiser(Generator):
    def __init__(self, cfg: ToyConfig, info: DataInfo):
        super().__init__(info)
        c = info.channels
        self.cfg = cfg
        self.net = nn.Sequential(nn.Conv2d(c, cfg.hidden, 3, padding=1), nn.GELU(), nn.Dropout(cfg.dropout),
                                 nn.Conv2d(cfg.hidden, c, 3, padding=1))

    def training_step(self, batch):
        x = batch["image"]
        noisy = x + self.cfg.noise * torch.randn_like(x)
        loss = (self.net(noisy) - x).pow(2).mean()
        return {"loss": loss, "noise_level": torch.tensor(self.cfg.noise)}

    @torch.no_grad()
    def sample(self, conditions, params, generators):
        info = self.data_info
        z = per_image_rand(generators, info.shape).to(self.net[0].weight.device)
        return self.net(z).clamp(0, 1)


TOY = register_family(Family(name="toy", config_cls=ToyConfig, build=lambda cfg, info, components=None: ToyDenoiser(cfg, info),
                             capabilities={"train", "sample"},
                             debug=lambda: {"tiny": (ToyConfig(), DataInfo(channels=1, resolution=8))},
                             description="test-only denoiser"))
INFO = DataInfo(channels=1, resolution=8)


class ListBatches:
    """Deterministic epochs over a fixed tensor: order is a function of (seed, epoch)."""

    def __init__(self, images: torch.Tensor, batch_size: int, seed: int = 0, shuffle: bool = True):
        self.images, self.batch_size, self.seed, self.shuffle = images, batch_size, seed, shuffle
        self.corrupt_count = 0

    def epoch(self, epoch: int, skip: int = 0):
        n = len(self.images)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed * 1000 + epoch)) if self.shuffle else torch.arange(n)
        for i, start in enumerate(range(0, n - self.batch_size + 1, self.batch_size)):
            if i < skip:
                continue
            idx = order[start:start + self.batch_size]
            yield {"image": self.images[idx].clone(), "label": torch.zeros(len(idx), dtype=torch.long)}


def toy_images(n: int = 64, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    base = torch.linspace(0, 1, 8).view(1, 1, 1, 8).expand(n, 1, 8, 8)
    return (base * torch.rand(n, 1, 1, 1, generator=g) + 0.1 * torch.rand(n, 1, 8, 8, generator=g)).clamp(0, 1)


class MeansConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    keep: float = 0.5  # the share of pixels each batch contributes (drawn at random)


class ToyMeans(Generator):
    """Per-channel pixel means, fitted without gradients: the state is a
    parameter (the means, as a codebook would be) and two buffers (the sums)."""

    def __init__(self, cfg: MeansConfig, info: DataInfo):
        super().__init__(info)
        self.cfg = cfg
        self.mean = nn.Parameter(torch.zeros(info.channels), requires_grad=False)
        self.register_buffer("total", torch.zeros(info.channels, dtype=torch.float64))
        self.register_buffer("count", torch.zeros(info.channels, dtype=torch.float64))

    def fit_statistics(self, batch):
        x = batch["image"].double()
        keep = (torch.rand(x.shape, dtype=torch.float64) < self.cfg.keep).to(x.dtype)  # the global RNG
        return {"sum": (x * keep).sum(dim=(0, 2, 3)), "count": keep.sum(dim=(0, 2, 3))}

    def apply_fit(self, stats, step):
        before = self.mean.detach().clone()
        self.total += stats["sum"]
        self.count += stats["count"]
        self.mean.copy_((self.total / self.count.clamp(min=1)).float())
        return {"loss": float((self.mean - before).abs().max()), "pixels": float(self.count.sum())}

    @torch.no_grad()
    def sample(self, conditions, params, generators):
        check_generators(conditions.n, generators)
        noise = per_image_rand(generators, self.data_info.shape) - 0.5
        return (self.mean.view(1, -1, 1, 1) + 0.1 * noise).clamp(0, 1)


def build_means(cfg: MeansConfig, info: DataInfo, components=None) -> ToyMeans:
    return ToyMeans(cfg, info)


TOY_MEANS = register_family(Family(name="toy-means", config_cls=MeansConfig, build=build_means,
                                   capabilities={"fit", "sample"},
                                   debug=lambda: {"tiny": (MeansConfig(), DataInfo(channels=1, resolution=8))},
                                   description="test-only per-channel means, fitted without gradients"))
