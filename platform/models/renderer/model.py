"""The renderer: a scene of spheres (plus light and background) -> an image.

A batch carries "scene" [B, T, F], "scene_mask" [B, T] and "scene_globals"
[B, G] (the spheres dataset's columns); sampling reads the same columns from
`Conditions.columns`, so a request renders exactly like a training batch.
A render is a function of the scene: the per-image generators are accepted
(the protocol) and not needed.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch

from raygen.models.base import DataInfo, Generator
from raygen.models.conditions import Conditions, SceneKind
from raygen.models.renderer.config import RendererConfig
from raygen.models.renderer.decoder import ImageDecoder
from raygen.models.renderer.losses import OUTPUT_ACTIVATIONS, render_loss
from raygen.models.renderer.scene_encoder import SceneEncoder
from raygen.models.sampling import SamplingParams


class RendererSampling(SamplingParams):
    """No sampling parameters: the image is determined by the scene."""


class Renderer(Generator):
    condition_kind = "scene"

    def __init__(self, config: RendererConfig, data_info: DataInfo):
        super().__init__(data_info)
        objects = data_info.condition_columns.get(SceneKind.objects_column)
        if not objects or objects.get("kind") != "sequence":
            raise ValueError("model family 'renderer' needs a dataset with scenes (a 'scene' sequence column), "
                             "e.g. data.dataset: spheres")
        self.config = config
        self.encoder = SceneEncoder(objects, data_info.condition_columns.get(SceneKind.globals_column),
                                    dim=config.dim, heads=config.heads, ff_mult=config.ff_mult,
                                    activation=config.activation, layers=config.base_layers,
                                    share=config.share_base_params)
        self.decoder = ImageDecoder(config, data_info.channels, data_info.height, data_info.width)
        self.output_activation = OUTPUT_ACTIVATIONS[config.output_activation]

    def forward(self, scene: torch.Tensor, mask: torch.Tensor, globals_: torch.Tensor | None = None) -> torch.Tensor:
        """The rendered image before clamping, [B, C, H, W]."""
        tokens, token_mask = self.encoder(scene, mask, globals_)
        return self.output_activation(self.decoder(tokens, token_mask))

    def _render(self, batch: dict[str, Any]) -> torch.Tensor:
        device = self.decoder.to_image.weight.device
        scene = batch["scene"].to(device)
        mask = batch.get("scene_mask")
        mask = torch.ones(scene.shape[:2], dtype=torch.bool, device=device) if mask is None else mask.to(device)
        globals_ = batch.get("scene_globals")
        return self(scene, mask, None if globals_ is None else globals_.to(device))

    def training_step(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        target = batch["image"].to(self.decoder.to_image.weight.device).float()
        pred = self._render(batch).float()
        loss = render_loss(self.config.loss, pred, target, self.config.smooth_l1_beta)
        with torch.no_grad():
            clamped = pred.clamp(0, 1)
            metrics = {"l1": (clamped - target).abs().mean(), "l2": (clamped - target).pow(2).mean()}
        return {"loss": loss, **metrics}

    @torch.no_grad()
    def sample(self, conditions: Conditions, params: RendererSampling,
               generators: Sequence[torch.Generator]) -> torch.Tensor:
        if len(generators) != conditions.n:
            raise ValueError(f"sample needs one torch.Generator per image: {conditions.n} conditions, "
                             f"{len(generators)} generators")
        columns = conditions.columns(self.data_info, self.decoder.to_image.weight.device)
        return self._render(columns).float().clamp(0, 1)


def build_renderer(config: RendererConfig, data_info: DataInfo, components=None) -> Renderer:
    return Renderer(config, data_info)
