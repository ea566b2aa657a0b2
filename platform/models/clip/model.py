"""A small CLIP trained contrastively on the dataset's (image, caption) pairs.

It is a scorer for best-of-n reranking when no CLIP weights can be downloaded,
not a generator: `training_step` returns the symmetric InfoNCE loss, `score`
rates image-text pairs, and it declares no `sample` capability. Text goes through the platform's own `TextEncoder` (hashed words, no
vocabulary file); images through a small CNN.

Captions repeat in small datasets ("a red circle" many times in one batch), so
the contrastive targets are soft: an image's positives are all captions equal to
its own, weighted equally. With distinct captions this is plain InfoNCE.
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from raygen.models.base import DataInfo, Generator
from raygen.models.capabilities import Capability
from raygen.models.text import TextEncoder, TextEncoderConfig


def _default_text() -> TextEncoderConfig:
    return TextEncoderConfig(tokenizer="word", dim=64, depth=2, heads=4, max_len=32)


class ClipConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    embed_dim: int = Field(64, ge=8, description="width of the shared image-text embedding")
    image_width: int = Field(32, ge=8, description="channels of the first conv stage (multiple of 8)")
    image_depth: int = Field(3, ge=1, le=6, description="stride-2 conv stages of the image encoder")
    text: TextEncoderConfig = Field(default_factory=_default_text)
    init_temperature: float = Field(0.07, gt=0, description="initial softmax temperature (CLIP: 0.07)")
    max_logit_scale: float = Field(100.0, gt=1, description="cap on 1/temperature (CLIP: 100)")
    caption_template: str = Field("a photo of a {}", description="caption built from a class name when a "
                                  "dataset has labels but no captions")

    @classmethod
    def debug(cls) -> "ClipConfig":
        """Tiny flavor for tests and smoke runs."""
        return cls(embed_dim=16, image_width=8, image_depth=2,
                   text=TextEncoderConfig(tokenizer="word", dim=16, depth=1, heads=2, max_len=16))


class ImageEncoder(nn.Module):
    def __init__(self, channels: int, width: int, depth: int, out_dim: int):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(channels, width, 3, padding=1), nn.GroupNorm(8, width), nn.SiLU()]
        ch = width
        for _ in range(depth):
            nxt = ch * 2
            layers += [nn.Conv2d(ch, nxt, 3, stride=2, padding=1), nn.GroupNorm(8, nxt), nn.SiLU()]
            ch = nxt
        self.body = nn.Sequential(*layers)
        self.proj = nn.Linear(ch, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.body(x).mean(dim=(2, 3)))


class SmallClip(Generator):
    family = "clip"
    capabilities = frozenset({Capability.TRAIN, Capability.SCORE})
    def __init__(self, config: ClipConfig, data_info: DataInfo):
        super().__init__(data_info)
        if config.image_width % 8:
            raise ValueError(f"image_width must be a multiple of 8 (got {config.image_width})")
        self.config = config
        self.image_encoder = ImageEncoder(data_info.channels, config.image_width, config.image_depth, config.embed_dim)
        self.text_encoder = TextEncoder(config.text)
        self.text_proj = nn.Linear(config.text.dim, config.embed_dim)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / config.init_temperature)))

    # ------------------------------------------------------------ encoders
    def _prepare(self, images: torch.Tensor) -> torch.Tensor:
        x = images.to(self.logit_scale.device)
        x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float().clamp(0, 1)
        c, r = self.data_info.channels, (self.data_info.height, self.data_info.width)
        if x.shape[1] != c:
            if x.shape[1] == 1:
                x = x.expand(-1, c, -1, -1)
            elif c == 1:
                x = x.mean(1, keepdim=True)
            else:
                raise ValueError(f"images have {x.shape[1]} channels; this model takes {c}")
        if tuple(x.shape[-2:]) != r:
            x = F.interpolate(x, size=r, mode="bilinear", align_corners=False,
                              antialias=max(x.shape[-2:]) > max(r))
        return 2.0 * x - 1.0

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """[N, C, H, W] in [0, 1] -> L2-normalised [N, embed_dim]."""
        return F.normalize(self.image_encoder(self._prepare(images)), dim=-1)

    def encode_text(self, captions: list[str]) -> torch.Tensor:
        """captions -> L2-normalised [N, embed_dim]."""
        return F.normalize(self.text_proj(self.text_encoder.pooled(list(captions))), dim=-1)

    # ------------------------------------------------------------ training
    def captions_for(self, batch: dict[str, Any]) -> list[str]:
        captions = batch.get("caption")
        if captions is not None and any(captions):
            return list(captions)
        labels, names = batch.get("label"), self.data_info.class_names
        if labels is not None and names:
            return [self.config.caption_template.format(names[int(i)]) for i in labels]
        raise ValueError("model family 'clip' trains on (image, caption) pairs: the dataset has no captions "
                         "and no class names; use a dataset with captions (e.g. data.dataset: shapes)")

    def training_step(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        captions = self.captions_for(batch)
        img = self.encode_image(batch["image"])
        txt = self.encode_text(captions)
        scale = self.logit_scale.clamp(max=math.log(self.config.max_logit_scale)).exp()
        logits = scale * img @ txt.T
        # soft targets: every caption equal to row i's caption is a positive for row i
        ids = {c: k for k, c in enumerate(dict.fromkeys(captions))}
        key = torch.tensor([ids[c] for c in captions], device=logits.device)
        same = (key[:, None] == key[None, :]).float()
        target = same / same.sum(1, keepdim=True)  # symmetric, so rows and columns share it
        loss = 0.5 * (torch.sum(-target * F.log_softmax(logits, 1), 1).mean()
                      + torch.sum(-target * F.log_softmax(logits.T, 1), 1).mean())
        with torch.no_grad():
            accuracy = same.gather(1, logits.argmax(1, keepdim=True)).mean()
        return {"loss": loss, "accuracy": accuracy, "logit_scale": scale.detach()}

    @torch.no_grad()
    def score(self, images: torch.Tensor, texts) -> torch.Tensor:
        """Cosine similarity of each image with its text, [N] (CLIP score / 100)."""
        if len(texts) != len(images):
            raise ValueError(f"score needs one text per image: {len(images)} images, {len(texts)} texts")
        return (self.encode_image(images) * self.encode_text(list(texts))).sum(-1)


def build(config: ClipConfig, data_info: DataInfo, components=None) -> SmallClip:
    return SmallClip(config, data_info)
