"""The streaming pipeline: deterministic per-worker batches, resume by
skipping, augmentation, corrupt records. Fast tests drive WorkerBatches from
an in-process shard; `slow` tests run the real Ray Data / Ray Train path."""
from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from raygen.data import DataError, WorkerBatches, load_split_images, prepare_dataset, read_manifest
from raygen.data.decode import DecodeParams, decode_table
from raygen.data.images import encode_png
from raygen.spec.schema import DataSpec


@pytest.fixture(scope="module")
def spheres_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pipe") / "spheres"
    prepare_dataset("spheres", out, count=96, resolution=16, max_spheres=3, shard_bytes=12_000)
    return out


def plant_bad_records(src: Path, dst: Path, *, corrupt: list[int], wrong_size: list[int]) -> None:
    """Copy a dataset and damage the given train rows (split-wide indices) in place."""
    shutil.copytree(src, dst)
    m = read_manifest(dst)
    for shard in m.splits["train"].shards:
        path = dst / shard.file
        t = pq.read_table(path)
        png = t.column("png").to_pylist()
        hit = False
        for k, idx in enumerate(t.column("index").to_pylist()):
            if idx in corrupt:
                png[k], hit = png[k][:30] + b"\x00" * 20, True        # truncated / garbage PNG
            elif idx in wrong_size:
                png[k], hit = encode_png(np.full((9, 9, 3), 128, np.uint8)), True
        if hit:
            t = t.set_column(t.column_names.index("png"), "png", pa.array(png, pa.binary()))
            pq.write_table(t, path)


class LocalShard:
    """What the Ray pipeline hands a worker, computed in-process: rank r's
    contiguous row range, decoded, in file order."""

    def __init__(self, dir: Path, spec: DataSpec, rank: int, world_size: int, split: str = "train"):
        from raygen.data.pipeline import ShardMeta
        m = read_manifest(dir)
        self.params = DecodeParams.for_spec(m, spec)
        n = m.counts[split] // world_size
        self.lo, self.hi = rank * n, (rank + 1) * n
        self.paths = m.shard_paths(split)
        self.meta = ShardMeta(split=split, rank=rank, world_size=world_size, rows=n,
                              shards=[(s.first_index, s.file) for s in m.split(split).shards],
                              extra_columns=dict(m.extra_columns))

    def iter_batches(self, *, batch_size, batch_format, prefetch_batches, drop_last):
        for p in self.paths:
            t = pq.read_table(p, columns=self.params.read_columns)
            idx = t.column("index").to_numpy()
            t = t.filter(pa.array((idx >= self.lo) & (idx < self.hi)))
            if len(t):
                cols = decode_table(t, self.params)
                for i in range(0, len(t), batch_size):
                    yield {k: v[i:i + batch_size] for k, v in cols.items()}


def spec_for(dir: Path, **kw) -> DataSpec:
    base = dict(dataset=str(dir), resolution=16, channels=3, batch_size=8, shuffle_buffer=16, seed=7,
                augment={"hflip": True, "shift": 2})
    base.update(kw)
    return DataSpec(**base)


def collect(wb: WorkerBatches, epoch: int, skip: int = 0) -> list[dict]:
    return list(wb.epoch(epoch, skip=skip))


def same(a: list[dict], b: list[dict]) -> bool:
    return len(a) == len(b) and all(torch.equal(x["image"], y["image"]) and torch.equal(x["index"], y["index"])
                                    for x, y in zip(a, b))


# ---------------------------------------------------------------- fast: WorkerBatches logic
def test_epoch_is_a_pure_function_of_seed_epoch_rank_and_world_size(spheres_dir):
    spec = spec_for(spheres_dir)
    wb = WorkerBatches(LocalShard(spheres_dir, spec, 1, 2), spec, rank=1, world_size=2, train=True)
    assert wb.steps_per_epoch == 48 // 8
    e0, e0_again, e1 = collect(wb, 0), collect(wb, 0), collect(wb, 1)
    assert same(e0, e0_again)
    assert len(e0) == len(e1) == 6
    assert not same(e0, e1)                                     # reshuffled and re-augmented
    assert sorted(torch.cat([b["index"] for b in e0]).tolist()) == list(range(48, 96))
    # a new WorkerBatches (a restarted worker) sees the very same batches
    wb2 = WorkerBatches(LocalShard(spheres_dir, spec, 1, 2), spec, rank=1, world_size=2, train=True)
    assert same(collect(wb2, 1), e1)
    b = e0[0]
    assert b["image"].shape == (8, 3, 16, 16) and b["image"].dtype == torch.float32
    assert b["label"].dtype == torch.int64 and b["scene"].shape == (8, 3, 10) and b["scene_mask"].dtype == torch.bool
    # another seed gives another order
    other = WorkerBatches(LocalShard(spheres_dir, spec, 1, 2), spec.model_copy(update={"seed": 8}),
                          rank=1, world_size=2, train=True)
    assert not same(collect(other, 0), e0)


def test_skip_resumes_exactly_where_an_uninterrupted_epoch_was(spheres_dir):
    spec = spec_for(spheres_dir, augment={"hflip": True, "vflip": True, "shift": 3, "crop": 12})
    wb = WorkerBatches(LocalShard(spheres_dir, spec, 0, 1), spec, rank=0, world_size=1, train=True)
    full = collect(wb, 3)
    assert len(full) == wb.steps_per_epoch == 12
    for k in (1, 5, 11, 12):
        assert same(collect(wb, 3, skip=k), full[k:])
    assert full[0]["image"].shape == (8, 3, 12, 12)


def test_augmentation_changes_pixels_but_not_content(spheres_dir):
    plain = spec_for(spheres_dir, augment={}, shuffle_buffer=0)
    flips = spec_for(spheres_dir, augment={"hflip": True, "vflip": True}, shuffle_buffer=0)
    a = collect(WorkerBatches(LocalShard(spheres_dir, plain, 0, 1), plain, rank=0, world_size=1, train=True), 0)
    b = collect(WorkerBatches(LocalShard(spheres_dir, flips, 0, 1), flips, rank=0, world_size=1, train=True), 0)
    assert torch.cat([x["index"] for x in a]).tolist() == list(range(96))      # no shuffle: stream order
    changed = 0
    for x, y in zip(a, b):
        for img, aug in zip(x["image"], y["image"]):
            variants = [img, img.flip(-1), img.flip(-2), img.flip(-1).flip(-2)]
            assert any(torch.equal(aug, v) for v in variants)
            changed += not torch.equal(aug, img)
    assert changed > 20


def test_validation_keeps_order_and_the_last_batch_and_centre_crops(spheres_dir):
    spec = spec_for(spheres_dir, batch_size=4, augment={"crop": 10, "hflip": True})
    shard = LocalShard(spheres_dir, spec, 0, 1, split="val")
    wb = WorkerBatches(shard, spec, rank=0, world_size=1, train=False)
    batches = collect(wb, 0)
    assert read_manifest(spheres_dir).counts["val"] == 11
    assert [len(b["index"]) for b in batches] == [4, 4, 3] and wb.steps_per_epoch == 3
    assert torch.cat([b["index"] for b in batches]).tolist() == list(range(11))
    ref = load_split_images(spheres_dir, "val", spec)
    assert torch.equal(torch.cat([b["image"] for b in batches]), ref["image"])     # plain loader agrees
    assert batches[0]["image"].shape[-1] == 10


def test_corrupt_records_are_skipped_counted_logged_and_topped_up(spheres_dir, tmp_path, caplog):
    bad = tmp_path / "bad"
    plant_bad_records(spheres_dir, bad, corrupt=[3, 40, 77], wrong_size=[10])
    spec = spec_for(bad, bad_size_policy="reject")
    caplog.set_level(logging.WARNING, logger="raygen.data")
    wb = WorkerBatches(LocalShard(bad, spec, 0, 1), spec, rank=0, world_size=1, train=True)
    batches = collect(wb, 0)
    assert wb.corrupt_count == 4 and sorted(wb.bad_records) == [3, 10, 40, 77]
    assert len(batches) == wb.steps_per_epoch == 12                 # topped up: ranks stay in step
    seen = torch.cat([b["index"] for b in batches]).tolist()
    assert set(seen) == set(range(96)) - {3, 10, 40, 77}            # every good image, no bad one
    m = read_manifest(bad)
    shard_of_40 = next(s for s in m.splits["train"].shards if s.first_index <= 40 < s.first_index + s.rows)
    assert f"{shard_of_40.file} row {40 - shard_of_40.first_index}" in caplog.text
    collect(wb, 1)
    assert wb.corrupt_count == 4                                    # distinct records, not per epoch
    # bad_size_policy=resize keeps the odd-sized image, resized
    spec2 = spec_for(bad, bad_size_policy="resize", augment={}, shuffle_buffer=0)
    wb2 = WorkerBatches(LocalShard(bad, spec2, 0, 1), spec2, rank=0, world_size=1, train=False)
    rows = {int(i): img for b in collect(wb2, 0) for i, img in zip(b["index"], b["image"])}
    assert wb2.corrupt_count == 3 and wb2.resized_count == 1 and 10 in rows
    assert torch.allclose(rows[10], torch.full((3, 16, 16), 128 / 255))
    # the plain loader skips the same records
    assert load_split_images(bad, "train", spec)["corrupt_count"] == 4


def test_a_shard_with_only_bad_records_stops_with_a_clear_error(spheres_dir, tmp_path):
    bad = tmp_path / "allbad"
    plant_bad_records(spheres_dir, bad, corrupt=list(range(96)), wrong_size=[])
    spec = spec_for(bad)
    wb = WorkerBatches(LocalShard(bad, spec, 0, 1), spec, rank=0, world_size=1, train=True)
    with pytest.raises(DataError, match="no decodable images"):
        collect(wb, 0)


def test_batch_larger_than_a_rank_shard_is_rejected(spheres_dir):
    spec = spec_for(spheres_dir, batch_size=64)
    with pytest.raises(DataError, match="data.batch_size: 64 is larger than the 48 training rows"):
        WorkerBatches(LocalShard(spheres_dir, spec, 0, 2), spec, rank=0, world_size=2, train=True)


# ---------------------------------------------------------------- slow: real Ray Data and Ray Train
@pytest.mark.slow
def test_ray_pipeline_splits_deterministically_and_matches_the_plain_loader(ray_session, spheres_dir):
    from raygen.data import build_datasets, make_data_config
    spec = spec_for(spheres_dir)
    dss = build_datasets(spheres_dir, spec)
    assert set(dss) == {"train", "val"}
    shards = make_data_config(spec).configure(dss, world_size=2, worker_handles=None, worker_node_ids=None)
    assert [s["train"].meta.rows for s in shards] == [48, 48]
    ranks = []
    for rank in range(2):
        wb = WorkerBatches(shards[rank]["train"], spec, rank=rank, world_size=2, train=True)
        e0 = collect(wb, 0)
        assert same(e0, collect(wb, 0))
        if rank == 0:
            assert not same(e0, collect(wb, 1))
            assert same(collect(wb, 0, skip=2), e0[2:])
        ranks.append(set(torch.cat([b["index"] for b in e0]).tolist()))
    assert ranks[0] == set(range(48)) and ranks[1] == set(range(48, 96))
    # validation through Ray == load_split_images (same decode, same order)
    val = WorkerBatches(make_data_config(spec).configure({"val": dss["val"]}, 1)[0]["val"], spec,
                        rank=0, world_size=1, train=False)
    got = torch.cat([b["image"] for b in collect(val, 0)])
    assert torch.equal(got, load_split_images(spheres_dir, "val", spec)["image"])


@pytest.mark.slow
def test_ray_pipeline_counts_planted_corrupt_records(ray_session, spheres_dir, tmp_path):
    from raygen.data import build_datasets, make_data_config
    bad = tmp_path / "bad"
    plant_bad_records(spheres_dir, bad, corrupt=[5, 60], wrong_size=[])
    spec = spec_for(bad, augment={})
    shards = make_data_config(spec).configure({"train": build_datasets(bad, spec)["train"]}, world_size=2)
    seen, counts = set(), []
    for rank in range(2):
        wb = WorkerBatches(shards[rank]["train"], spec, rank=rank, world_size=2, train=True)
        for b in wb.epoch(0):
            seen |= set(b["index"].tolist())
        counts.append(wb.corrupt_count)
        assert len(list(wb.epoch(0))) == wb.steps_per_epoch == 6
    assert counts == [1, 1] and seen == set(range(96)) - {5, 60}


@pytest.mark.slow
def test_torch_trainer_feeds_each_worker_its_own_deterministic_shard(ray_session, spheres_dir, tmp_path):
    import ray.train
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from raygen.data import build_datasets, make_data_config
    spec = spec_for(spheres_dir)

    def loop(config):
        import json
        ctx = ray.train.get_context()
        wb = WorkerBatches(ray.train.get_dataset_shard("train"), config["spec"], rank=ctx.get_world_rank(),
                           world_size=ctx.get_world_size(), train=True)
        first = [b["index"].tolist() for b in wb.epoch(0)]
        resumed = [b["index"].tolist() for b in wb.epoch(0, skip=3)]
        # Train V2 keeps metrics only with checkpoints: hand the result back through a file
        out = Path(config["out"]) / f"rank{ctx.get_world_rank()}.json"
        out.write_text(json.dumps({"first": first, "resumed": resumed, "corrupt": wb.corrupt_count,
                                   "shard": repr(ray.train.get_dataset_shard("train"))}))

    trainer = TorchTrainer(loop, train_loop_config={"spec": spec, "out": str(tmp_path)},
                           scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.5}),
                           datasets={"train": build_datasets(spheres_dir, spec)["train"]},
                           dataset_config=make_data_config(spec),
                           run_config=RunConfig(name="data-test", storage_path=str(tmp_path / "runs")))
    result = trainer.fit()
    assert result.error is None
    import json
    got = {r: json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)}
    for r in range(2):
        assert got[r]["shard"] == f"RankShard(train, rank {r}/2, 48 rows)"
        assert got[r]["corrupt"] == 0 and len(got[r]["first"]) == 6
        assert got[r]["resumed"] == got[r]["first"][3:]
        assert sorted(i for b in got[r]["first"] for i in b) == list(range(48 * r, 48 * (r + 1)))
    m = {"first": got[0]["first"]}
    # the same epoch outside Train, from the same recipe, is identical
    local = WorkerBatches(make_data_config(spec).configure(
        {"train": build_datasets(spheres_dir, spec)["train"]}, 2)[0]["train"], spec, rank=0, world_size=2, train=True)
    assert [b["index"].tolist() for b in local.epoch(0)] == m["first"]
