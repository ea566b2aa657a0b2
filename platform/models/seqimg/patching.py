"""Cutting images into the token sequence and back.

All three modes are one operation: the image is a grid of gh x gw patches of
ph x pw pixels, read in raster order, each flattened to C*ph*pw values.

    rowwise     ph = p, pw = W   grid (H/p, 1)   top to bottom
    columnwise  ph = H, pw = p   grid (1, W/p)   left to right
    square      ph = pw = p      grid (H/p, W/p) raster order
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class PatchGeometry:
    mode: str
    channels: int
    height: int
    width: int
    patch_h: int
    patch_w: int

    @classmethod
    def build(cls, mode: str, channels: int, resolution: int, patch_size: int) -> "PatchGeometry":
        if resolution % patch_size:
            raise ValueError(f"patch_size {patch_size} must divide the resolution {resolution} "
                             f"(divisors: {', '.join(str(d) for d in range(1, resolution + 1) if resolution % d == 0)})")
        shapes = {"rowwise": (patch_size, resolution), "columnwise": (resolution, patch_size),
                  "square": (patch_size, patch_size)}
        if mode not in shapes:
            raise ValueError(f"unknown patch_mode '{mode}'; choose one of: {', '.join(shapes)}")
        ph, pw = shapes[mode]
        return cls(mode, channels, resolution, resolution, ph, pw)

    @property
    def grid(self) -> tuple[int, int]:
        return self.height // self.patch_h, self.width // self.patch_w

    @property
    def num_patches(self) -> int:
        gh, gw = self.grid
        return gh * gw

    @property
    def patch_dim(self) -> int:
        return self.channels * self.patch_h * self.patch_w

    def positions(self) -> list[tuple[int, int]]:
        """(row, col) in the patch grid of each token, in sequence order."""
        gh, gw = self.grid
        return [(i, j) for i in range(gh) for j in range(gw)]

    def patchify(self, images: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] -> [B, T, C*ph*pw]."""
        b, c, h, w = images.shape
        if (c, h, w) != (self.channels, self.height, self.width):
            raise ValueError(f"expected images of shape [B, {self.channels}, {self.height}, {self.width}], "
                             f"got {list(images.shape)}")
        gh, gw = self.grid
        x = images.reshape(b, c, gh, self.patch_h, gw, self.patch_w)
        return x.permute(0, 2, 4, 1, 3, 5).reshape(b, gh * gw, self.patch_dim)

    def unpatchify(self, tokens: torch.Tensor) -> torch.Tensor:
        """[B, T, C*ph*pw] -> [B, C, H, W]."""
        b = tokens.shape[0]
        gh, gw = self.grid
        x = tokens.reshape(b, gh, gw, self.channels, self.patch_h, self.patch_w)
        return x.permute(0, 3, 1, 4, 2, 5).reshape(b, self.channels, self.height, self.width)
