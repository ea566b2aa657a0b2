"""The seqimg generator: an image as a sequence of patches, predicted one by one.

    tokens   start, embed(patch 0), ..., embed(patch T-2)   (+ absolute positions)
    backbone causal: output t sees tokens 0..t
    head     output t predicts patch t

The start token carries the condition: a learned vector (none), a label
embedding (label; -1 or dropped labels use a learned "null" row) or a
projection of the pooled caption encoding (caption; "" is the null caption).
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from pydantic import Field
from torch import nn

from raygen.models.base import DataInfo, Generator
from raygen.models.capabilities import Capability
from raygen.models.conditions import Conditions
from raygen.models.sampling import SamplingParams, check_generators, per_image_randint, preview
from raygen.models.layers.positional import make_positional
from raygen.models.seqimg.backbones import BackboneContext, build_backbone
from raygen.models.seqimg.config import SeqImgConfig
from raygen.models.seqimg.heads import HEADS, CategoricalHead
from raygen.models.seqimg.patching import PatchGeometry
from raygen.models.text import TextEncoder


# ---------------------------------------------------------------- conditioning
class NoCondition(nn.Module):
    def __init__(self, cfg: SeqImgConfig, info: DataInfo):
        super().__init__()
        self.start = nn.Parameter(torch.randn(cfg.dim) * 0.02)

    def forward(self, n, labels, captions, drop: float, generator=None):
        return self.start.expand(n, -1)


class LabelCondition(nn.Module):
    def __init__(self, cfg: SeqImgConfig, info: DataInfo):
        super().__init__()
        if info.num_classes < 1:
            raise ValueError("conditioning 'label' needs a dataset with class labels (data_info.num_classes is 0); "
                             "use conditioning 'none' or 'caption'")
        self.num_classes = info.num_classes
        self.embed = nn.Embedding(info.num_classes + 1, cfg.dim)  # last row: no label
        nn.init.normal_(self.embed.weight, std=0.02)

    def forward(self, n, labels, captions, drop: float, generator=None):
        device = self.embed.weight.device
        if labels is None:
            labels = torch.full((n,), -1, dtype=torch.long)
        labels = torch.as_tensor(labels, dtype=torch.long).to(device).reshape(-1)
        if labels.numel() != n:
            raise ValueError(f"got {labels.numel()} labels for {n} images")
        if ((labels < -1) | (labels >= self.num_classes)).any():
            raise ValueError(f"labels must be in 0..{self.num_classes - 1} (or -1 for none), got {labels.tolist()}")
        labels = torch.where(labels < 0, torch.full_like(labels, self.num_classes), labels)
        if drop > 0:
            labels = torch.where(torch.rand(n, device=device) < drop, torch.full_like(labels, self.num_classes), labels)
        return self.embed(labels)


class CaptionCondition(nn.Module):
    def __init__(self, cfg: SeqImgConfig, info: DataInfo):
        super().__init__()
        if not info.has_captions:
            raise ValueError("conditioning 'caption' needs a dataset with captions (data_info.has_captions is False); "
                             "use conditioning 'none' or 'label'")
        self.encoder = TextEncoder(cfg.text)
        self.proj = nn.Linear(cfg.text.dim, cfg.dim)

    def forward(self, n, labels, captions, drop: float, generator=None):
        captions = [""] * n if captions is None else [str(c) for c in captions]
        if len(captions) != n:
            raise ValueError(f"got {len(captions)} captions for {n} images")
        if drop > 0:
            keep = torch.rand(n) >= drop
            captions = [c if k else "" for c, k in zip(captions, keep.tolist())]
        return self.proj(self.encoder.pooled(captions))


CONDITIONING = {"none": NoCondition, "label": LabelCondition, "caption": CaptionCondition}


# ---------------------------------------------------------------- the model
class SeqImgSampling(SamplingParams):
    """How seqimg draws each patch."""
    temperature: float = Field(1.0, ge=0.0, le=10.0,
                               description="categorical: softmax temperature (0 = most likely level); "
                                           "regression: scale of the noise fed back (0 = greedy)")
    top_k: int = Field(0, ge=0, le=256, description="categorical: sample among the k most likely levels of each "
                                                    "sub-pixel (0 = all)")
    use_cache: bool = Field(True, description="carry the backbone's state/KV cache: one step per patch instead of "
                                              "re-running the prefix")


class SeqImgModel(Generator):
    family = "seqimg"
    capabilities = frozenset({Capability.TRAIN, Capability.SAMPLE})
    sampling_params = SeqImgSampling
    def __init__(self, config: SeqImgConfig, data_info: DataInfo):
        super().__init__(data_info)
        self.config = config
        self.geometry = PatchGeometry.build(config.patch_mode, data_info.channels,
                                            data_info.square_resolution("seqimg"),
                                            config.resolved_patch_size())
        geo = self.geometry
        self.seq_len = geo.num_patches
        if self.seq_len < 2:
            raise ValueError(f"patch_size {config.resolved_patch_size()} makes the whole "
                             f"{data_info.resolution}x{data_info.resolution} image one patch; "
                             "nothing is left to predict autoregressively")
        self.embed = nn.Linear(geo.patch_dim, config.dim)
        absolute = config.positional if config.positional != "rotary" else "none"  # rotary lives in attention
        self.pos = make_positional(absolute, self.seq_len, config.dim)
        self.condition = CONDITIONING[config.conditioning](config, data_info)
        self.condition_kind = config.conditioning
        self.backbone = build_backbone(config, BackboneContext(self.seq_len, geo.grid, tuple(geo.positions())))
        self.head = HEADS[config.head](config.dim, geo.patch_dim)

    # ---------------------------------------------------------------- teacher forcing
    @property
    def _param(self) -> torch.Tensor:
        return self.embed.weight

    def _tokens(self, batch: dict[str, Any], augment: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Input sequence [B, T, D] and target patches [B, T, P] in [0, 1]."""
        images = batch["image"].to(self._param.device, self._param.dtype)
        target = self.geometry.patchify(images)
        n = target.shape[0]
        inputs = target[:, :-1] * 2 - 1
        if augment and self.config.input_noise > 0:
            inputs = inputs + torch.randn_like(inputs) * self.config.input_noise
        start = self.condition(n, batch.get("label"), batch.get("caption"),
                               self.config.cond_dropout if augment else 0.0)
        x = torch.cat([start.unsqueeze(1).to(inputs.dtype), self.embed(inputs)], dim=1)
        pos = self.pos(0, self.seq_len)
        return (x if pos is None else x + pos), target

    def predict(self, batch: dict[str, Any]) -> torch.Tensor:
        """Head outputs for every patch under teacher forcing, no augmentation:
        [B, T, P] (regression, signed) or [B, T, P, 256] logits (categorical)."""
        x, _ = self._tokens(batch, augment=False)
        return self.head(self.backbone(x))

    def training_step(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        x, target = self._tokens(batch, augment=self.training)
        out = self.head(self.backbone(x))
        loss, metrics = self.head.loss(out, target)
        return {"loss": loss, **metrics}

    # calling the module is a training step, so DDP's hooks see the forward pass
    forward = training_step

    def bits_per_dim(self, batch: dict[str, Any]) -> torch.Tensor | None:
        if not isinstance(self.head, CategoricalHead):
            return None
        x, target = self._tokens(batch, augment=False)
        return self.head.bits(self.head(self.backbone(x)), target)

    # ---------------------------------------------------------------- sampling
    @torch.no_grad()
    def sample(self, conditions: Conditions, params: SeqImgSampling,
               generators: Sequence[torch.Generator]) -> torch.Tensor:
        n = conditions.n
        check_generators(n, generators)
        was_training = self.training
        self.eval()
        try:
            columns = conditions.columns(self.data_info, self._param.device)
            labels = columns.get("label")
            if labels is not None and (labels < 0).any():
                # no label asked for: each such image draws its class from its own generator
                # (the null row is only trained when cond_dropout > 0). Only those images draw, so an
                # image with a label uses the same numbers whether or not its batch holds unlabelled ones
                missing = (labels < 0).nonzero().flatten().tolist()
                drawn = per_image_randint([generators[i] for i in missing], self.data_info.num_classes)
                labels = labels.clone()
                labels[missing] = drawn.to(labels.device)
            x = self.condition(n, labels, columns.get("caption"), 0.0).to(self._param.dtype)
            pos = self.pos(0, self.seq_len)
            if pos is not None:
                x = x + pos[0]
            state, inputs, pixels = None, [x], []
            for t in range(self.seq_len):
                if params.use_cache:
                    h, state = self.backbone.step(x, state)
                else:  # re-run the whole prefix: the reference the cache must match
                    h = self.backbone(torch.stack(inputs, dim=1))[:, -1]
                image_patch, feed = self.head.sample(self.head(h), temperature=params.temperature,
                                                     top_k=params.top_k, generator=generators)
                pixels.append(image_patch)
                preview(t + 1, self.seq_len, lambda: self._so_far(pixels))
                if t + 1 < self.seq_len:
                    x = self.embed(feed)
                    if pos is not None:
                        x = x + pos[t + 1]
                    inputs.append(x)
            return self.geometry.unpatchify(torch.stack(pixels, dim=1)).clamp(0, 1).float()
        finally:
            self.train(was_training)


    def _so_far(self, pixels: list[torch.Tensor]) -> torch.Tensor:
        """The patches decoded so far (raster order: rows), the rest mid-grey: a preview."""
        done = torch.stack(pixels, dim=1).float()
        rest = done.new_full((done.shape[0], self.seq_len - done.shape[1], done.shape[2]), 0.5)
        return self.geometry.unpatchify(torch.cat([done, rest], dim=1)).clamp(0, 1)


def build_seqimg(config: SeqImgConfig, data_info: DataInfo, components=None) -> SeqImgModel:
    return SeqImgModel(config, data_info)
