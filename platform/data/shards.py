"""Size-bounded parquet shards written atomically.

Every file is written under a temporary name, fsynced, then renamed, and
the folder is fsynced, so a crash leaves either the old state or the whole
new file, never a truncated shard under a final name. The manifest goes
last (`write_manifest`), so a folder only looks complete once all its
shards are.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from raygen.data.errors import DataError
from raygen.data.manifest import MANIFEST_NAME, ExtraColumn, Manifest, ShardInfo, SplitInfo

TMP_PREFIX = ".tmp-"
DEFAULT_SHARD_BYTES = 32 * 1024 * 1024
#: a parquet row group is the pipeline's unit of reading and decoding: at
#: most ROW_GROUP_ROWS rows and about ROW_GROUP_BYTES decoded, so read tasks
#: stay small and many even for a dataset of a few shards
ROW_GROUP_ROWS = 1024
ROW_GROUP_BYTES = 16 * 1024 * 1024


@dataclass(kw_only=True)
class Record:
    """One example as a builder yields it.

    `image` is an HxW / HxWxC uint8 array (encoded to PNG by the writer) or
    already-encoded PNG bytes of the right size and mode.
    """
    image: Any
    label: int = -1
    caption: str = ""
    extras: dict[str, Any] = field(default_factory=dict)
    origin: str = ""  # where it came from (file, tar member), for skip messages


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` (bytes or any buffer) to `path` so that readers see all of it or nothing."""
    path = Path(path)
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}.{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    fsync_dir(path.parent)


def write_manifest(manifest: Manifest, out: Path) -> None:
    atomic_write_bytes(Path(out) / MANIFEST_NAME, manifest.to_json().encode())


def _extra_array(spec: ExtraColumn, values: list):
    """Build the arrow array of one extra column from per-record values."""
    import pyarrow as pa
    if spec.kind == "sequence":
        rows = [np.asarray(v, dtype=np.float32).reshape(-1, spec.width) for v in values]
        lengths = np.array([len(r) for r in rows], dtype=np.int32)
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
        flat = np.concatenate([r.reshape(-1) for r in rows]) if rows else np.zeros(0, np.float32)
        inner = pa.FixedSizeListArray.from_arrays(pa.array(flat, pa.float32()), spec.width)
        return pa.ListArray.from_arrays(pa.array(offsets), inner)
    if spec.kind == "vector":
        flat = np.stack([np.asarray(v, dtype=np.float32).reshape(spec.width) for v in values]).reshape(-1)
        return pa.FixedSizeListArray.from_arrays(pa.array(flat, pa.float32()), spec.width)
    if spec.kind == "scalar":
        return pa.array(np.asarray(values, dtype=np.float64))
    return pa.array([str(v) for v in values], pa.string())


class ShardWriter:
    """Collects one split's records and writes them as parquet shards of at
    most about `max_bytes` each (the PNG bytes dominate a shard's size)."""

    def __init__(self, out: Path, split: str, extra_columns: dict[str, ExtraColumn], *,
                 max_bytes: int = DEFAULT_SHARD_BYTES, decoded_row_bytes: int = 0):
        if max_bytes < 1024:
            raise DataError(f"shard_bytes: {max_bytes} is too small; use at least 1024")
        self.out, self.split, self.extra_columns, self.max_bytes = Path(out), split, extra_columns, max_bytes
        self.decoded_row_bytes = decoded_row_bytes
        self.shards: list[ShardInfo] = []
        self.rows = 0
        self._pending: list[tuple[bytes, int, str, dict]] = []
        self._pending_bytes = 0

    def add(self, png: bytes, label: int, caption: str, extras: dict[str, Any]) -> None:
        missing = set(self.extra_columns) - set(extras)
        if missing:
            raise DataError(f"record is missing extra column(s) {sorted(missing)} declared by its builder")
        size = len(png) + len(caption.encode()) + 16
        # Flush before a record that would push the shard past the bound (a
        # single oversized record still gets a shard of its own).
        if self._pending and self._pending_bytes + size > self.max_bytes:
            self._flush()
        self._pending.append((png, int(label), caption, extras))
        self._pending_bytes += size

    def close(self, skipped: int = 0) -> SplitInfo:
        if self._pending:
            self._flush()
        return SplitInfo(rows=self.rows, shards=list(self.shards), skipped=skipped)

    def _flush(self) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        recs = self._pending
        n = len(recs)
        cols = {
            "index": pa.array(np.arange(self.rows, self.rows + n, dtype=np.int64)),
            "png": pa.array([r[0] for r in recs], pa.binary()),
            "label": pa.array(np.array([r[1] for r in recs], dtype=np.int64)),
            "caption": pa.array([r[2] for r in recs], pa.string()),
        }
        for name, spec in self.extra_columns.items():
            cols[name] = _extra_array(spec, [r[3][name] for r in recs])
        table = pa.table(cols)
        sink = pa.BufferOutputStream()
        # PNG bytes are already compressed: store them as is; zstd the rest.
        compression = {name: ("NONE" if name == "png" else "ZSTD") for name in cols}
        row_bytes = max(self._pending_bytes // n, self.decoded_row_bytes, 1)
        rg_rows = max(16, min(ROW_GROUP_ROWS, ROW_GROUP_BYTES // row_bytes))
        pq.write_table(table, sink, row_group_size=rg_rows, compression=compression)
        data = sink.getvalue()  # a pyarrow Buffer: hashed and written without a copy
        name = f"{self.split}-{len(self.shards):05d}.parquet"
        atomic_write_bytes(self.out / name, data)
        self.shards.append(ShardInfo(file=name, rows=n, bytes=len(data),
                                     sha256=hashlib.sha256(data).hexdigest(), first_index=self.rows))
        self.rows += n
        self._pending, self._pending_bytes = [], 0


def clear_dataset_dir(out: Path) -> None:
    """Make `out` ready for a new prepare: remove the manifest first (so the
    folder stops looking complete at once), then our old shards and temp
    files. Refuses a folder holding anything else, to never delete user files."""
    out = Path(out)
    if not out.exists():
        out.mkdir(parents=True)
        return
    if not out.is_dir():
        raise DataError(f"--out {out} is a file; give a folder")
    ours = [p for p in out.iterdir()
            if p.name == MANIFEST_NAME or p.name.startswith(TMP_PREFIX)
            or (p.suffix == ".parquet" and p.name.split("-")[0] in ("train", "val"))]
    others = [p.name for p in out.iterdir() if p not in ours]
    if others:
        raise DataError(f"--out {out} holds files that are not a raygen dataset ({', '.join(sorted(others)[:3])}...); "
                        "choose an empty or new folder")
    manifest = out / MANIFEST_NAME
    if manifest.exists():
        manifest.unlink()
        fsync_dir(out)
    for p in ours:
        if p.exists():
            p.unlink()
