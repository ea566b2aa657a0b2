"""What the platform samples to judge a model: sample grids and FID sets.

Conditions come from the validation split for FID and `raygen eval`, so a
model that conditions on scenes (or labels, or captions) is compared with the
real images of those same conditions. Grids cycle through the classes (or
class-name captions) when the model takes them, so one grid shows every class;
kinds that need real data (scenes, images) take validation records too.
Image i of a set uses seed `seed + i`, so sets are reproducible whatever the
batch size they are drawn in.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from raygen.models import Capability, Conditions, Generator, require
from raygen.models.sampling import image_seeds, make_generators, parse_params


def cycling_conditions(model: Generator, n: int) -> Conditions | None:
    """Every class in turn (labels, or class names as captions); None when the
    kind needs real records."""
    info, kind = model.data_info, model.condition_kind
    if kind == "none":
        return Conditions.none(n)
    if kind == "label":
        return Conditions("label", tuple(i % info.num_classes for i in range(n)))
    if kind == "caption":
        names = info.class_names or ["an image"]
        return Conditions("caption", tuple(names[i % len(names)] for i in range(n)))
    return None


def conditions_from_records(model: Generator, records: dict[str, Any], n: int) -> Conditions:
    """The conditions of the first n records of a split (as `load_split_images` returns it)."""
    available = len(records["image"])
    if available < n:
        raise ValueError(f"the validation split has {available} images; {n} are needed to condition the samples")
    batch = {k: (v[:n] if hasattr(v, "__getitem__") and not isinstance(v, (int, float, str)) else v)
             for k, v in records.items()}
    return Conditions.from_batch(model.condition_kind, batch, model.data_info)


@torch.no_grad()
def sample_set(model: Generator, conditions: Conditions, seed: int, batch: int = 64,
               params: dict[str, Any] | None = None) -> torch.Tensor:
    """Images for every condition, drawn in batches, with the family's default sampling
    parameters updated by `params` (e.g. FID's few-step sampler, `track.fid.sampling`)."""
    require(model, Capability.SAMPLE)
    params = parse_params(model.sampling_params, params or {}, strict=False)
    seeds = image_seeds(seed, conditions.n)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    out = []
    for start in range(0, conditions.n, batch):
        stop = min(start + batch, conditions.n)
        out.append(model.sample(conditions[start:stop], params, make_generators(seeds[start:stop], device)).cpu())
    return torch.cat(out)


def grid_conditions(model: Generator, n: int, val_records: dict[str, Any] | None) -> Conditions:
    cycling = cycling_conditions(model, n)
    if cycling is not None:
        return cycling
    if val_records is None:
        raise ValueError(f"a {model.condition_kind}-conditioned model needs validation records to sample a grid")
    # a grid shows what there is: a small validation split gives a smaller grid, not an error
    return conditions_from_records(model, val_records, min(n, len(val_records["image"])))


def sample_grid_png(model: Generator, n: int, path: str | Path, *, seed: int = 0,
                    val_records: dict[str, Any] | None = None) -> Path:
    """Sample n images into a grid PNG (upscaled so small images stay visible),
    each label- or caption-conditioned image with its condition written under it."""
    from raygen.images import save_grid, upscale_for
    conditions = grid_conditions(model, n, val_records)
    images = sample_set(model, conditions, seed)
    upscale = upscale_for(model.data_info.height, model.data_info.width)
    # each image's class name or caption under it, when the model takes one
    return save_grid(images, path, upscale=upscale, captions=conditions.texts(model.data_info))
