"""Deliver an import's records in their split order with bounded memory.

An import permutes its pool with the seed (`pool_split`) and writes each
split in that order, but reads its source front to back. Instead of holding
the source, `PoolReorder` streams it once: each record goes to the bucket of
its output position (`bucket_rows` consecutive positions of one split),
buckets are buffered up to `BUFFER_BYTES` and appended to files on local
disk, and `records(split)` reads them back bucket by bucket, each sorted by
position. Memory: the buffer, one bucket (about `BUCKET_BYTES`) and an
index of 4 bytes per source record (8 past 2**31 records); disk: the
selected records' source bytes, in a temporary folder removed at the end.
The output is the same as sorting the whole pool in memory.
"""
from __future__ import annotations

import os
import pickle
import tempfile
from collections import defaultdict
from typing import Callable, Iterator

import numpy as np

from raygen.data.errors import DataError
from raygen.data.registry import pool_split
from raygen.data.shards import Record

#: records buffered before they are appended to their bucket files
BUFFER_BYTES = 64 * 2**20
#: about this many source bytes per bucket: what `records` holds at once
BUCKET_BYTES = 64 * 2**20
SPLITS = ("train", "val")


def record_size(rec: Record) -> int:
    image = rec.image if isinstance(rec.image, (bytes, bytearray)) else b""
    return len(image) + len(rec.caption) + 64 * (1 + len(rec.extras))


class PoolReorder:
    """`stream(wanted)` yields every record of the pool in source order
    (record i is pool index i); it may yield None for an index where
    `wanted(i)` is False (a record no split keeps). `record_bytes`: the
    source's average bytes per record, to size the buckets."""

    def __init__(self, pool: int, *, count: int | None, val_fraction: float, seed: int, record_bytes: float,
                 stream: Callable[[Callable[[int], bool]], Iterator[Record | None]], what: str):
        idx = pool_split(pool, count=count, val_fraction=val_fraction, seed=seed)
        self.splits = {k: len(v) for k, v in idx.items()}
        self.pool, self.stream, self.what = pool, stream, what
        # where record i goes: its position in train, n_train + its position in val, or -1 (no split keeps it)
        self._dest = np.full(pool, -1, dtype=np.int32 if pool < 2**31 else np.int64)
        self._dest[idx["train"]] = np.arange(len(idx["train"]), dtype=self._dest.dtype)
        self._dest[idx["val"]] = np.arange(len(idx["val"]), dtype=self._dest.dtype) + len(idx["train"])
        del idx
        self.bucket_rows = max(1, int(BUCKET_BYTES // max(record_bytes, 1.0)))
        self._buffers: dict[tuple[str, int], list[tuple[int, Record]]] = defaultdict(list)
        self._buffered = 0
        self._dir: tempfile.TemporaryDirectory | None = None
        self._filled = False

    def wanted(self, i: int) -> bool:
        return bool(self._dest[i] >= 0)

    def records(self, split: str) -> Iterator[Record]:
        """The split's records in order (the source is read on the first call)."""
        if not self._filled:
            self._fill()
        n = self.splits[split]
        for b in range(-(-n // self.bucket_rows)):
            items = self._buffers.pop((split, b), [])
            if self._dir is not None:
                items += self._read_bucket(split, b)
            items.sort(key=lambda item: item[0])
            expected = min(self.bucket_rows, n - b * self.bucket_rows)
            if len(items) != expected:
                raise DataError(f"{self.what}: the source changed while it was imported "
                                f"({len(items)} of {expected} records of a {split} bucket); import it again")
            for _, rec in items:
                yield rec
            del items
        if split == SPLITS[-1]:
            self.close()

    def close(self) -> None:
        self._buffers.clear()
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None

    # ------------------------------------------------------------ filling
    def _fill(self) -> None:
        seen, n_train = 0, self.splits["train"]
        for i, rec in enumerate(self.stream(self.wanted)):
            seen = i + 1
            if i >= self.pool:
                break
            d = int(self._dest[i])
            if d < 0:
                continue
            split, pos = ("train", d) if d < n_train else ("val", d - n_train)
            self._buffers[(split, pos // self.bucket_rows)].append((pos, rec))
            self._buffered += record_size(rec)
            if self._buffered > BUFFER_BYTES:
                self._flush()
        if seen != self.pool:
            raise DataError(f"{self.what}: the source changed while it was imported (read {seen} records, "
                            f"expected {self.pool}); import it again")
        if self._dir is not None:  # once anything is on disk, buckets are read from there
            self._flush()
        self._filled = True

    def _path(self, split: str, bucket: int) -> str:
        return os.path.join(self._dir.name, f"{split}-{bucket:07d}.pkl")

    def _flush(self) -> None:
        if self._dir is None:
            self._dir = tempfile.TemporaryDirectory(prefix="raygen-import-")
        for (split, b), items in self._buffers.items():
            with open(self._path(split, b), "ab") as f:
                pickle.dump(items, f, protocol=pickle.HIGHEST_PROTOCOL)
        self._buffers.clear()
        self._buffered = 0

    def _read_bucket(self, split: str, bucket: int) -> list[tuple[int, Record]]:
        path = self._path(split, bucket)
        if not os.path.exists(path):
            return []
        items = []
        with open(path, "rb") as f:
            while True:
                try:
                    items += pickle.load(f)
                except EOFError:
                    break
        os.unlink(path)
        return items
