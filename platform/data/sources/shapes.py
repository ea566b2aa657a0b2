"""Procedural coloured shapes with captions that describe them, for
text-to-image ("a red circle above a blue square").

The extra column `shapes` stores one row per shape (SHAPE_FIELDS) so the
caption can be checked against what is drawn.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from raygen.data.errors import DataError
from raygen.data.images import as_size, to_channels_array, to_pil
from raygen.data.manifest import ExtraColumn
from raygen.data.registry import DatasetBuilder, PrepareRequest, SourcePlan, record_rng, register, split_counts
from raygen.data.shards import Record

KINDS = ["circle", "square", "triangle"]
COLORS = {"red": (230, 30, 30), "green": (30, 200, 50), "blue": (40, 80, 240), "yellow": (240, 220, 30),
          "purple": (150, 50, 210), "orange": (250, 140, 20), "white": (240, 240, 240), "cyan": (30, 210, 220)}
COLOR_NAMES = list(COLORS)
#: relation of shape 0 to shape 1 -> the axis it constrains and the sign
RELATIONS = {"above": (1, -1), "below": (1, 1), "to the left of": (0, -1), "to the right of": (0, 1)}
SHAPE_FIELDS = ["kind", "color", "cx", "cy", "size"]  # cx, cy, size: fractions of the (shorter) image side
SUPERSAMPLE = 4


def shape_mask(kind: str, x: np.ndarray, y: np.ndarray, cx: float, cy: float, s: float) -> np.ndarray:
    """Pixels (x, y in image-side fractions) inside a shape of half-size s."""
    if kind == "circle":
        return (x - cx) ** 2 + (y - cy) ** 2 <= s * s
    if kind == "square":
        return (np.abs(x - cx) <= s) & (np.abs(y - cy) <= s)
    # triangle: apex up at cy - s, base at cy + s, half-width s at the base
    return (y >= cy - s) & (y <= cy + s) & (np.abs(x - cx) <= (y - (cy - s)) / 2.0)


def _side_fractions(n: int, side: int) -> np.ndarray:
    """Supersampled pixel centres along an axis of `n` pixels, as fractions
    of the centred `side`-pixel square (outside it: < 0 or > 1)."""
    g = (np.arange(n * SUPERSAMPLE) + 0.5) / (n * SUPERSAMPLE)
    return g if n == side else (g * n - (n - side) / 2.0) / side


def draw_shapes(params: np.ndarray, resolution) -> np.ndarray:
    """Rows of SHAPE_FIELDS -> HxWx3 uint8 on black (4x supersampled).

    `resolution` is one int or (height, width). Positions are fractions of
    the shorter side, in the centred square: a non-square image shows the
    same shapes with more black background beside them, so the caption
    stays true.
    """
    h, w = as_size(resolution)
    side = min(h, w)
    x, y = np.meshgrid(_side_fractions(w, side), _side_fractions(h, side))
    img = np.zeros((h * SUPERSAMPLE, w * SUPERSAMPLE, 3), np.float64)
    for kind, color, cx, cy, s in np.asarray(params, np.float64):
        m = shape_mask(KINDS[int(kind)], x, y, cx, cy, s)
        img[m] = COLORS[COLOR_NAMES[int(color)]]
    img = img.reshape(h, SUPERSAMPLE, w, SUPERSAMPLE, 3).mean(axis=(1, 3))
    return np.round(img).astype(np.uint8)


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def describe(params: np.ndarray, relation: str | None) -> str:
    words = [f"{_article(COLOR_NAMES[int(c)])} {COLOR_NAMES[int(c)]} {KINDS[int(k)]}" for k, c, *_ in params]
    return words[0] if relation is None else f"{words[0]} {relation} {words[1]}"


def random_shapes(rng: np.random.Generator, max_shapes: int) -> tuple[np.ndarray, str | None]:
    n = int(rng.integers(1, max_shapes + 1))
    kinds = rng.integers(0, len(KINDS), size=n)
    colors = rng.choice(len(COLOR_NAMES), size=n, replace=False)  # distinct, so the caption is unambiguous
    sizes = rng.uniform(0.10, 0.18, size=n)
    if n == 1:
        cx, cy = rng.uniform(sizes[0] + 0.05, 0.95 - sizes[0], size=2)
        return np.array([[kinds[0], colors[0], cx, cy, sizes[0]]], np.float32), None
    relation = list(RELATIONS)[int(rng.integers(len(RELATIONS)))]
    axis, sign = RELATIONS[relation]
    pos = np.zeros((2, 2))
    for i in range(2):
        s = sizes[i]
        # each shape keeps to its own half along the relation's axis, so they never overlap
        lo, hi = (s + 0.03, 0.5 - s - 0.02) if (i == 0) == (sign < 0) else (0.5 + s + 0.02, 1.0 - s - 0.03)
        pos[i, axis] = rng.uniform(lo, hi)
        pos[i, 1 - axis] = rng.uniform(s + 0.05, 0.95 - s)
    rows = [[kinds[i], colors[i], pos[i, 0], pos[i, 1], sizes[i]] for i in range(2)]
    return np.asarray(rows, np.float32), relation


@register
class Shapes(DatasetBuilder):
    name = "shapes"
    summary = "procedural coloured shapes with captions ('a red circle above a blue square') for text-to-image"
    default_resolution = 32
    default_channels = 3
    default_count = 4000

    @dataclass(kw_only=True)
    class Options:
        max_shapes: int = 2

    def plan(self, req: PrepareRequest, opts) -> SourcePlan:
        if opts.max_shapes not in (1, 2):
            raise DataError(f"shapes option max_shapes: {opts.max_shapes} must be 1 or 2")
        if min(req.size) < 16:
            raise DataError(f"shapes: resolution {req.resolution} is too small to draw shapes; use 16 or more "
                            "on each side")
        res, ch = req.resolution, req.channels
        counts = split_counts(req.count, req.val_fraction)

        def records(split: str):
            for i in range(counts[split]):
                params, relation = random_shapes(record_rng(req.seed, split, i), opts.max_shapes)
                img = draw_shapes(params, res)
                if ch == 1:
                    img = to_channels_array(to_pil(img), 1)
                yield Record(image=img, caption=describe(params, relation), extras={"shapes": params})

        extras = {"shapes": ExtraColumn(kind="sequence", width=len(SHAPE_FIELDS), max_len=opts.max_shapes,
                                        fields=SHAPE_FIELDS,
                                        description=f"kind index into {KINDS}, colour index into {COLOR_NAMES}, "
                                                    "centre and half-size as fractions of the (shorter) side")}
        return SourcePlan(resolution=res, channels=ch, splits=counts, records=records, has_captions=True,
                          extra_columns=extras, source="procedural: raygen shapes")
