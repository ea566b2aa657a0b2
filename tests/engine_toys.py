"""A tiny denoising generator and an in-memory batch source for engine tests.

The engine's properties (accumulation, exact resume, NaN guard) are tested
without Ray on this small real model; its training step draws noise and uses
dropout so that RNG state restore is exercised too.
"""
from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

from raygen.models.base import DataInfo, Generator
from raygen.models.registry import Family, register_family


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
    def sample(self, n, *, labels=None, captions=None, generator=None, **options):
        info = self.data_info
        z = torch.rand(n, info.channels, info.resolution, info.resolution, generator=generator)
        return self.net(z).clamp(0, 1)


TOY = register_family(Family(name="toy", config_cls=ToyConfig, build=lambda cfg, info: ToyDenoiser(cfg, info),
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
