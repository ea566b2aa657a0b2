"""Latent datasets and the encode job, in-process (no Ray): the encode
plan, the per-batch parts and shard files, resume, worker-count
independence, the manifest, and reading latents back (local loader and
WorkerBatches). tests/test_encode_ray.py runs the same job through Ray Train."""
from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

import pipeline_toys  # noqa: F401  (registers toy_ae and toy_refiner)
from raygen.data import DataError, WorkerBatches, load_split_images, prepare_dataset, read_manifest
from raygen.data.latents import LatentParams, load_split_latents, plan_ranges
from raygen.spec.schema import DataSpec
from raygen.train.encode import prepare_encode, run_local

BATCH, SHARD_ROWS = 16, 48


def export_toy(folder: Path, family: str, data: dict, *, seed: int = 0, components: dict | None = None) -> Path:
    """A seeded, untrained model of `family`, exported as `raygen train` would."""
    from raygen.exports import export_generator
    from raygen.models import DataInfo, build_model
    from raygen.spec.loader import parse_spec
    spec = parse_spec({"model": {"family": family, "components": components or {}}, "data": data})
    info = DataInfo(channels=spec.data.channels, resolution=spec.data.resolution)
    comps = {}
    if components:
        from raygen.exports import load_exported
        comps = {k: load_exported(v).model for k, v in components.items()}
    torch.manual_seed(seed)
    model = build_model(family, spec.model.config, info, comps)
    return export_generator(folder, model.state_dict(), spec, info, meta={"note": "test"})


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("enc") / "digits"
    prepare_dataset("digits", out, count=200, seed=3)
    return out


@pytest.fixture(scope="module")
def ae(tmp_path_factory, digits) -> Path:
    return export_toy(tmp_path_factory.mktemp("ae") / "model", "toy_ae",
                      {"dataset": str(digits), "resolution": 8, "channels": 1})


def encode_local(ae: Path, data: Path, out: Path, *, world_size: int = 1, **kw):
    stop = kw.pop("stop_after_batches", None)
    job = prepare_encode(str(ae), str(data), out, batch_size=BATCH, shard_rows=SHARD_ROWS, **kw)
    return job, run_local(job, world_size=world_size, stop_after_batches=stop)


def files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def test_plan_is_whole_batches_and_ignores_workers():
    assert plan_ranges(200, 16, 128, shard_rows=48) == [[0, 48], [48, 96], [96, 144], [144, 192], [192, 200]]
    assert plan_ranges(100, 16, 128, shard_rows=20) == [[0, 32], [32, 64], [64, 96], [96, 100]]
    # default: about 8 shards of whole batches, fewer rows when a shard would pass the byte bound
    assert plan_ranges(1000, 64, 128) == [[0, 128], [128, 256], [256, 384], [384, 512], [512, 640], [640, 768],
                                          [768, 896], [896, 1000]]
    assert plan_ranges(1000, 10, 4000, max_bytes=40_000) == [[lo, lo + 10] for lo in range(0, 1000, 10)]


def test_latents_equal_model_encode_and_carry_the_source_columns(ae, digits, tmp_path):
    from raygen.exports import load_exported
    job, res = encode_local(ae, digits, tmp_path / "lat")
    assert res.finished and res.status == "encoded" and res.batches == job.plan.total_batches
    m = read_manifest(tmp_path / "lat")
    src = read_manifest(digits)
    assert m.kind == "latents" and m.latents.shape == [2, 4, 4] and m.latents.dtype == "float32"
    assert m.counts == src.counts and m.class_names == src.class_names and m.has_captions
    assert m.latents.encoder["family"] == "toy_ae" and len(m.latents.encoder["digest"]) == 64
    assert m.latents.source["name"] == "digits" and m.latents.source["path"] == str(digits.resolve())
    assert not (tmp_path / "lat" / ".encode").exists()            # progress folder gone once the manifest is there
    assert [s.file for s in m.splits["train"].shards] == [f"train-{k:05d}.parquet" for k in range(5)]
    assert [s.first_index for s in m.splits["train"].shards] == [0, 48, 96, 144, 192]
    m.verify()
    schema = pq.read_schema(tmp_path / "lat" / "train-00000.parquet")
    assert str(schema.field("latent").type) == "fixed_size_list<element: float>[32]"

    model = load_exported(ae).model
    spec = DataSpec(dataset=str(digits), resolution=8, channels=1)
    for split in ("train", "val"):
        src_rows = load_split_images(digits, split, spec)
        got = load_split_latents(tmp_path / "lat", split)
        assert "image" not in got and got["latent"].shape == (src.counts[split], 2, 4, 4)
        assert torch.equal(got["index"], src_rows["index"]) and torch.equal(got["label"], src_rows["label"])
        assert got["caption"] == src_rows["caption"]
        threads = torch.get_num_threads()
        torch.set_num_threads(job.plan.threads)  # the plan's (1): small batches may round otherwise with more
        try:
            with torch.no_grad():  # the job's batches: the plan's, [lo, lo + 16) within each shard of 48
                expected = torch.cat([model.encode(src_rows["image"][i:i + BATCH])
                                      for i in range(0, src.counts[split], BATCH)])
                whole = model.encode(src_rows["image"])
        finally:
            torch.set_num_threads(threads)
        assert torch.equal(got["latent"], expected)
        torch.testing.assert_close(got["latent"], whole)
    # the local loader reads a latent dataset too
    assert torch.equal(load_split_images(tmp_path / "lat", "val", spec)["latent"], got["latent"])
    # the model's view of a latent dataset: the latent map
    info = m.data_info(spec)
    assert (info.channels, info.height, info.width, info.num_classes) == (2, 4, 4, 10)


def test_same_bytes_whatever_the_worker_count_and_float16(ae, digits, tmp_path):
    _, one = encode_local(ae, digits, tmp_path / "w1", world_size=1)
    _, three = encode_local(ae, digits, tmp_path / "w3", world_size=3)
    assert one.finished and three.finished
    assert files(tmp_path / "w1") == files(tmp_path / "w3")      # shards and manifest, byte for byte
    _, half = encode_local(ae, digits, tmp_path / "f16", dtype="float16")
    m = read_manifest(tmp_path / "f16")
    assert m.latents.dtype == "float16" and half.digest != one.digest
    assert str(pq.read_schema(tmp_path / "f16" / "train-00000.parquet").field("latent").type) == \
        "fixed_size_list<element: halffloat>[32]"
    full = load_split_latents(tmp_path / "w1", "train")["latent"]
    assert torch.equal(load_split_latents(tmp_path / "f16", "train")["latent"], full.half().float())


def test_data_show_summarises_a_latent_dataset(ae, digits, tmp_path, capfd):
    from raygen.jobs.cli import main
    encode_local(ae, digits, tmp_path / "lat", dtype="float16")
    assert main(["data", "show", str(tmp_path / "lat"), "--verify"]) == 0
    out = capfd.readouterr().out
    assert "latents: 2x4x4 float16 per image (of 8x8x1), encoded by toy_ae" in out and "from digits" in out
    assert "splits: train 200 (5 shard(s)" in out and "checksums: ok" in out
    assert main(["data", "show", str(tmp_path / "lat"), "--grid", str(tmp_path / "g.png")]) == 2
    assert "is a latent dataset: it holds no images to show" in capfd.readouterr().err


def test_an_interrupted_encode_resumes_without_redoing_finished_shards(ae, digits, tmp_path):
    _, whole = encode_local(ae, digits, tmp_path / "whole")
    out = tmp_path / "lat"
    # two workers, each stopping after 4 batches: rank 0 completes shard 0 (3 batches) and starts shard 2
    job, first = encode_local(ae, digits, out, world_size=2, stop_after_batches=4)
    assert not first.finished and first.status == "stopped" and first.batches == 8
    assert first.progress["shards_done"] == 2 and first.progress["batches_done"] == 8
    with pytest.raises(DataError, match="has no manifest.json"):
        read_manifest(out)
    done = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.glob("*.parquet")}
    assert sorted(done) == ["train-00000.parquet", "train-00001.parquet"]
    parts = sorted(p.relative_to(out / ".encode").as_posix() for p in (out / ".encode" / "parts").rglob("*.arrow"))
    assert parts == ["parts/train-00002/00000.arrow", "parts/train-00003/00000.arrow"]

    # a rerun (here with three workers) encodes only what is missing, and gives the same bytes
    job2, second = encode_local(ae, digits, out, world_size=3)
    assert job2.state == "resume" and second.finished and second.status == "resumed"
    assert second.batches == job.plan.total_batches - 8
    assert files(out) == files(tmp_path / "whole")
    assert {n: (out / n).stat().st_ino for n in done} == {n: ino for n, (ino, _) in done.items()}
    assert all((out / n).stat().st_mtime_ns == t for n, (_, t) in done.items())
    # and once complete, the same request does nothing
    job3, third = encode_local(ae, digits, out)
    assert job3.state == "complete" and third.finished and third.batches == 0 and third.digest == whole.digest


def test_another_model_or_dataset_starts_over_and_foreign_folders_are_refused(ae, digits, tmp_path):
    out = tmp_path / "lat"
    encode_local(ae, digits, out, stop_after_batches=2)
    other = export_toy(tmp_path / "other", "toy_ae", {"dataset": str(digits), "resolution": 8, "channels": 1}, seed=1)
    job, res = encode_local(other, digits, out)
    assert job.state == "new" and res.finished
    from raygen.train.encode import export_digest
    assert read_manifest(out).latents.encoder["digest"] == export_digest(other) != export_digest(ae)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="holds files that are not a raygen dataset"):
        prepare_encode(str(ae), str(digits), foreign)
    with pytest.raises(DataError, match="already a latent dataset"):
        prepare_encode(str(ae), str(out), tmp_path / "twice")
    assert (foreign / "notes.txt").read_text() == "mine"


def test_extra_columns_are_carried_over(tmp_path):
    spheres = tmp_path / "spheres"
    prepare_dataset("spheres", spheres, count=40, resolution=16, max_spheres=3, shard_bytes=12_000)
    ae = export_toy(tmp_path / "ae3", "toy_ae", {"dataset": str(spheres), "resolution": 16, "channels": 3})
    job, res = encode_local(ae, spheres, tmp_path / "lat", world_size=2)
    assert res.finished
    m = read_manifest(tmp_path / "lat")
    assert m.extra_columns == read_manifest(spheres).extra_columns and m.latents.shape == [2, 8, 8]
    src = load_split_images(spheres, "train", DataSpec(dataset=str(spheres), resolution=16, channels=3))
    got = load_split_latents(tmp_path / "lat", "train")
    for name in ("scene", "scene_mask", "scene_globals", "index", "label"):
        assert torch.equal(got[name], src[name]), name


class LatentShard:
    """What the Ray pipeline hands a worker of a latent dataset, computed in-process."""

    def __init__(self, dir: Path, rank: int, world_size: int, split: str = "train"):
        from raygen.data.pipeline import ShardMeta
        m = read_manifest(dir)
        self.params = LatentParams.for_manifest(m)
        n = m.counts[split] // world_size
        self.lo, self.hi = rank * n, (rank + 1) * n
        self.paths = m.shard_paths(split)
        self.meta = ShardMeta(split=split, rank=rank, world_size=world_size, rows=n,
                              shards=[(s.first_index, s.file) for s in m.split(split).shards],
                              extra_columns=dict(m.extra_columns))

    def iter_batches(self, *, batch_size, batch_format, prefetch_batches, drop_last):
        import pyarrow as pa
        for p in self.paths:
            t = pq.read_table(p, columns=self.params.read_columns)
            idx = t.column("index").to_numpy()
            t = t.filter(pa.array((idx >= self.lo) & (idx < self.hi)))
            if len(t):
                cols = self.params.decode(t)
                for i in range(0, len(t), batch_size):
                    yield {k: v[i:i + batch_size] for k, v in cols.items()}


def test_worker_batches_stream_latents(ae, digits, tmp_path):
    encode_local(ae, digits, tmp_path / "lat")
    every = load_split_latents(tmp_path / "lat", "train")
    spec = DataSpec(dataset=str(tmp_path / "lat"), batch_size=8, shuffle_buffer=32, seed=5)
    wb = WorkerBatches(LatentShard(tmp_path / "lat", 1, 2), spec, rank=1, world_size=2, train=True)
    batches = list(wb.epoch(0))
    assert len(batches) == wb.steps_per_epoch == 100 // 8
    b = batches[0]
    assert "image" not in b and b["latent"].shape == (8, 2, 4, 4) and b["latent"].dtype == torch.float32
    for b in batches:
        assert torch.equal(b["latent"], every["latent"][b["index"]])
        assert torch.equal(b["label"], every["label"][b["index"]])
    seen = torch.cat([b["index"] for b in batches])
    assert len(set(seen.tolist())) == len(seen) and set(seen.tolist()) <= set(range(100, 200))
    assert [torch.equal(x["latent"], y["latent"]) for x, y in zip(list(wb.epoch(0, skip=3)), batches[3:])] == \
        [True] * (len(batches) - 3)
    val = list(WorkerBatches(LatentShard(tmp_path / "lat", 0, 1, "val"), spec, rank=0, world_size=1,
                             train=False).epoch(0))
    assert torch.equal(torch.cat([b["latent"] for b in val]), load_split_latents(tmp_path / "lat", "val")["latent"])
    with pytest.raises(DataError, match="data.augment.hflip: .* is a latent dataset"):
        from raygen.data.latents import check_latent_spec
        check_latent_spec(read_manifest(tmp_path / "lat"),
                          DataSpec(dataset=str(tmp_path / "lat"), augment={"hflip": True}))


def test_encode_asks_for_the_encode_capability(ae, digits, tmp_path, capfd):
    from raygen.jobs.cli import main
    refiner = export_toy(tmp_path / "refiner", "toy_refiner", {"dataset": str(digits), "resolution": 8},
                         components={"base": str(ae)})
    assert main(["data", "encode", str(refiner), str(digits), "--out", str(tmp_path / "lat")]) == 2
    err = capfd.readouterr().err
    assert err.count("\n") == 1
    assert "cannot encode and decode images: it lacks capability 'encode'" in err and "toy_ae" in err
    assert not (tmp_path / "lat").exists()


# ---------------------------------------------------------------- the pipeline stage kind (validation only)
def encode_pipeline(folder: Path, encode: dict, consumer_data: str = "${stages.latents.data}",
                    ae_family: str = "toy_ae") -> Path:
    import yaml
    stage = {"data": {"dataset": "digits", "resolution": 8, "batch_size": 16, "root": str(folder / "data")},
             "train": {"steps": 2, "log_every": 1, "ema": {"enabled": False}},
             "scale": {"workers": 1}, "track": {"fid": {"enabled": False}, "register_model": False}}
    ae = {**stage, "model": {"family": ae_family}}
    if ae_family == "toy_refiner":
        ae["model"]["components"] = {"base": "somewhere"}
    consumer = {**stage, "data": {**stage["data"], "dataset": consumer_data}, "model": {"family": "toy_ae"}}
    raw = {"name": "cascade", "run_dir": str(folder / "runs"),
           "stages": {"ae": {"spec": ae}, "latents": {"encode": encode}, "next": {"spec": consumer}}}
    path = folder / "pipeline.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def test_an_encode_stage_in_a_pipeline_spec(tmp_path, capfd):
    from raygen.jobs.cli import main
    from raygen.spec.errors import SpecError
    from raygen.spec.pipeline import EncodeStageSpec, load_pipeline, validate_pipeline

    path = encode_pipeline(tmp_path, {"model": "${stages.ae.model}", "data": "digits", "dtype": "float16"})
    specs = validate_pipeline(*load_pipeline(path))
    assert isinstance(specs["latents"], EncodeStageSpec)
    assert specs["latents"].model == "<model of stage ae>" and specs["latents"].dtype == "float16"
    assert specs["next"].data.dataset == "<data of stage latents>"
    assert main(["spec", "validate", str(path)]) == 0
    assert "pipeline of 3 stage(s): ae (toy_ae), latents (encode), next (toy_ae)" in capfd.readouterr().out

    with pytest.raises(SpecError, match=r"stages.next: \$\{stages.latents.model\}: stage latents is an encode "
                                        r"stage: it gives a dataset, \$\{stages.latents.data\}"):
        validate_pipeline(*load_pipeline(encode_pipeline(tmp_path, {"model": "${stages.ae.model}", "data": "digits"},
                                                         consumer_data="${stages.latents.model}")))
    with pytest.raises(SpecError, match=r"stages.latents: \$\{stages.ae.data\}: stage ae is a training stage"):
        validate_pipeline(*load_pipeline(encode_pipeline(tmp_path, {"model": "${stages.ae.data}", "data": "digits"})))
    with pytest.raises(SpecError, match=r"stages.latents: \$\{stages.next.model\} refers to a stage .*only earlier"):
        validate_pipeline(*load_pipeline(encode_pipeline(tmp_path, {"model": "${stages.next.model}", "data": "x"})))
    with pytest.raises(SpecError, match="stages.latents.encode.model: stage ae trains a toy_refiner model, which "
                                        "cannot encode"):
        validate_pipeline(*load_pipeline(encode_pipeline(tmp_path, {"model": "${stages.ae.model}", "data": "digits"},
                                                         ae_family="toy_refiner")))
    with pytest.raises(SpecError, match="stages.latents: .*either `spec` .* or `encode` .*, not both"):
        load_pipeline(encode_pipeline(tmp_path, {"model": "m", "data": "d"}), ["stages.latents.spec=ae.yaml"])
    with pytest.raises(SpecError, match="dtype"):
        load_pipeline(encode_pipeline(tmp_path, {"model": "m", "data": "d", "dtype": "float64"}))


def test_undecodable_source_images_are_left_out_and_counted(ae, digits, tmp_path):
    import shutil

    import pyarrow as pa
    src = tmp_path / "damaged"
    shutil.copytree(digits, src)
    shard = src / "train-00000.parquet"
    t = pq.read_table(shard)
    png = t.column("png").to_pylist()
    png[50] = png[50][:30] + b"\0" * 20                      # record 50: a truncated PNG
    pq.write_table(t.set_column(t.column_names.index("png"), "png", pa.array(png, pa.binary())), shard)
    job, res = encode_local(ae, src, tmp_path / "lat")
    assert res.finished
    m = read_manifest(tmp_path / "lat")
    assert m.splits["train"].rows == 199 and m.splits["train"].skipped == 1 and m.splits["val"].skipped == 0
    assert [s.rows for s in m.splits["train"].shards] == [48, 47, 48, 48, 8]
    assert [s.first_index for s in m.splits["train"].shards] == [0, 48, 95, 143, 191]
    got = load_split_latents(tmp_path / "lat", "train")
    assert got["index"].tolist() == [i for i in range(200) if i != 50]
    clean = load_split_latents(encode_local(ae, digits, tmp_path / "clean")[1].out, "train")
    keep = torch.tensor([i != 50 for i in range(200)])
    assert torch.equal(got["latent"][:48], clean["latent"][:48])   # shards without the bad record: unchanged
    assert torch.equal(got["label"], clean["label"][keep])
