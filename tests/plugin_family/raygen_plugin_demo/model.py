"""A tiny conditional convolutional VAE, written against raygen's public
family protocol only (names exported by `raygen.models`).

    encoder  image (+ label embedding) -> conv, stride-2 conv -> mu, log-variance of z
    decoder  z (+ label embedding) -> linear -> transposed conv -> conv -> per-pixel logits

Trained by the ELBO with Bernoulli pixels (binary cross-entropy on [0, 1]
images) and a Gaussian prior; the loss is per sub-pixel, so it does not grow
with the image size. Sampling draws z ~ N(0, temperature²) and, where no label
is given, a label, all from each image's own generator.
"""
from __future__ import annotations

from typing import Any, Literal, Sequence

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from raygen.models import Conditions, DataInfo, Generator, SamplingParams


class CVAEConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    conditioning: Literal["none", "label"] = Field("label", description="what samples are conditioned on")
    latent: int = Field(8, ge=1, le=256, description="size of the latent code z")
    width: int = Field(16, ge=2, le=256, description="channels of the first conv layer (doubled after the stride)")
    beta: float = Field(1.0, ge=0.0, description="weight of the KL term")

    @classmethod
    def debug(cls, **overrides: Any) -> "CVAEConfig":
        return cls.model_validate({"latent": 4, "width": 4, **overrides})


class CVAESampling(SamplingParams):
    temperature: float = Field(1.0, ge=0.0, le=5.0, description="scale of the latent noise (0 = the prior's mean)")


class CVAE(Generator):
    def __init__(self, config: CVAEConfig, data_info: DataInfo):
        super().__init__(data_info)
        c, h, w = data_info.shape
        if h % 2 or w % 2:
            raise ValueError(f"democvae needs an even height and width, got {h}x{w}")
        if config.conditioning == "label" and data_info.num_classes < 1:
            raise ValueError("conditioning 'label' needs a dataset with labels; use conditioning 'none'")
        self.config = config
        self.condition_kind = config.conditioning
        self.num_classes = data_info.num_classes if config.conditioning == "label" else 0
        cond = 8 if self.num_classes else 0
        self.embed = nn.Embedding(self.num_classes + 1, cond) if self.num_classes else None  # last row: no label
        wd, self.small = config.width, (2 * config.width, h // 2, w // 2)
        flat = self.small[0] * self.small[1] * self.small[2]
        self.encoder = nn.Sequential(nn.Conv2d(c, wd, 3, padding=1), nn.SiLU(),
                                     nn.Conv2d(wd, 2 * wd, 4, stride=2, padding=1), nn.SiLU(), nn.Flatten())
        self.to_posterior = nn.Linear(flat + cond, 2 * config.latent)
        self.from_latent = nn.Linear(config.latent + cond, flat)
        self.decoder = nn.Sequential(nn.SiLU(), nn.ConvTranspose2d(2 * wd, wd, 4, stride=2, padding=1), nn.SiLU(),
                                     nn.Conv2d(wd, c, 3, padding=1))

    def _cond(self, labels: torch.Tensor | None, n: int) -> torch.Tensor:
        device = self.to_posterior.weight.device
        if self.embed is None:
            return torch.zeros(n, 0, device=device)
        if labels is None:
            labels = torch.full((n,), -1, dtype=torch.long)
        labels = labels.to(device).long()
        return self.embed(torch.where(labels < 0, torch.full_like(labels, self.num_classes), labels))

    def _decode(self, z: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        h = self.from_latent(torch.cat([z, cond], 1)).reshape(z.shape[0], *self.small)
        return self.decoder(h)  # logits

    def training_step(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        x = batch["image"].to(self.to_posterior.weight.device)
        cond = self._cond(batch.get("label"), x.shape[0])
        mu, logvar = self.to_posterior(torch.cat([self.encoder(x), cond], 1)).chunk(2, dim=1)
        z = mu + torch.randn_like(mu) * (0.5 * logvar).exp()
        recon = F.binary_cross_entropy_with_logits(self._decode(z, cond), x, reduction="sum") / x.numel()
        kl = 0.5 * (mu.pow(2) + logvar.exp() - 1 - logvar).sum() / x.numel()
        return {"loss": recon + self.config.beta * kl, "recon": recon.detach(), "kl": kl.detach()}

    @torch.no_grad()
    def sample(self, conditions: Conditions, params: CVAESampling,
               generators: Sequence[torch.Generator]) -> torch.Tensor:
        n = conditions.n
        if n < 1 or len(generators) != n:
            raise ValueError(f"sample needs one torch.Generator per image: {n} conditions, {len(generators)} generators")
        device = self.to_posterior.weight.device
        labels = conditions.columns(self.data_info).get("label")
        z, drawn = [], []
        for i, g in enumerate(generators):  # every random number of image i comes from generator i
            z.append(torch.randn(self.config.latent, generator=g, device=g.device))
            if labels is not None and int(labels[i]) < 0:
                drawn.append(int(torch.randint(self.num_classes, (1,), generator=g, device=g.device)))
            else:
                drawn.append(None if labels is None else int(labels[i]))
        z = torch.stack(z).to(device) * params.temperature
        chosen = None if labels is None else torch.tensor(drawn, dtype=torch.long)
        return torch.sigmoid(self._decode(z, self._cond(chosen, n))).float()


def build(config: CVAEConfig, data_info: DataInfo, components=None) -> CVAE:
    return CVAE(config, data_info)
