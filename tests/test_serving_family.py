"""A tiny real model family for the serving tests, plus a stand-in CLIP scorer.

Serve replicas are separate processes: they learn of this family by importing
this file (`AppArgs.imports` / `raygen serve --import`), the way a user's own
family would be plugged in. The family registers itself on import, once per
process, whichever name the file is imported under (pytest imports it as
`test_serving_family`, the scorer replica as `tests.test_serving_family`).
"""
from __future__ import annotations

import time
from enum import Enum
from pathlib import Path
from typing import Literal

import pytest
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from raygen.models import Conditions, DataInfo, Family, Generator, SamplingParams, get_family, register_family
from raygen.models.sampling import check_generators, image_seeds, make_generators, per_image_randn

FAMILY = "servetoy"
FILE = str(Path(__file__).resolve())


class ToyConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    dim: int = Field(8, ge=1)
    conditioning: Literal["none", "label", "caption"] = "none"


class Style(str, Enum):
    plain = "plain"
    inverted = "inverted"


class ToySampling(SamplingParams):
    """How the toy draws: a noise scale, a style, and hooks the tests use to make it fail or dawdle."""
    temperature: float = Field(1.0, gt=0.0, le=10.0, description="scale of the input noise")
    style: Style = Field(Style.plain, description="plain, or inverted (1 - image)")
    reject: bool = Field(False, description="test hook: the model rejects the request (a ValueError)")
    explode: bool = Field(False, description="test hook: raise an internal error while sampling")
    delay_s: float = Field(0.0, ge=0.0, le=30.0, description="test hook: take this long to sample")


class ToyGenerator(Generator):
    """Noise -> two transposed convs -> sigmoid; a label or caption shifts the noise."""

    def __init__(self, config: ToyConfig, data_info: DataInfo):
        super().__init__(data_info)
        self.condition_kind = config.conditioning
        self.dim = config.dim
        self.base = max(1, data_info.resolution // 4)
        self.label_emb = nn.Embedding(max(1, data_info.num_classes), config.dim)
        self.text_emb = nn.EmbeddingBag(256, config.dim)
        self.up = nn.Sequential(
            nn.ConvTranspose2d(config.dim, config.dim, 4, stride=2, padding=1), nn.GELU(),
            nn.ConvTranspose2d(config.dim, data_info.channels, 4, stride=2, padding=1))
        self.out_size = self.base * 4

    def _decode(self, z: torch.Tensor, columns: dict) -> torch.Tensor:
        labels = columns.get("label")
        if labels is not None:  # -1: no label asked for, no shift
            z = z + (self.label_emb(labels.clamp(min=0)) * (labels >= 0)[:, None].float())[:, :, None, None]
        captions = columns.get("caption")
        if captions is not None:
            codes = [torch.tensor(list(c.encode())[:64] or [0]) for c in captions]
            offsets = torch.tensor([0] + [len(c) for c in codes[:-1]]).cumsum(0)
            shift = self.text_emb(torch.cat(codes), offsets) * torch.tensor([[float(bool(c))] for c in captions])
            z = z + shift[:, :, None, None]
        x = torch.sigmoid(self.up(z) * 3)
        res = self.data_info.resolution
        return x if self.out_size == res else nn.functional.interpolate(x, size=(res, res), mode="nearest")

    def training_step(self, batch):
        images = batch["image"]
        z = torch.randn(len(images), self.dim, self.base, self.base)
        columns = Conditions.from_batch(self.condition_kind, batch, self.data_info).columns(self.data_info)
        return {"loss": nn.functional.mse_loss(self._decode(z, columns), images)}

    @torch.no_grad()
    def sample(self, conditions, params: ToySampling, generators):
        check_generators(conditions.n, generators)
        if params.reject:
            raise ValueError("the toy model rejects this request (reject=true)")
        if params.explode:
            raise RuntimeError("boom: the test hook asked for an internal error")
        time.sleep(params.delay_s)
        z = per_image_randn(generators, (self.dim, self.base, self.base)) * params.temperature
        x = self._decode(z, conditions.columns(self.data_info))
        return 1 - x if params.style == Style.inverted else x


def build_toy(config: ToyConfig, data_info: DataInfo, components=None) -> ToyGenerator:
    return ToyGenerator(config, data_info)


def debug_flavors() -> dict:
    classes = DataInfo(channels=3, resolution=16, num_classes=4, class_names=["a", "b", "c", "d"])
    return {"label": (ToyConfig(conditioning="label"), classes),
            "caption": (ToyConfig(conditioning="caption"), DataInfo(channels=3, resolution=8, has_captions=True)),
            "none": (ToyConfig(), DataInfo(channels=1, resolution=8))}


def _register() -> Family:
    try:
        return get_family(FAMILY)
    except KeyError:
        return register_family(Family(
            name=FAMILY, config_cls=ToyConfig, build=build_toy, capabilities={"train", "sample"},
            sampling_params=ToySampling, conditions=("none", "label", "caption"), debug=debug_flavors,
            description="tiny conv generator for serving tests"))


_register()


def export_toy(path, *, name: str, resolution: int = 16, channels: int = 3, num_classes: int = 0,
               class_names: list[str] | None = None, conditioning: str = "none", run_id: str | None = None,
               seed: int = 0) -> Path:
    """Build a seeded toy model and export it the way training does."""
    from raygen.exports import export_generator
    from raygen.models import build_model
    from raygen.spec import parse_spec

    spec = parse_spec({"name": name, "data": {"resolution": resolution, "channels": channels},
                       "model": {"family": FAMILY, "options": {"dim": 8, "conditioning": conditioning}}})
    info = DataInfo(channels=channels, resolution=resolution, num_classes=num_classes,
                    class_names=class_names or [], has_captions=conditioning == "caption")
    torch.manual_seed(seed)
    model = build_model(FAMILY, spec.model.config, info)
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
def _toy(conditioning="label", **info):
    from raygen.models import build_model

    info = DataInfo(**{"channels": 3, "resolution": 16, "num_classes": 4, **info})
    torch.manual_seed(0)
    return build_model(FAMILY, {"conditioning": conditioning}, info).eval()


def test_toy_samples_are_images_and_seeded():
    model = _toy()
    conditions = Conditions("label", (0, 1, 2))
    a = model.sample(conditions, ToySampling(), make_generators(image_seeds(1, 3)))
    b = model.sample(conditions, ToySampling(), make_generators(image_seeds(1, 3)))
    assert a.shape == (3, 3, 16, 16) and a.min() >= 0 and a.max() <= 1
    assert torch.equal(a, b)
    same = Conditions.repeat("label", 2, 3)
    s1 = model.sample(same, ToySampling(), make_generators(image_seeds(1, 3)))
    s2 = model.sample(same, ToySampling(), make_generators(image_seeds(2, 3)))
    assert torch.equal(s1[1:], s2[:2])  # image i of seed s is image i-1 of seed s+1: one generator per image
    assert not torch.equal(s1[0], s1[1])
    inverted = model.sample(conditions, ToySampling(style="inverted"), make_generators(image_seeds(1, 3)))
    assert torch.allclose(inverted, 1 - a)


def test_toy_declares_the_protocol():
    from raygen.models import Capability, CapabilityError, require

    model = _toy()
    assert model.family == FAMILY and model.sampling_params is ToySampling and model.condition_kind == "label"
    require(model, Capability.SAMPLE)
    with pytest.raises(CapabilityError, match="cannot score"):
        require(model, Capability.SCORE)
    loss = model.train().training_step({"image": torch.rand(2, 3, 16, 16), "label": torch.tensor([0, 3])})["loss"]
    loss.backward()
    assert torch.isfinite(loss) and model.up[0].weight.grad is not None


def test_toy_exports_and_loads(tmp_path):
    from raygen.exports import load_generator

    path = export_toy(tmp_path / "m", name="toy", resolution=8, channels=1, run_id="r1")
    loaded = load_generator(str(path))
    assert loaded.meta["run_id"] == "r1" and loaded.data_info.resolution == 8
    assert loaded.model.condition_kind == "none"
    out = loaded.model.sample(Conditions.none(2), ToySampling(), make_generators([0, 1]))
    assert out.shape == (2, 1, 8, 8)
