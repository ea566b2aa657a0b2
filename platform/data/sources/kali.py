"""Kali-set fractal patches (seed 001): 128x128 renders of a 2-D slice of
the Kali set, randomly cropped to 32x32 patches (then resized to the
requested resolution)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from raygen.data.errors import DataError
from raygen.data.images import fit_image, to_pil
from raygen.data.registry import DatasetBuilder, PrepareRequest, SourcePlan, record_rng, register, split_counts
from raygen.data.shards import Record

SUPERSAMPLE = 2


def render_kali(rng: np.random.Generator, size: int = 128) -> np.ndarray:
    """One colour render (HxWx3 uint8) of the Kali set p <- |p| / (p.p) - c.

    Colour is the mean orbit |p| per axis, normalised per channel by its
    2nd/98th percentiles so every render uses the full range. 2x2
    supersampling keeps the finest orbits from turning into pixel noise.
    """
    c = rng.uniform(0.35, 0.95, size=3)
    center = rng.uniform(-1.0, 1.0, size=2)
    scale = 10 ** rng.uniform(-1.6, -0.6)
    zslice = rng.uniform(-0.5, 0.5)
    iters = int(rng.integers(8, 16))
    n = size * SUPERSAMPLE
    g = (np.arange(n) + 0.5) / n * 2.0 - 1.0
    x, y = np.meshgrid(g * scale + center[0], g * scale + center[1])
    p = np.stack([x, y, np.full_like(x, zslice)], axis=-1)
    acc = np.zeros_like(p)
    for _ in range(iters):
        p = np.abs(p) / np.maximum(np.sum(p * p, axis=-1, keepdims=True), 1e-6) - c
        acc += np.abs(p)
    acc = (acc / iters).reshape(size, SUPERSAMPLE, size, SUPERSAMPLE, 3).mean(axis=(1, 3))
    lo = np.percentile(acc, 2, axis=(0, 1))
    hi = np.percentile(acc, 98, axis=(0, 1))
    img = np.clip((acc - lo) / np.maximum(hi - lo, 1e-9), 0.0, 1.0) ** 0.8
    return np.round(img * 255.0).astype(np.uint8)


@register
class Kali(DatasetBuilder):
    name = "kali"
    summary = "Kali-set fractal patches (seed 001): 128x128 renders randomly cropped to 32x32"
    default_resolution = 32
    default_channels = 3
    default_count = 2000

    @dataclass(kw_only=True)
    class Options:
        render_size: int = 128
        patch: int = 32
        patches_per_render: int = 8

    def plan(self, req: PrepareRequest, opts) -> SourcePlan:
        if not 4 <= opts.patch <= opts.render_size:
            raise DataError(f"kali option patch: {opts.patch} must be between 4 and render_size ({opts.render_size})")
        if opts.patches_per_render < 1:
            raise DataError("kali option patches_per_render: must be at least 1")
        res, ch = req.resolution, req.channels
        counts = split_counts(req.count, req.val_fraction)
        ps, size = opts.patch, opts.render_size

        def records(split: str):
            n = counts[split]
            for r in range(-(-n // opts.patches_per_render)):
                rng = record_rng(req.seed, split, r)
                render = render_kali(rng, size)
                for _ in range(min(opts.patches_per_render, n - r * opts.patches_per_render)):
                    # redraw nearly flat crops (a patch of one colour teaches nothing)
                    for _try in range(8):
                        y, x = rng.integers(0, size - ps + 1, size=2)
                        patch = render[y:y + ps, x:x + ps]
                        if patch.std() > 6.0:
                            break
                    img = patch if (res, ch) == (ps, 3) else fit_image(to_pil(np.ascontiguousarray(patch)), res, ch)
                    yield Record(image=img)

        return SourcePlan(resolution=res, channels=ch, splits=counts, records=records,
                          source=f"procedural: Kali-set renders {size}x{size} cropped to {ps}x{ps}")
