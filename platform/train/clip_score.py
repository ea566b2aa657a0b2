"""CLIP score of generated images against their conditions, beside FID.

A label-conditioned image is scored against its class name, a caption-
conditioned one against its caption (`Conditions.texts`), with the platform's
scorer interface (`raygen.metrics.load_scorer`: local CLIP weights or a
`clip` model trained by raygen). It scores the samples FID already drew, so it
costs one image and one text encoding per sample."""
from __future__ import annotations

from typing import Any

import torch

from raygen.models import Generator


def load_run_scorer(spec):
    """The spec's scorer (`track.clip_score.scorer`), or None when none is set."""
    if not spec.track.clip_score.scorer:
        return None
    from raygen.metrics import load_scorer
    return load_scorer(spec.track.clip_score.scorer, tracking_uri=spec.track.tracking_uri)


def condition_clip_score(scorer, model: Generator, records: dict[str, Any], images: torch.Tensor) -> float | None:
    """Mean CLIPScore of `images` (drawn for the first len(images) records) against
    their conditions' text; None when the model's condition is not text-like."""
    from raygen.train.sampling import conditions_from_records
    texts = conditions_from_records(model, records, images.shape[0]).texts(model.data_info)
    if texts is None:
        return None
    return float(scorer.score(images, texts).mean())
