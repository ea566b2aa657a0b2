"""Read a prepared split into memory without Ray (FID references, tests,
`raygen data show`)."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from raygen.data.decode import MESSAGE, STATUS, DecodeParams, check_spec, decode_table
from raygen.data.images import CORRUPT, REJECTED_SIZE
from raygen.data.manifest import delivered_size, read_manifest

log = logging.getLogger("raygen.data")


def iter_decoded(dir: str | Path, split: str, params: DecodeParams | None = None, *, limit: int | None = None,
                 chunk: int = 1024):
    """Yield decoded numpy column dicts of a split in file order (bad rows
    dropped and logged); `params` defaults to the stored size and channels."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    m = read_manifest(dir)
    if params is None:
        params = DecodeParams.stored(m)
    seen = 0
    for path, info in zip(m.shard_paths(split), m.split(split).shards):
        for rb in pq.ParquetFile(path).iter_batches(batch_size=chunk, columns=params.read_columns):
            cols = decode_table(pa.Table.from_batches([rb]), params)
            status, messages = cols.pop(STATUS), cols.pop(MESSAGE)
            bad = (status == CORRUPT) | (status == REJECTED_SIZE)
            for i in np.flatnonzero(bad):
                log.warning("skipped bad image %s row %d: %s", info.file, int(cols["index"][i]) - info.first_index,
                            messages[i])
            if bad.any():
                cols = {k: v[~bad] for k, v in cols.items()}
            cols["_bad"] = np.array([int(bad.sum())])
            if limit is not None and seen + len(cols["index"]) > limit:
                keep = limit - seen
                cols = {k: (v if k == "_bad" else v[:keep]) for k, v in cols.items()}
            seen += len(cols["index"])
            yield cols
            if limit is not None and seen >= limit:
                return


def load_split_images(dir: str | Path, split: str, data_spec, limit: int | None = None) -> dict[str, Any]:
    """A whole split (or its first `limit` good images) as tensors, decoded
    exactly as the Ray pipeline decodes validation batches: "image" float
    [N, C, H, W] in [0, 1], "label" int64 [N], "caption" list[str], "index",
    extra columns, and "corrupt_count". A latent dataset gives "latent"
    float32 [N, *shape] and no "image" (see load_split_latents)."""
    import torch

    from raygen.data.augment import center_crop
    from raygen.data.worker import to_torch_batch

    m = read_manifest(dir)
    if m.kind == "latents":  # "latent" instead of "image" (raygen.data.latents)
        from raygen.data.latents import load_split_latents
        return {**load_split_latents(dir, split, limit), "corrupt_count": 0}
    check_spec(m, data_spec)
    params = DecodeParams.for_spec(m, data_spec)
    parts, bad = [], 0
    for cols in iter_decoded(dir, split, params, limit=limit):
        bad += int(cols.pop("_bad")[0])
        if len(cols["index"]):
            parts.append(cols)
    if not parts:
        return {"image": torch.zeros(0, data_spec.channels, *delivered_size(data_spec)), "label": torch.zeros(0, dtype=torch.int64), "caption": [],
                "index": torch.zeros(0, dtype=torch.int64), "corrupt_count": bad}
    cols = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    x = np.ascontiguousarray(cols["image"])
    if data_spec.augment.crop:
        x = center_crop(x, data_spec.augment.crop)
    out = to_torch_batch(cols, x, dict(m.extra_columns))
    out["corrupt_count"] = bad
    return out
