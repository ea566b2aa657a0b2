"""A tiny real model family for the serving tests, plus a stand-in CLIP scorer.

Serve replicas are separate processes: they learn of this family by importing
this file (`AppArgs.imports` / `raygen serve --import`), the way a user's own
family would be plugged in. The family registers itself on import, once per
process, whichever name the file is imported under (pytest imports it as
`test_serving_family`, the scorer replica as `tests.test_serving_family`).
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from raygen.models.base import DataInfo, Generator
from raygen.models.registry import Family, get_family, register_family

FAMILY = "servetoy"
FILE = str(Path(__file__).resolve())


class ToyConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    dim: int = Field(8, ge=1)
    conditioning: Literal["none", "label", "caption"] = "none"


class ToyGenerator(Generator):
    """Noise -> two transposed convs -> sigmoid; a label or caption shifts the noise."""

    sampling_options = {
        "temperature": (float, 1.0, "scale of the input noise; must be > 0"),
        "explode": (bool, False, "test hook: raise an internal error while sampling"),
        "delay_s": (float, 0.0, "test hook: take this long to sample"),
    }

    def __init__(self, config: ToyConfig, data_info: DataInfo):
        super().__init__(data_info)
        self.conditioning = config.conditioning
        self.dim = config.dim
        self.base = max(1, data_info.resolution // 4)
        self.label_emb = nn.Embedding(max(1, data_info.num_classes), config.dim)
        self.text_emb = nn.EmbeddingBag(256, config.dim)
        self.up = nn.Sequential(
            nn.ConvTranspose2d(config.dim, config.dim, 4, stride=2, padding=1), nn.GELU(),
            nn.ConvTranspose2d(config.dim, data_info.channels, 4, stride=2, padding=1))
        self.out_size = self.base * 4

    @torch.no_grad()
    def sample(self, n, *, labels=None, captions=None, generator=None, temperature=1.0, explode=False, delay_s=0.0,
               **options):
        if options:
            raise TypeError(f"unexpected options {sorted(options)}")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if explode:
            raise RuntimeError("boom: the test hook asked for an internal error")
        time.sleep(delay_s)
        z = torch.randn(n, self.dim, self.base, self.base, generator=generator) * temperature
        if labels is not None:
            z = z + self.label_emb(labels)[:, :, None, None]
        if captions is not None:
            codes = [torch.tensor(list(c.encode())[:64] or [0]) for c in captions]
            offsets = torch.tensor([0] + [len(c) for c in codes[:-1]]).cumsum(0)
            z = z + self.text_emb(torch.cat(codes), offsets)[:, :, None, None]
        x = torch.sigmoid(self.up(z) * 3)
        res = self.data_info.resolution
        return x if self.out_size == res else nn.functional.interpolate(x, size=(res, res), mode="nearest")


def _register() -> Family:
    try:
        return get_family(FAMILY)
    except KeyError:
        return register_family(Family(name=FAMILY, config_cls=ToyConfig,
                                      build=lambda cfg, info: ToyGenerator(cfg, info),
                                      description="tiny conv generator for serving tests"))


_register()


def export_toy(path, *, name: str, resolution: int = 16, channels: int = 3, num_classes: int = 0,
               class_names: list[str] | None = None, conditioning: str = "none", run_id: str | None = None,
               seed: int = 0) -> Path:
    """Build a seeded toy model and export it the way training does."""
    from raygen.exports import export_generator
    from raygen.spec import parse_spec

    spec = parse_spec({"name": name, "data": {"resolution": resolution, "channels": channels},
                       "model": {"family": FAMILY, "options": {"dim": 8, "conditioning": conditioning}}})
    info = DataInfo(channels=channels, resolution=resolution, num_classes=num_classes,
                    class_names=class_names or [], has_captions=conditioning == "caption")
    torch.manual_seed(seed)
    model = ToyGenerator(spec.model.config, info)
    return export_generator(path, model.state_dict(), spec, info, meta={"run_id": run_id} if run_id else None)


class BrightnessScorer:
    """Stands in for CLIP (no weights offline) with the `similarity` BestOfN ranks by:
    "bright" prefers bright images, any other text dark ones."""

    def similarity(self, images: torch.Tensor, texts: list[str] | str) -> torch.Tensor:
        texts = [texts] * len(images) if isinstance(texts, str) else texts
        brightness = images.float().mean(dim=(1, 2, 3))
        return brightness * torch.tensor([1.0 if "bright" in t else -1.0 for t in texts])

    def score(self, images: torch.Tensor, texts: list[str] | str) -> torch.Tensor:
        return self.similarity(images, texts).clamp(min=0.0)


def load_brightness_scorer(spec: str, *, device="cpu", tracking_uri=None) -> BrightnessScorer:
    if spec != "brightness":
        raise ValueError(f"unknown test scorer {spec!r}")
    return BrightnessScorer()


# ---------------------------------------------------------------- the family itself
def test_toy_samples_are_images_and_seeded():
    info = DataInfo(channels=3, resolution=16, num_classes=4)
    model = ToyGenerator(ToyConfig(conditioning="label"), info).eval()
    a = model.sample(3, labels=torch.tensor([0, 1, 2]), generator=torch.Generator().manual_seed(1))
    b = model.sample(3, labels=torch.tensor([0, 1, 2]), generator=torch.Generator().manual_seed(1))
    assert a.shape == (3, 3, 16, 16) and a.min() >= 0 and a.max() <= 1
    assert torch.equal(a, b)


def test_toy_exports_and_loads(tmp_path):
    from raygen.exports import load_generator

    path = export_toy(tmp_path / "m", name="toy", resolution=8, channels=1, run_id="r1")
    loaded = load_generator(str(path))
    assert loaded.meta["run_id"] == "r1" and loaded.data_info.resolution == 8
    out = loaded.model.sample(2, generator=torch.Generator().manual_seed(0))
    assert out.shape == (2, 1, 8, 8)
