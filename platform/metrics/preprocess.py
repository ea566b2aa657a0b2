"""Explicit image preprocessing in front of a feature extractor.

FID moves by several points when generated and real images are prepared
differently (clean-fid, Parmar et al. 2022), so every step is a named setting
and part of the reference-statistics cache key:

1. range: map `value_range` to [0, 1]; uint8 input is read as 0..255;
2. clamp to [0, 1] (seed 003: unclipped generator output skewed FID);
3. quantize to 8-bit levels exactly as a PNG writer does
   (`floor(x * 255 + 0.5)`, torchvision's `save_image` rounding), so in-memory
   samples score the same as the same samples saved and re-read, and the same
   as real images, which were decoded from uint8 PNGs;
4. channels: 1 -> 3 by replication, 3 -> 1 by ITU-R 601 luma (PIL's "L");
5. resize bilinearly to the extractor's input size (antialiased when shrinking).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from raygen.images import quantize
from raygen.metrics.errors import MetricsError

_LUMA = (0.299, 0.587, 0.114)


@dataclass(frozen=True, kw_only=True)
class Preprocess:
    size: int                       # side length the extractor expects
    channels: int                   # channels the extractor expects (1 or 3)
    value_range: tuple[float, float] = (0.0, 1.0)
    quantize: bool = True
    antialias: bool = True

    def __post_init__(self):
        if self.channels not in (1, 3):
            raise MetricsError(f"preprocess.channels must be 1 or 3 (got {self.channels})")
        if self.size < 1:
            raise MetricsError(f"preprocess.size must be positive (got {self.size})")
        lo, hi = self.value_range
        if not hi > lo:
            raise MetricsError(f"preprocess.value_range must be (low, high) with low < high (got {self.value_range})")
        object.__setattr__(self, "value_range", (float(lo), float(hi)))

    def key(self) -> dict:
        """JSON-able settings; part of every reference-statistics cache key."""
        d = asdict(self)
        d["value_range"] = list(self.value_range)
        return d

    def to_unit(self, images: torch.Tensor) -> torch.Tensor:
        """Steps 1-3: float in [0, 1], quantized if asked. Keeps the device."""
        if images.dtype == torch.uint8:
            x = images.float() / 255.0
        else:
            lo, hi = self.value_range
            x = images.float()
            if (lo, hi) != (0.0, 1.0):
                x = (x - lo) / (hi - lo)
            x = x.clamp(0.0, 1.0)
            if self.quantize:
                x = quantize(x).float() / 255.0  # the rounding of every PNG raygen writes (raygen.images)
        return x

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if images.dim() != 4:
            raise MetricsError(f"images must be [N, C, H, W] (got shape {tuple(images.shape)})")
        x = self.to_unit(images)
        c = x.shape[1]
        if c != self.channels:
            if c == 1 and self.channels == 3:
                x = x.expand(-1, 3, -1, -1)
            elif c == 3 and self.channels == 1:
                w = torch.tensor(_LUMA, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
                x = (x * w).sum(1, keepdim=True)
            else:
                raise MetricsError(f"images have {c} channels; the extractor takes {self.channels} "
                                   "(give 1- or 3-channel images)")
        h, w = x.shape[-2:]
        if (h, w) != (self.size, self.size):
            shrink = h > self.size or w > self.size
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False,
                              antialias=self.antialias and shrink)
        return x


def out_of_range_fraction(images: torch.Tensor, value_range: tuple[float, float] = (0.0, 1.0)) -> float:
    """Fraction of sub-pixels outside `value_range` (what the clamp changes)."""
    if images.dtype == torch.uint8 or images.numel() == 0:
        return 0.0
    lo, hi = value_range
    return float(((images < lo) | (images > hi)).float().mean())
