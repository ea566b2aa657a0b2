"""Scene -> tokens: one token per sphere, one for the globals, then the base transformer.

Fields are scaled to about [-1, 1] by the ranges the dataset declares for them
(shininess runs to 64, colours to 1), kept as buffers so an exported model
scales exactly as it was trained. No positional embedding: the spheres are a
set, and a padding mask lets scenes of different sizes share a batch.
"""
from __future__ import annotations

import torch
from torch import nn

from raygen.models.renderer.blocks import TransformerLayer


def field_scaling(column: dict | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(centre, half-span) per field from the column's declared ranges; (0, 1) where none is declared."""
    fields = list((column or {}).get("fields") or [])
    width = int((column or {}).get("width") or len(fields))
    ranges = (column or {}).get("ranges") or {}
    centre, half = torch.zeros(width), torch.ones(width)
    for i, name in enumerate(fields):
        if name in ranges:
            lo, hi = (float(v) for v in ranges[name])
            centre[i], half[i] = (lo + hi) / 2, max((hi - lo) / 2, 1e-6)
    return centre, half


class SceneEncoder(nn.Module):
    def __init__(self, objects: dict, globals_: dict | None, *, dim: int, heads: int, ff_mult: int,
                 activation: str, layers: int, share: bool):
        super().__init__()
        centre, half = field_scaling(objects)
        self.register_buffer("obj_centre", centre)
        self.register_buffer("obj_half", half)
        self.obj_in = nn.Linear(centre.numel(), dim)
        self.has_globals = bool(globals_ and globals_.get("width"))
        if self.has_globals:
            g_centre, g_half = field_scaling(globals_)
            self.register_buffer("glob_centre", g_centre)
            self.register_buffer("glob_half", g_half)
            self.glob_in = nn.Linear(g_centre.numel(), dim)
        # sharing: one layer applied `layers` times (one copy of its weights, so exports stay plain)
        unique = min(layers, 1) if share else layers
        self.repeats = layers if share else 1
        self.layers = nn.ModuleList(TransformerLayer(dim, heads, ff_mult, activation) for _ in range(unique))
        self.out_norm = nn.LayerNorm(dim)

    def forward(self, scene: torch.Tensor, mask: torch.Tensor,
                globals_: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """scene [B, T, F], mask [B, T], globals [B, G] -> tokens [B, T(+1), D] and their mask."""
        mask = mask.bool()
        tokens = self.obj_in((scene.float() - self.obj_centre) / self.obj_half)
        if self.has_globals:
            if globals_ is None:
                raise ValueError("this renderer was built with scene globals; the batch has no 'scene_globals'")
            g = self.glob_in((globals_.float() - self.glob_centre) / self.glob_half)
            tokens = torch.cat([g[:, None], tokens], dim=1)
            mask = torch.cat([torch.ones_like(mask[:, :1]), mask], dim=1)
        tokens = tokens * mask[..., None]
        for layer in self.layers:
            for _ in range(self.repeats):
                tokens = layer(tokens, mask)
        return self.out_norm(tokens) * mask[..., None], mask
