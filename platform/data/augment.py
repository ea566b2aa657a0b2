"""Vectorized augmentations on a whole uint8 batch [B, C, H, W] (numpy).

Every random draw comes from the generator passed in, so a batch's
augmentation is a pure function of that generator's seed. numpy rather
than torch: on small images torch's per-op dispatch and thread-pool
start-up cost more than the work itself.
"""
from __future__ import annotations

import numpy as np

from raygen.data.images import as_size


def _gather(x: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """out[b, :, i, j] = x[b, :, rows[b, i], cols[b, j]] in one indexing op."""
    b = np.arange(x.shape[0])[:, None, None]
    return np.ascontiguousarray(x[b, :, rows[:, :, None], cols[:, None, :]].transpose(0, 3, 1, 2))


def random_flip(x: np.ndarray, rng: np.random.Generator, axis: int) -> np.ndarray:
    m = rng.random(x.shape[0]) < 0.5
    out = x.copy()
    out[m] = np.flip(x[m], axis=axis)
    return out


def random_shift(x: np.ndarray, rng: np.random.Generator, shift: int) -> np.ndarray:
    """Move each image by up to ±shift pixels on each axis; uncovered pixels are zero."""
    B, _, H, W = x.shape
    dy = rng.integers(-shift, shift + 1, size=B)
    dx = rng.integers(-shift, shift + 1, size=B)
    xp = np.pad(x, ((0, 0), (0, 0), (shift, shift), (shift, shift)))
    rows = np.arange(H)[None, :] - dy[:, None] + shift
    cols = np.arange(W)[None, :] - dx[:, None] + shift
    return _gather(xp, rows, cols)


def random_crop(x: np.ndarray, rng: np.random.Generator, size) -> np.ndarray:
    """A random window of `size` (one int, or (height, width)) per image."""
    ch, cw = as_size(size)
    B, _, H, W = x.shape
    oy = rng.integers(0, H - ch + 1, size=B)
    ox = rng.integers(0, W - cw + 1, size=B)
    rows = oy[:, None] + np.arange(ch)[None, :]
    cols = ox[:, None] + np.arange(cw)[None, :]
    return _gather(x, rows, cols)


def center_crop(x: np.ndarray, size) -> np.ndarray:
    ch, cw = as_size(size)
    H, W = x.shape[-2:]
    top, left = (H - ch) // 2, (W - cw) // 2
    return np.ascontiguousarray(x[..., top:top + ch, left:left + cw])


def augment_batch(x: np.ndarray, aug, rng: np.random.Generator) -> np.ndarray:
    """Apply `AugmentSpec` (hflip, vflip, shift, crop) in that order."""
    if aug.hflip:
        x = random_flip(x, rng, -1)
    if aug.vflip:
        x = random_flip(x, rng, -2)
    if aug.shift:
        x = random_shift(x, rng, aug.shift)
    if aug.crop:
        x = random_crop(x, rng, aug.crop)
    return x
