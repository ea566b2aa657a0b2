"""Per-worker batches: a seeded shuffle buffer, vectorized augmentation and
cheap skipping, so the batches of an epoch are a pure function of
(data seed, epoch, rank, world size) and a resumed run sees exactly the
batches an uninterrupted run would."""
from __future__ import annotations

import copy
import logging
from typing import Any, Iterator

import numpy as np
import torch

from raygen.data.augment import augment_batch, center_crop
from raygen.data.decode import MESSAGE, STATUS
from raygen.data.errors import DataError
from raygen.data.images import CORRUPT, REJECTED_SIZE, RESIZED, STATUS_NAMES

log = logging.getLogger("raygen.data")

_SHUFFLE, _AUGMENT, _ORDER = 0, 1, 2  # stream ids: shuffle, augment and unit order never share a generator


def _rng(kind: int, seed: int, epoch: int, rank: int, world_size: int, *more: int) -> np.random.Generator:
    return np.random.default_rng([kind, seed, epoch, rank, world_size, *more])


def _take(cols: dict[str, np.ndarray], idx) -> dict[str, np.ndarray]:
    return {k: v[idx] for k, v in cols.items()}


def _concat(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


class _ShuffleBuffer:
    """A fixed-size buffer: once full, each batch is `batch` rows drawn at
    random from it and their slots take the next incoming rows. Emission
    depends only on row counts, never on how the stream was chunked."""

    def __init__(self, capacity: int, batch: int, rng: np.random.Generator):
        self.cap, self.batch, self.rng = capacity, batch, rng
        self.store: dict[str, np.ndarray] | None = None
        self.free = np.arange(capacity)

    def push(self, cols: dict[str, np.ndarray], n: int) -> Iterator[dict[str, np.ndarray]]:
        if self.store is None:
            self.store = {k: np.empty((self.cap,) + v.shape[1:], v.dtype) for k, v in cols.items()}
        pos = 0
        while pos < n:
            k = min(len(self.free), n - pos)
            slots, self.free = self.free[:k], self.free[k:]
            for name, arr in self.store.items():
                arr[slots] = cols[name][pos:pos + k]
            pos += k
            if len(self.free) == 0:
                sel = self.rng.choice(self.cap, self.batch, replace=False)
                yield _take(self.store, sel)
                self.free = np.sort(sel)

    def drain(self) -> dict[str, np.ndarray] | None:
        """What is left, in random order."""
        if self.store is None:
            return None
        used = np.setdiff1d(np.arange(self.cap), self.free, assume_unique=True)
        return _take(self.store, self.rng.permutation(used))


class _Sequential:
    """No shuffling: rows in stream order, re-cut into batches."""

    def __init__(self, batch: int):
        self.batch = batch
        self.parts: list[dict[str, np.ndarray]] = []
        self.n = 0

    def push(self, cols: dict[str, np.ndarray], n: int) -> Iterator[dict[str, np.ndarray]]:
        self.parts.append(cols)
        self.n += n
        while self.n >= self.batch:
            allrows = _concat(self.parts)
            yield _take(allrows, slice(0, self.batch))
            rest = _take(allrows, slice(self.batch, None))
            self.n -= self.batch
            self.parts = [rest] if self.n else []

    def drain(self) -> dict[str, np.ndarray] | None:
        return _concat(self.parts) if self.parts else None


class WorkerBatches:
    """Batches for one Train worker from `ray.train.get_dataset_shard(...)`.

    `epoch(e, skip=k)` yields dicts: "image" float32 [B, C, H, W] in [0, 1],
    "label" int64 [B], "caption" list[str], "index" int64 [B] (row index in
    the split) and the dataset's extra columns. Training batches are
    shuffled (buffer of `data_spec.shuffle_buffer` rows), augmented per
    `data_spec.augment`, and the last incomplete batch is dropped; when
    the shard says how many rows it holds, every epoch has exactly
    `steps_per_epoch` batches, even if some records turn out corrupt (the
    shortfall is filled with repeats), so DDP ranks stay in step and step
    N maps to (N // steps_per_epoch, N % steps_per_epoch). Validation
    batches are in order, centre-cropped when training crops, and keep the
    last partial batch. A latent dataset's batches hold "latent" float32
    [B, *shape] instead of "image", not augmented (raygen.data.latents).
    """

    def __init__(self, shard, data_spec, *, rank: int, world_size: int, train: bool):
        self.shard, self.spec, self.rank, self.world_size, self.train = shard, data_spec, rank, world_size, train
        self.meta = getattr(shard, "meta", None)
        if self.meta is not None and (self.meta.rank, self.meta.world_size) not in ((rank, world_size), (rank, 1)):
            raise DataError(f"shard is for rank {self.meta.rank} of {self.meta.world_size}, "
                            f"but WorkerBatches was given rank {rank} of {world_size}")
        self.batch_size = data_spec.batch_size
        rows = self.meta.rows if self.meta is not None else None
        if rows is not None and train and rows < self.batch_size:
            raise DataError(f"data.batch_size: {self.batch_size} is larger than the {rows} training rows "
                            f"each of the {world_size} worker(s) gets; lower data.batch_size or add data")
        self.steps_per_epoch: int | None = None if rows is None else (
            rows // self.batch_size if train else -(-rows // self.batch_size))
        self.bad_records: dict[int, str] = {}   # row index -> why, first time seen
        self.resized: set[int] = set()
        self._extras = dict(self.meta.extra_columns) if self.meta is not None else {}

    # ------------------------------------------------------------ counters
    @property
    def corrupt_count(self) -> int:
        """Distinct records skipped so far (undecodable, or wrong size under
        bad_size_policy=reject); the trainer logs it as a metric."""
        return len(self.bad_records)

    @property
    def resized_count(self) -> int:
        return len(self.resized)

    # ------------------------------------------------------------ iteration
    def _good_rows(self, chunk: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], int]:
        status = chunk.pop(STATUS, None)
        messages = chunk.pop(MESSAGE, None)
        if status is None:
            return chunk, len(chunk["index"])
        bad = (status == CORRUPT) | (status == REJECTED_SIZE)
        for i in np.flatnonzero(status != 0):
            idx = int(chunk["index"][i])
            if bad[i] and idx not in self.bad_records:
                where = self.meta.where(idx) if self.meta is not None else f"row index {idx}"
                why = f"{STATUS_NAMES[int(status[i])]}: {messages[i]}"
                self.bad_records[idx] = why
                log.warning("skipped bad image %s (rank %d): %s", where, self.rank, why)
            elif status[i] == RESIZED:
                self.resized.add(idx)
        if bad.any():
            chunk = _take(chunk, ~bad)
        return chunk, len(chunk["index"])

    def _source(self, epoch: int):
        """What to iterate for `epoch`: a fresh per-epoch dataset with the
        read units in a seeded order for training, else the shard as given."""
        recipe = getattr(self.meta, "recipe", None)
        if recipe is None or not self.train:
            return self.shard
        # an unsplit shard (world_size 1 in its meta) holds all rows, whatever this worker's rank
        part = (0, 1) if self.meta.world_size == 1 else (self.meta.rank, self.meta.world_size)
        ds = recipe.dataset(*part, order_seed=(_ORDER, self.spec.seed, epoch, self.rank, self.world_size))
        if hasattr(self.shard, "get_context"):  # keep the limits the DataConfig gave this shard
            ds.context.execution_options = copy.deepcopy(self.shard.get_context().execution_options)
            ds.context.execution_options.preserve_order = True
        return ds

    def _stream(self, epoch: int) -> Iterator[tuple[dict[str, np.ndarray], int]]:
        for chunk in self._source(epoch).iter_batches(batch_size=self.batch_size, batch_format="numpy",
                                                      prefetch_batches=self.spec.prefetch_batches,
                                                      drop_last=False):
            cols, n = self._good_rows(dict(chunk))
            if n:
                yield cols, n

    def _raw_batches(self, epoch: int) -> Iterator[dict[str, np.ndarray]]:
        """Numpy batches of the epoch, before augmentation."""
        B = self.batch_size
        shuffle = self.train and self.spec.shuffle_buffer > 0
        if shuffle:
            buf = _ShuffleBuffer(max(self.spec.shuffle_buffer, B), B,
                                 _rng(_SHUFFLE, self.spec.seed, epoch, self.rank, self.world_size))
        else:
            buf = _Sequential(B)
        emitted, last_full = 0, None
        for cols, n in self._stream(epoch):
            for batch in buf.push(cols, n):
                last_full = batch
                emitted += 1
                yield batch
        rest = buf.drain()
        n_rest = 0 if rest is None else len(rest["index"])
        if not self.train:
            if n_rest:
                yield rest
            return
        for start in range(0, n_rest - B + 1, B):  # full batches left in the buffer
            last_full = _take(rest, slice(start, start + B))
            emitted += 1
            yield last_full
        leftover = _take(rest, slice(n_rest - n_rest % B, None)) if n_rest % B else None
        if self.steps_per_epoch is not None and emitted < self.steps_per_epoch:
            # Corrupt records left this rank short: repeat good rows so every
            # rank runs the same number of steps.
            pool = [p for p in (leftover, last_full) if p is not None]
            if not pool:
                raise DataError(f"rank {self.rank}: no decodable images in its shard "
                                f"({self.corrupt_count} bad); check the dataset with `raygen data show`")
            pool = _concat(pool)
            reps = -(-B // len(pool["index"]))
            fill = _take(pool, np.tile(np.arange(len(pool["index"])), reps)[:B])
            while emitted < self.steps_per_epoch:
                emitted += 1
                yield fill

    def epoch(self, epoch: int, skip: int = 0) -> Iterator[dict[str, Any]]:
        """The batches of `epoch`, starting after the first `skip` of them.

        Skipped batches still stream through the shuffle buffer (its state
        depends on them) but are neither augmented nor turned into tensors.
        """
        if skip < 0:
            raise ValueError(f"skip must be >= 0, got {skip}")
        for b, batch in enumerate(self._raw_batches(epoch)):
            if b < skip:
                continue
            yield self._to_torch(batch, epoch, b)

    def _to_torch(self, batch: dict[str, np.ndarray], epoch: int, b: int) -> dict[str, Any]:
        if "image" not in batch:  # a latent dataset: "latent" as stored, never augmented
            return to_torch_batch(batch, None, self._extras)
        x = np.ascontiguousarray(batch["image"])
        aug = self.spec.augment
        if self.train:
            # Seeded per (epoch, batch index): batch b looks the same whether
            # or not the batches before it were skipped.
            x = augment_batch(x, aug, _rng(_AUGMENT, self.spec.seed, epoch, self.rank, self.world_size, b))
        elif aug.crop:
            x = center_crop(x, aug.crop)
        return to_torch_batch(batch, x, self._extras)


def to_torch_batch(batch: dict[str, np.ndarray], image_u8: np.ndarray | None, extras: dict) -> dict[str, Any]:
    """`image_u8` None: no "image" (a latent dataset's batch keeps its float "latent" column)."""
    out: dict[str, Any] = {
        "label": torch.from_numpy(np.asarray(batch["label"], np.int64)),
        "caption": [str(c) for c in batch["caption"]],
        "index": torch.from_numpy(np.asarray(batch["index"], np.int64)),
    }
    if image_u8 is not None:
        # numpy for the conversion: torch's per-op overhead dominates on small batches
        out = {"image": torch.from_numpy(image_u8.astype(np.float32) * np.float32(1.0 / 255.0)), **out}
    for name, arr in batch.items():
        if name in out or name == "image":
            continue
        arr = np.asarray(arr)
        out[name] = [str(v) for v in arr] if arr.dtype == object else torch.from_numpy(np.ascontiguousarray(arr))
    return out
