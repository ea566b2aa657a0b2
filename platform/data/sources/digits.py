"""scikit-learn's bundled 8x8 handwritten digits (1,797 images, no network)."""
from __future__ import annotations

import numpy as np

from raygen.data.images import fit_image, to_pil
from raygen.data.registry import DatasetBuilder, PrepareRequest, SourcePlan, pool_split, register
from raygen.data.shards import Record

WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


@register
class Digits(DatasetBuilder):
    name = "digits"
    summary = "scikit-learn's 8x8 handwritten digits (1,797), 10 classes, captions"
    default_resolution = 8
    default_channels = 1

    def plan(self, req: PrepareRequest, opts) -> SourcePlan:
        from sklearn.datasets import load_digits
        bunch = load_digits()
        # sklearn stores ink as 0..16: scale to the full byte range.
        images = np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)
        labels = bunch.target.astype(np.int64)
        idx = pool_split(len(images), count=req.count, val_fraction=req.val_fraction, seed=req.seed)
        res, ch = req.resolution, req.channels

        def records(split: str):
            for i in idx[split]:
                img = images[i] if (res, ch) == (8, 1) else fit_image(to_pil(images[i]), res, ch)
                yield Record(image=img, label=int(labels[i]), caption=f"a handwritten digit {WORDS[labels[i]]}")

        return SourcePlan(resolution=res, channels=ch, splits={k: len(v) for k, v in idx.items()}, records=records,
                          class_names=[str(d) for d in range(10)], has_captions=True,
                          source="sklearn.datasets.load_digits")
