"""The seeded shuffle buffer inside each worker's stream: it mixes rows across
batches from one epoch to the next (the pair-sharing figure against an
independent shuffle), and the batches stay a pure function of
(seed, epoch, rank, world size), so skipping k batches resumes exactly.
Real WorkerBatches and Recipe code over an in-memory table, without Ray."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from raygen.data.shuffle import epoch_indices, ideal_pair_sharing, in_memory_shard, pair_sharing
from raygen.data.worker import WorkerBatches
from raygen.spec.schema import DataSpec

ROWS, UNIT, BATCH = 8192, 1024, 32  # row groups of 1024 rows, as the shard writer cuts small images


@pytest.fixture(scope="module")
def table():
    rng = np.random.default_rng(0)
    return {"index": np.arange(ROWS), "image": rng.integers(0, 255, (ROWS, 1, 6, 6), dtype=np.uint8),
            "label": rng.integers(0, 10, ROWS), "caption": np.array([f"r{i}" for i in range(ROWS)], dtype=object)}


def batches(table, *, buffer=1024, rank=0, world=1, seed=3, augment=None):
    spec = DataSpec(dataset="memory", batch_size=BATCH, shuffle_buffer=buffer, seed=seed,
                    augment=augment if augment is not None else {"hflip": True, "shift": 1})
    return WorkerBatches(in_memory_shard(table, UNIT, rank, world), spec, rank=rank, world_size=world, train=True)


def test_pair_sharing_counts_pairs():
    a = [np.array([0, 1, 2]), np.array([3, 4, 5])]
    assert pair_sharing(a, a) == 1.0
    # 6 pairs share a batch in a; in b only (0, 1) and (4, 5) still do
    assert pair_sharing(a, [np.array([0, 1, 3]), np.array([4, 2, 5])]) == pytest.approx(2 / 6)
    assert pair_sharing(a, [np.array([0, 3]), np.array([1, 4]), np.array([2, 5])]) == 0.0
    assert ideal_pair_sharing(6, 3) == pytest.approx(2 * 3 / 15)


def test_ideal_figure_is_what_independent_shuffles_give():
    rng = np.random.default_rng(1)
    n, b = 2048, 16
    figures = []
    for _ in range(20):
        e0, e1 = (np.split(rng.permutation(n), n // b) for _ in range(2))
        figures.append(pair_sharing(e0, e1))
    assert np.mean(figures) == pytest.approx(ideal_pair_sharing(n, b), rel=0.1)


def test_without_a_buffer_batches_repeat_and_the_buffer_mixes_them(table):
    ideal = ideal_pair_sharing(ROWS, BATCH)
    figure = {}
    for buffer in (0, 1024, 4096):
        wb = batches(table, buffer=buffer)
        figure[buffer] = pair_sharing(epoch_indices(wb._raw_batches(0)), epoch_indices(wb._raw_batches(1)))
    # only the row-group order changes: the same rows share a batch every epoch
    assert figure[0] == 1.0
    # a buffer of one row group: a few times the ideal; of half the rank's rows: about the ideal
    assert ideal < figure[1024] < 6 * ideal
    assert figure[4096] < 1.5 * ideal
    assert figure[4096] < figure[1024]


def test_every_row_once_per_epoch_in_a_new_order(table):
    wb = batches(table)
    e0, e1 = (np.concatenate(epoch_indices(wb._raw_batches(e))) for e in (0, 1))
    assert len(e0) == ROWS and sorted(e0) == list(range(ROWS))
    assert not np.array_equal(e0, e1)


def test_batches_are_a_pure_function_of_seed_epoch_rank(table):
    def run(**kw):
        return [(b["index"].clone(), b["image"].clone()) for b in batches(table, **kw).epoch(1)]

    first, again = run(), run()
    assert all(torch.equal(i, j) and torch.equal(x, y) for (i, x), (j, y) in zip(first, again))
    other_seed = run(seed=4)
    assert not torch.equal(first[0][0], other_seed[0][0])
    r0, r1 = run(rank=0, world=2), run(rank=1, world=2)
    rows0, rows1 = (set(torch.cat([i for i, _ in r]).tolist()) for r in (r0, r1))
    assert not rows0 & rows1 and len(rows0) == len(rows1) == ROWS // 2


def test_skipping_k_batches_resumes_exactly(table):
    full = list(batches(table).epoch(2))
    k = 37
    resumed = list(batches(table).epoch(2, skip=k))
    assert len(resumed) == len(full) - k
    for a, b in zip(full[k:], resumed):
        assert torch.equal(a["index"], b["index"]) and torch.equal(a["image"], b["image"])
