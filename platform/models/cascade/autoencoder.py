"""Stage 1: the seed's fully convolutional autoencoder (family `cascade_ae`).

    encoder  image [B, C, H, W] in [0, 1] -> [-1, 1] -> conv (min_channel) -> num_layers x (stride-2 conv, conv),
             channels doubling up to max_channel -> conv to latent_channel -> encoder activation (tanh)
             = latent map [B, latent_channel, H/2^n, W/2^n]
    decoder  the mirror image: conv -> num_layers x (2x upsample + conv, conv) -> conv to image channels ->
             decoder activation, mapped back to [0, 1]

No dense layer anywhere, so it encodes any size divisible by 2^num_layers.
Trained by mean squared error of the reconstruction.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from raygen.models.base import DataInfo, Generator
from raygen.models.cascade.config import AutoencoderConfig
from raygen.models.layers.activations import make_activation

#: where a final activation's outputs lie, so they can be mapped onto image values in [0, 1]
_RANGES = {"tanh": (-1.0, 1.0), "sigmoid": (0.0, 1.0)}


def _channels(config: AutoencoderConfig) -> list[int]:
    """Channels at each resolution, full size first: min_channel doubling up to max_channel."""
    return [min(config.max_channel, config.min_channel * 2 ** i) for i in range(config.num_layers + 1)]


class ConvAutoencoder(Generator):
    """Capabilities train, encode, reconstruct."""

    def __init__(self, config: AutoencoderConfig, data_info: DataInfo):
        super().__init__(data_info)
        c, h, w = data_info.shape
        if config.image_channel is not None and config.image_channel != c:
            raise ValueError(f"model.options.image_channel: {config.image_channel} but the data has {c} channels; "
                             f"set it to {c} or leave it out")
        scale = 2 ** config.num_layers
        if h % scale or w % scale:
            raise ValueError(f"model.options.num_layers: {config.num_layers} stride-2 layers need a size divisible "
                             f"by {scale}, the images are {h}x{w}")
        self.config = config
        self.condition_kind = "none"
        self.latent_shape = (config.latent_channel, h // scale, w // scale)
        chans = _channels(config)
        act = config.hidden_activation_type

        enc: list[nn.Module] = [nn.Conv2d(c, chans[0], 3, padding=1), make_activation(act)]
        for a, b in zip(chans, chans[1:]):
            enc += [nn.Conv2d(a, b, 4, stride=2, padding=1), make_activation(act),
                    nn.Conv2d(b, b, 3, padding=1), make_activation(act)]
        enc.append(nn.Conv2d(chans[-1], config.latent_channel, 3, padding=1))
        if config.use_final_enc_activation:
            enc.append(make_activation(config.encoder_activation_type))
        self.encoder = nn.Sequential(*enc)

        dec: list[nn.Module] = [nn.Conv2d(config.latent_channel, chans[-1], 3, padding=1), make_activation(act)]
        for a, b in zip(reversed(chans), list(reversed(chans))[1:]):
            dec += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(a, b, 3, padding=1), make_activation(act),
                    nn.Conv2d(b, b, 3, padding=1), make_activation(act)]
        dec.append(nn.Conv2d(chans[0], c, 3, padding=1))
        self.final = config.decoder_activation_type if config.use_final_dec_activation else None
        if self.final is not None:
            dec.append(make_activation(self.final))
        self.decoder = nn.Sequential(*dec)

    # ------------------------------------------------------------ encode / decode
    def _to_unit(self, y: torch.Tensor) -> torch.Tensor:
        """Decoder output -> image values: a bounded activation's range mapped onto [0, 1], else [-1, 1] assumed."""
        lo, hi = _RANGES.get(self.final or "", (-1.0, 1.0))
        return (y - lo) / (hi - lo)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images float [B, C, H, W] in [0, 1] -> latent map [B, latent_channel, H/2^n, W/2^n]."""
        return self.encoder(images.to(self._device()) * 2 - 1)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latent map -> images float [B, C, H, W] in [0, 1]."""
        if latents.dim() != 4 or tuple(latents.shape[1:]) != self.latent_shape:
            raise ValueError(f"expected latents [B, {', '.join(map(str, self.latent_shape))}], "
                             f"got {list(latents.shape)}")
        return self._to_unit(self.decoder(latents.to(self._device()))).clamp(0, 1)

    def reconstruct(self, images: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(images))

    def _device(self) -> torch.device:
        return self.encoder[0].weight.device

    # ------------------------------------------------------------ training
    def training_step(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        x = batch["image"].to(self._device())
        recon = self._to_unit(self.decoder(self.encode(x)))
        loss = F.mse_loss(recon, x)
        with torch.no_grad():
            psnr = -10 * torch.log10(F.mse_loss(recon.clamp(0, 1), x).clamp_min(1e-10))
        return {"loss": loss, "psnr": psnr}


def latent_shape_of(autoencoder: Generator) -> tuple[int, ...]:
    """The latent map shape [C, h, w] an autoencoder component (any family with `encode`) makes of its images."""
    shape = getattr(autoencoder, "latent_shape", None)
    if shape is None:
        with torch.no_grad():
            shape = autoencoder.encode(torch.zeros(1, *autoencoder.data_info.shape)).shape[1:]
    return tuple(int(s) for s in shape)


def build_autoencoder(config: AutoencoderConfig, data_info: DataInfo, components=None) -> ConvAutoencoder:
    return ConvAutoencoder(config, data_info)
