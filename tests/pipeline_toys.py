"""Two small real families for pipeline and component tests, registered from a
local module (not an entry point), as a user's notebook family would be:

- `toy_ae`: a tiny convolutional autoencoder (train, encode, reconstruct);
- `toy_refiner`: learns to sharpen the reconstructions of a frozen
  autoencoder given as component `base` (train, reconstruct).
"""
from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

from raygen.models import Capability, DataInfo, Family, Generator, build_model, register_family


class AEConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    width: int = 8
    latent: int = 2


class ToyAE(Generator):
    family = "toy_ae"
    capabilities = frozenset({Capability.TRAIN, Capability.ENCODE, Capability.RECONSTRUCT})

    def __init__(self, cfg: AEConfig, info: DataInfo):
        super().__init__(info)
        c = info.channels
        self.enc = nn.Sequential(nn.Conv2d(c, cfg.width, 3, stride=2, padding=1), nn.GELU(),
                                 nn.Conv2d(cfg.width, cfg.latent, 1))
        self.dec = nn.Sequential(nn.ConvTranspose2d(cfg.latent, cfg.width, 4, stride=2, padding=1), nn.GELU(),
                                 nn.Conv2d(cfg.width, c, 3, padding=1))

    def encode(self, images):
        return self.enc(images * 2 - 1)

    def decode(self, latents):
        return torch.sigmoid(self.dec(latents))

    def reconstruct(self, images):
        return self.decode(self.encode(images))

    def training_step(self, batch):
        return {"loss": (self.reconstruct(batch["image"]) - batch["image"]).pow(2).mean()}

    forward = training_step


class RefinerConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    width: int = 8


class ToyRefiner(Generator):
    family = "toy_refiner"
    capabilities = frozenset({Capability.TRAIN, Capability.RECONSTRUCT})

    def __init__(self, cfg: RefinerConfig, info: DataInfo, components):
        super().__init__(info)
        if "base" not in components:
            raise ValueError("toy_refiner needs model.components.base: an autoencoder trained earlier")
        self.attach_components(components)
        c = info.channels
        self.net = nn.Sequential(nn.Conv2d(c, cfg.width, 3, padding=1), nn.GELU(), nn.Conv2d(cfg.width, c, 3, padding=1))
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def reconstruct(self, images):
        with torch.no_grad():
            base = self.components["base"].reconstruct(images)
        return (base + self.net(base)).clamp(0, 1)

    def training_step(self, batch):
        return {"loss": (self.reconstruct(batch["image"]) - batch["image"]).pow(2).mean()}

    forward = training_step


INFO = DataInfo(channels=1, resolution=8)


def _refiner_flavor():
    torch.manual_seed(0)
    base = build_model("toy_ae", AEConfig(), INFO)
    return {"tiny": (RefinerConfig(), INFO, {"base": base})}


AE = register_family(Family(name="toy_ae", config_cls=AEConfig, build=lambda c, i, comps=None: ToyAE(c, i),
                            capabilities=ToyAE.capabilities, debug=lambda: {"tiny": (AEConfig(), INFO)},
                            description="test autoencoder"))
REFINER = register_family(Family(name="toy_refiner", config_cls=RefinerConfig,
                                 build=lambda c, i, comps=None: ToyRefiner(c, i, comps or {}),
                                 capabilities=ToyRefiner.capabilities, components={"base": Capability.RECONSTRUCT},
                                 debug=_refiner_flavor, description="test refiner of a frozen autoencoder"))
