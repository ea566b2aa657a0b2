"""How well an epoch's batches are mixed: the pair-sharing figure.

Of the pairs of rows that share a batch in one epoch, the fraction that
share a batch again in the next. With only the row-group order changing
between epochs, batches repeat and the figure is near 1; an independent
uniform shuffle of every epoch gives `ideal_pair_sharing`. WorkerBatches'
seeded shuffle buffer sits in between, closer to ideal the larger the
buffer is against the rank's rows (docs/data.md, "Shuffle quality").
"""
from __future__ import annotations

from typing import Iterable

import numpy as np


def batch_ids(batches: Iterable[np.ndarray], n_rows: int) -> np.ndarray:
    """Row index -> batch number in an epoch (-1: the row was in no batch)."""
    ids = np.full(n_rows, -1, dtype=np.int64)
    for b, rows in enumerate(batches):
        ids[np.asarray(rows, dtype=np.int64)] = b
    return ids


def _same_batch_pairs(groups: np.ndarray) -> int:
    """Pairs of rows with equal ids (ids >= 0) in `groups`."""
    counts = np.bincount(groups[groups >= 0]) if (groups >= 0).any() else np.zeros(0, np.int64)
    return int((counts * (counts - 1) // 2).sum())


def pair_sharing(epoch_a: list[np.ndarray], epoch_b: list[np.ndarray]) -> float:
    """Of the pairs sharing a batch in `epoch_a` (a list of row-index arrays,
    one per batch), the fraction sharing a batch in `epoch_b` too. A row
    repeated within one epoch (corrupt-record fill) counts once."""
    n = 1 + max(int(np.max(b)) for b in [*epoch_a, *epoch_b] if len(b))
    in_b = batch_ids(epoch_b, n)
    together = total = 0
    for rows in epoch_a:
        rows = np.unique(np.asarray(rows, dtype=np.int64))
        total += len(rows) * (len(rows) - 1) // 2
        together += _same_batch_pairs(in_b[rows])
    return together / total if total else 0.0


def ideal_pair_sharing(n_rows: int, batch: int) -> float:
    """The figure for independent uniform shuffles: the chance that two given
    rows share one of the n_rows // batch full batches of the next epoch."""
    if n_rows < 2:
        return 0.0
    return (n_rows // batch) * batch * (batch - 1) / (n_rows * (n_rows - 1))


# ---------------------------------------------------------------- without Ray
class _Rows:
    """What WorkerBatches iterates: the rows of `units`, in that order, as
    numpy chunks (the shape of Ray Data's `iter_batches`)."""

    def __init__(self, table: dict[str, np.ndarray], units):
        self.table, self.units = table, units

    def iter_batches(self, batch_size: int, **_):
        for u in self.units:
            lo = u.first_index + u.lo
            for start in range(lo, u.first_index + u.hi, batch_size):
                stop = min(start + batch_size, u.first_index + u.hi)
                yield {k: v[start:stop] for k, v in self.table.items()}


def in_memory_shard(table: dict[str, np.ndarray], unit_rows: int, rank: int = 0, world_size: int = 1):
    """A shard for WorkerBatches over an in-memory table (columns "index",
    "image" uint8 [N, C, H, W], "label", "caption"), cut into read units of
    `unit_rows` rows like parquet row groups: the real per-rank split and
    per-epoch unit order of `raygen.data.pipeline.Recipe`, without Ray. For
    measuring and testing the shuffle."""
    from types import SimpleNamespace

    from raygen.data.pipeline import ReadUnit, Recipe

    class InMemoryRecipe(Recipe):
        def units_dataset(self, units):
            return _Rows(table, units)

    n = len(table["index"])
    units = [ReadUnit(file="memory", row_group=k, first_index=start, lo=0, hi=min(unit_rows, n - start))
             for k, start in enumerate(range(0, n, unit_rows))]
    recipe = InMemoryRecipe(split="train", rows=n, units=units, shards=[(0, "memory")],
                            params=SimpleNamespace(extra_columns={}))
    meta = recipe.meta(rank, world_size)
    lo, hi = recipe.rank_range(rank, world_size)
    return SimpleNamespace(meta=meta, iter_batches=_Rows(table, recipe.range_units(lo, hi)).iter_batches)


def epoch_indices(batches) -> list[np.ndarray]:
    """The "index" column of each batch WorkerBatches yields."""
    return [np.asarray(b["index"]) for b in batches]
