"""vae: a KL-regularised autoencoder (diffusers `AutoencoderKL`), the first
stage of latent diffusion (seed 003's "vae" folder).

    loss = MSE(x, x_hat) + kl_weight * KL(q(z|x) || N(0, I)) / pixels [+ perceptual_weight * perceptual]

The seed's KL blew up to inf then NaN; here the posterior's log-variance is
clamped (`logvar_range`) before the KL and the sample, and a step whose loss
is still not finite is skipped and counted by the trainer's NaN guard.

`encode` returns latents normalised by a shift and a scale *measured on the
data* while the VAE trains (running mean and variance of the posterior means,
as diffusers' `shift_factor` / `scaling_factor`), so a diffusion model on top
sees roughly unit-variance latents without a hand-set 0.18215.

The optional perceptual loss is LPIPS's recipe (Zhang et al. 2018) on
torchvision's VGG16 read from local files: unit-normalised features of five
ReLU layers, squared differences weighted by LPIPS's learned linear layers
(`lpips_weights`, the official `vgg.pth`) or uniformly without them (a plain
VGG feature loss, the seed's "vgg loss").
"""
from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from raygen.models.base import DataInfo, Generator
from raygen.models.capabilities import Capability
from raygen.models.registry import Family, register_family

# LPIPS's VGG16 layers (relu1_2, relu2_2, relu3_3, relu4_3, relu5_3) as indices into vgg16().features
VGG_LAYERS = (3, 8, 15, 22, 29)
VGG_CHANNELS = (64, 128, 256, 512, 512)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class PerceptualOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    vgg_weights: str = Field(description="local torchvision VGG16 weights (.pth or .safetensors; the whole model "
                                         "or just its `features.*`); nothing is downloaded")
    lpips_weights: str | None = Field(None, description="LPIPS's linear layers (its vgg.pth: lin0..lin4); "
                                                        "without them every channel weighs the same")
    weight: float = Field(0.1, gt=0.0, description="weight of the perceptual term in the loss")


class VAEConfig(BaseModel):
    """AutoencoderKL options; the latent is [latent_channels, H / 2^(levels-1), W / 2^(levels-1)]."""
    model_config = ConfigDict(extra="forbid")

    widths: list[int] = Field([32, 64], min_length=1, max_length=5, description="encoder/decoder block widths; "
                              "each level but the last halves the resolution")
    layers_per_block: int = Field(1, ge=1, le=4)
    latent_channels: int = Field(4, ge=1, le=64)
    norm_groups: int = Field(8, ge=1, description="GroupNorm groups (must divide every width)")
    mid_attention: bool = Field(True, description="self-attention in the middle blocks")
    kl_weight: float = Field(1e-3, ge=0.0, description="weight of the KL term (per pixel)")
    logvar_range: tuple[float, float] = Field((-20.0, 10.0), description="clamp of the posterior log-variance "
                                              "(guards the seed's KL blow-up)")
    latent_momentum: float = Field(0.01, gt=0.0, le=1.0, description="running-statistics momentum of the latent "
                                                                      "shift and scale measured while training")
    perceptual: PerceptualOptions | None = Field(None, description="optional VGG/LPIPS perceptual loss")

    @model_validator(mode="after")
    def _checks(self) -> "VAEConfig":
        bad = [w for w in self.widths if w % self.norm_groups]
        if bad:
            raise ValueError(f"widths {self.widths}: every width must be a multiple of norm_groups "
                             f"({self.norm_groups}); {bad[0]} is not")
        lo, hi = self.logvar_range
        if not lo < hi:
            raise ValueError(f"logvar_range: the low end {lo} must be below the high end {hi}")
        return self

    @classmethod
    def debug(cls, **overrides) -> "VAEConfig":
        return cls.model_validate({"widths": [8, 16], "norm_groups": 4, "latent_channels": 2, **overrides})


def _read_state(path: str) -> dict[str, torch.Tensor]:
    if not Path(path).is_file():
        raise ValueError(f"perceptual: {path} is not a file; give local weights (nothing is downloaded)")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file
        return load_file(path)
    return torch.load(path, map_location="cpu", weights_only=True)


class PerceptualLoss(nn.Module):
    """LPIPS-style distance on a frozen VGG16 read from local files."""

    def __init__(self, options: PerceptualOptions):
        super().__init__()
        import torchvision
        self.features = torchvision.models.vgg16().features[: VGG_LAYERS[-1] + 1]
        state = _read_state(options.vgg_weights)
        state = {k[len("features."):] if k.startswith("features.") else k: v for k, v in state.items()
                 if not k.startswith("classifier.")}
        state = {k: v for k, v in state.items() if int(k.split(".")[0]) <= VGG_LAYERS[-1]}
        self.features.load_state_dict(state)
        if options.lpips_weights:
            lin = _read_state(options.lpips_weights)
            weights = [lin[f"lin{i}.model.1.weight"].reshape(1, -1, 1, 1).float() for i in range(len(VGG_LAYERS))]
        else:
            weights = [torch.ones(1, c, 1, 1) for c in VGG_CHANNELS]
        for i, w in enumerate(weights):
            self.register_buffer(f"lin{i}", w, persistent=False)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "PerceptualLoss":
        return super().train(False)

    def _feats(self, images: torch.Tensor) -> list[torch.Tensor]:
        x = images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images
        if min(x.shape[-2:]) < 32:  # VGG pools 4 times: give small images room
            x = F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False)
        x = (x - self.mean) / self.std
        out = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in VGG_LAYERS:
                out.append(x / (x.pow(2).sum(1, keepdim=True).sqrt() + 1e-10))
        return out

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Per-image distance [B] between images in [0, 1]."""
        total = 0.0
        for i, (fa, fb) in enumerate(zip(self._feats(a), self._feats(b))):
            total = total + (getattr(self, f"lin{i}") * (fa - fb).pow(2)).sum(1).mean((1, 2))
        return total


class VAEModel(Generator):
    family = "vae"
    capabilities = frozenset({Capability.TRAIN, Capability.ENCODE, Capability.RECONSTRUCT})

    def __init__(self, config: VAEConfig, data_info: DataInfo):
        super().__init__(data_info)
        self.config = config
        levels = len(config.widths)
        need = 2 ** (levels - 1)
        if data_info.height % need or data_info.width % need:
            raise ValueError(f"vae: {levels} levels need a side divisible by {need}, got "
                             f"{data_info.height}x{data_info.width}")
        self.ae = AutoencoderKL(**self.ae_config())
        # running statistics of the posterior means: [updates, mean, mean of squares]
        self.register_buffer("latent_stats", torch.zeros(3, dtype=torch.float64))
        # kept out of the module tree: not in the weights, the EMA or DDP's buffer broadcast
        object.__setattr__(self, "perceptual", PerceptualLoss(config.perceptual) if config.perceptual else None)

    def ae_config(self) -> dict[str, Any]:
        c, info = self.config, self.data_info
        return dict(in_channels=info.channels, out_channels=info.channels, latent_channels=c.latent_channels,
                    down_block_types=("DownEncoderBlock2D",) * len(c.widths),
                    up_block_types=("UpDecoderBlock2D",) * len(c.widths), block_out_channels=tuple(c.widths),
                    layers_per_block=c.layers_per_block, norm_num_groups=c.norm_groups,
                    sample_size=info.resolution or info.height, mid_block_add_attention=c.mid_attention)

    # ---------------------------------------------------------------- latent normalisation, measured on data
    def latent_factors(self) -> tuple[float, float]:
        """(shift, scale): latents = (posterior mean - shift) * scale; (0, 1) before any training."""
        n, mean, sq = self.latent_stats.tolist()
        if n < 1:
            return 0.0, 1.0
        var = max(sq - mean * mean, 1e-12)
        return mean, 1.0 / math.sqrt(var)

    @torch.no_grad()
    def _track(self, mean: torch.Tensor) -> None:
        m = mean.detach().double()
        batch = torch.stack([m.mean(), m.pow(2).mean()])
        stats = self.latent_stats
        if stats[0] < 1:
            stats[1:] = batch
        else:
            stats[1:] = stats[1:] + self.config.latent_momentum * (batch - stats[1:])
        stats[0] += 1

    # ---------------------------------------------------------------- the autoencoder
    def moments(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior mean and clamped log-variance for images in [0, 1]."""
        p = self.ae.encoder.conv_in.weight
        h = self.ae.encoder(images.to(p.device, p.dtype) * 2 - 1)
        if self.ae.quant_conv is not None:
            h = self.ae.quant_conv(h)
        mean, logvar = h.chunk(2, dim=1)
        return mean, logvar.clamp(*self.config.logvar_range)

    def _decode_raw(self, z: torch.Tensor) -> torch.Tensor:
        """[-1, 1]-ish decoder output of unnormalised latents."""
        if self.ae.post_quant_conv is not None:
            z = self.ae.post_quant_conv(z)
        return self.ae.decoder(z)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        shift, scale = self.latent_factors()
        return (self.moments(images)[0] - shift) * scale

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        shift, scale = self.latent_factors()
        p = self.ae.decoder.conv_in.weight
        return ((self._decode_raw(latents.to(p.device, p.dtype) / scale + shift).float() + 1) / 2).clamp(0, 1)

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(images))

    def training_step(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        images = batch["image"].to(self.ae.encoder.conv_in.weight.device)
        mean, logvar = self.moments(images)
        if self.training:
            self._track(mean)
            z = mean + torch.exp(0.5 * logvar) * torch.randn_like(mean)
        else:
            z = mean
        recon = self._decode_raw(z).float()
        target = images.float() * 2 - 1
        mse = (recon - target).pow(2).mean()
        pixels = target[0].numel()
        kl = 0.5 * (mean.float().pow(2) + logvar.float().exp() - 1 - logvar.float()).flatten(1).sum(1).mean()
        loss = mse + self.config.kl_weight * kl / pixels
        out = {"mse": mse.detach(), "kl": kl.detach(), "logvar_mean": logvar.detach().float().mean()}
        if self.perceptual is not None:
            self.perceptual.to(recon.device)
            dist = self.perceptual(((recon + 1) / 2).clamp(0, 1), images.float()).mean()
            loss = loss + self.config.perceptual.weight * dist
            out["perceptual"] = dist.detach()
        return {"loss": loss, **out}

    forward = training_step

    # ---------------------------------------------------------------- diffusers
    def to_diffusers(self, folder: str | Path) -> Path:
        """An AutoencoderKL folder whose config carries the measured scaling_factor and shift_factor."""
        shift, scale = self.latent_factors()
        ae = AutoencoderKL(**self.ae_config(), scaling_factor=scale, shift_factor=shift)
        ae.load_state_dict(self.ae.state_dict())
        ae.save_pretrained(folder, safe_serialization=True)
        return Path(folder)


def export_diffusers(model: VAEModel, out: str | Path, name: str = "vae") -> Path:
    """`raygen export --format diffusers` of a vae model: an AutoencoderKL folder."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        model.to_diffusers(tmp)
        shift, scale = model.latent_factors()
        (tmp / "raygen.json").write_text(json.dumps({
            "format": "raygen-diffusers/1", "family": "vae", "name": name,
            "images": "encode: x = 2 * image - 1; latents = (latent_dist.mean - shift_factor) * scaling_factor; "
                      "decode: image = ((decode(latents / scaling_factor + shift_factor).sample + 1) / 2).clamp(0, 1)",
            "shift_factor": shift, "scaling_factor": scale}, indent=2))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


def build_vae(config: VAEConfig, data_info: DataInfo, components=None) -> VAEModel:
    return VAEModel(config, data_info)


def debug_flavors():
    return {"tiny": (VAEConfig.debug(), DataInfo(channels=1, resolution=8)),
            "rgb-no-attention": (VAEConfig.debug(mid_attention=False, latent_channels=3),
                                 DataInfo(channels=3, resolution=8))}


FAMILY = register_family(Family(
    name="vae", config_cls=VAEConfig, build=build_vae, capabilities=VAEModel.capabilities, debug=debug_flavors,
    description="KL autoencoder (diffusers AutoencoderKL): MSE + KL (+ VGG/LPIPS perceptual), latents normalised "
                "by a shift and scale measured on the data; the first stage of latent diffusion"))
