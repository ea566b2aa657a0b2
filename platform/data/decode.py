"""Shard rows -> decoded columns, shared by the Ray pipeline (inside
`map_batches`) and the plain loader, so both deliver identical pixels."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from raygen.data.errors import DataError
from raygen.data.images import as_size, decode_batch, size_text
from raygen.data.manifest import CORE_COLUMNS, ExtraColumn, Manifest

#: columns the decoder adds beside the data: per-row status and message (see images.py)
STATUS, MESSAGE = "status", "message"


@dataclass(frozen=True, kw_only=True)
class DecodeParams:
    stored_size: tuple[int, int]   # (height, width) of the stored PNGs
    size: tuple[int, int]          # (height, width) delivered
    channels: int
    bad_size_policy: str
    extra_columns: dict[str, ExtraColumn] = field(default_factory=dict)

    @classmethod
    def for_spec(cls, manifest: Manifest, data_spec) -> "DecodeParams":
        return cls(stored_size=manifest.size, size=as_size(data_spec.resolution),
                   channels=data_spec.channels, bad_size_policy=data_spec.bad_size_policy,
                   extra_columns=dict(manifest.extra_columns))

    @classmethod
    def stored(cls, manifest: Manifest) -> "DecodeParams":
        """The images as stored: their own size and channels."""
        return cls(stored_size=manifest.size, size=manifest.size, channels=manifest.channels,
                   bad_size_policy="resize", extra_columns=dict(manifest.extra_columns))

    @property
    def read_columns(self) -> list[str]:
        return [*CORE_COLUMNS, *self.extra_columns]


def _extra_to_numpy(name: str, spec: ExtraColumn, column) -> dict[str, np.ndarray]:
    """One extra arrow column -> fixed-shape numpy (sequences padded, with a mask)."""
    col = column.combine_chunks() if hasattr(column, "combine_chunks") else column
    n = len(col)
    if spec.kind == "sequence":
        lengths = col.value_lengths().fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
        values = col.flatten().flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(-1, spec.width)
        max_len = max(spec.max_len, int(lengths.max()) if n else 0)
        mask = np.arange(max_len)[None, :] < lengths[:, None]
        out = np.zeros((n, max_len, spec.width), np.float32)
        out[mask] = values
        return {name: out, f"{name}_mask": mask}
    if spec.kind == "vector":
        return {name: col.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(n, spec.width)}
    if spec.kind == "scalar":
        return {name: col.to_numpy(zero_copy_only=False).astype(np.float64)}
    return {name: np.array([v if v is not None else "" for v in col.to_pylist()], dtype=object)}


def decode_table(table, params: DecodeParams) -> dict[str, np.ndarray]:
    """A pyarrow table of shard rows -> numpy columns:
    image uint8 [B,C,H,W], label, caption, index, status, message, extras."""
    images, status, messages = decode_batch(table.column("png"),
                                            stored_resolution=params.stored_size,
                                            resolution=params.size, channels=params.channels,
                                            bad_size_policy=params.bad_size_policy)
    out = {
        "image": images,
        "label": table.column("label").to_numpy().astype(np.int64),
        "caption": np.array([c or "" for c in table.column("caption").to_pylist()], dtype=object),
        "index": table.column("index").to_numpy().astype(np.int64),
        STATUS: status,
        MESSAGE: np.array(messages, dtype=object),
    }
    for name, spec in params.extra_columns.items():
        out.update(_extra_to_numpy(name, spec, table.column(name)))
    return out


def check_spec(manifest, data_spec) -> None:
    crop = data_spec.augment.crop
    size = as_size(data_spec.resolution)
    if crop and any(c > s for c, s in zip(as_size(crop), size)):
        raise DataError(f"data.augment.crop: {crop} is larger than data.resolution {data_spec.resolution} "
                        f"({size_text(crop)} vs {size_text(size)}); use a crop at most the resolution on each side")
    if data_spec.augment.shift and data_spec.augment.shift >= min(size):
        raise DataError(f"data.augment.shift: {data_spec.augment.shift} must be smaller than data.resolution "
                        f"{data_spec.resolution}" + (" (its shorter side)" if size[0] != size[1] else ""))
