"""inr: an image encoder to a code and the "manifold" decoder that renders the code at any size.

    encode       image -> code [B, code_size]
    decode       code -> image at the data's size; `render_codes(codes, h, w)` at any size
    reconstruct  decode(encode(image))
    sample       codes drawn from N(0, code_std²) (or an input image's code), decoded
    render       the same, on a height × width grid
    interpolate  decode((1 - t) · code(a) + t · code(b)) for t in [0, 1]

Training loss: reconstruction (L1 or L2) + constraint · (|0.5 - std_batch(code)| + |mean(code)|).
The validation loss (eval mode) is the reconstruction term alone, so runs with
different constraint factors compare on the same scale.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from raygen.models.base import DataInfo, Generator
from raygen.models.conditions import ConditionError, Conditions, get_kind
from raygen.models.inr.config import INRConfig, INRSampling
from raygen.models.inr.decoder import ManifoldDecoder
from raygen.models.inr.encoders import build_encoder
from raygen.models.inr.losses import code_constraint, reconstruction_loss
from raygen.models.sampling import check_generators


class INRAutoencoder(Generator):
    def __init__(self, config: INRConfig, data_info: DataInfo):
        super().__init__(data_info)
        self.config = config
        self.condition_kind = config.conditioning
        self.encoder = build_encoder(config, data_info.shape)
        self.decoder = ManifoldDecoder(config.code_size, data_info.channels, config.decoder)
        for module in self._frozen():
            module.requires_grad_(False)

    # ---------------------------------------------------------------- frozen encoder parts
    def _frozen(self) -> list[nn.Module]:
        return {"none": [], "backbone": [self.encoder.backbone], "all": [self.encoder]}[self.config.freeze]

    def train(self, mode: bool = True) -> "INRAutoencoder":
        super().train(mode)
        for module in self._frozen():
            module.eval()  # frozen means frozen: batch-norm statistics do not move either
        return self

    @property
    def _device(self) -> torch.device:
        return self.decoder.linear_out.weight.device

    # ---------------------------------------------------------------- the autoencoder
    def codes(self, images: torch.Tensor) -> torch.Tensor:
        """Codes with gradients (training); `encode` is the no-grad capability."""
        return self.encoder(images.to(self._device, torch.float32))

    def render_codes(self, codes: torch.Tensor, height: int | None = None, width: int | None = None) -> torch.Tensor:
        h = self.data_info.height if height is None else height
        w = self.data_info.width if width is None else width
        return self.decoder(codes.to(self._device, torch.float32), h, w)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return self.codes(images)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.render_codes(latents)

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor, height: int | None = None, width: int | None = None) -> torch.Tensor:
        """Images -> their reconstructions, at the data's size or at height × width."""
        return self.render_codes(self.codes(images), height, width)

    @torch.no_grad()
    def interpolate(self, a: torch.Tensor, b: torch.Tensor, steps: int = 8, height: int | None = None,
                    width: int | None = None) -> torch.Tensor:
        """`steps` images [steps, C, H, W] from image a's code to image b's (a, b: [C, H, W] at the data's size)."""
        if steps < 2:
            raise ValueError(f"steps must be at least 2 (the two ends), got {steps}")
        ca, cb = self.codes(torch.stack([a, b])).unbind(0)
        t = torch.linspace(0, 1, steps, device=ca.device)[:, None]
        return self.render_codes((1 - t) * ca + t * cb, height, width)

    def training_step(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        images = batch["image"].to(self._device, torch.float32)
        codes = self.codes(images)
        out = self.decoder(codes, images.shape[-2], images.shape[-1])
        recon = reconstruction_loss(self.config.loss, out, images)
        metrics = {"recon": recon.detach(), "l1": (out - images).abs().mean().detach()}
        loss = recon
        if self.training and self.config.constraint > 0:
            std_term, mean_term = code_constraint(codes, self.config.target_std)
            loss = recon + self.config.constraint * (std_term + mean_term)
            metrics.update(code_std_loss=std_term.detach(), code_mean_loss=mean_term.detach())
        return {"loss": loss, **metrics}

    # ---------------------------------------------------------------- sampling and rendering
    def _sample_codes(self, conditions: Conditions, params: INRSampling,
                      generators: Sequence[torch.Generator]) -> torch.Tensor:
        """One code per image: its input image's code, or one drawn from its own generator."""
        check_generators(conditions.n, generators)
        codes: list[torch.Tensor | None] = [None] * conditions.n
        given = [i for i, v in enumerate(conditions.values) if v is not None]
        if given:
            images = torch.stack([conditions.values[i] for i in given])
            for i, code in zip(given, self.codes(images)):
                codes[i] = code
        for i, g in enumerate(generators):
            if codes[i] is None:
                drawn = torch.randn(self.config.code_size, generator=g, device=g.device) * params.code_std
                codes[i] = drawn.to(self._device)
        stacked = torch.stack(codes)
        if params.toward is not None:
            try:
                target = get_kind("image").parse(params.toward, self.data_info)
            except ConditionError as err:
                raise ValueError(f"toward: {err.message}") from None
            stacked = torch.lerp(stacked, self.codes(target[None]), params.mix)
        return stacked

    @torch.no_grad()
    def render(self, conditions: Conditions, params: INRSampling, generators: Sequence[torch.Generator],
               height: int, width: int) -> torch.Tensor:
        return self.render_codes(self._sample_codes(conditions, params, generators), height, width).float()

    @torch.no_grad()
    def sample(self, conditions: Conditions, params: INRSampling,
               generators: Sequence[torch.Generator]) -> torch.Tensor:
        return self.render(conditions, params, generators, self.data_info.height, self.data_info.width)


def build_inr(config: INRConfig, data_info: DataInfo, components=None) -> INRAutoencoder:
    return INRAutoencoder(config, data_info)
