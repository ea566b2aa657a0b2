"""Shards and manifest: checksums, size bounds, atomic writes, error
messages, ensure_dataset caching, the plain loader and the decoders (no Ray)."""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from raygen.data import DataError, ensure_dataset, load_split_images, prepare_dataset, read_manifest
from raygen.data.images import CORRUPT, OK, REJECTED_SIZE, RESIZED, decode_batch, encode_png
from raygen.data.manifest import MANIFEST_NAME
from raygen.spec.schema import DataSpec

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shapes") / "ds"
    prepare_dataset("shapes", out, count=120, resolution=20, shard_bytes=20_000)
    return out


def test_manifest_matches_the_shards(shapes_dir):
    m = read_manifest(shapes_dir, verify=True)
    assert m.schema_version == 1 and m.name == "shapes"
    assert m.counts == {"train": 120, "val": 13}
    assert m.has_captions and m.extra_columns["shapes"].kind == "sequence"
    on_disk = sorted(p.name for p in shapes_dir.glob("*.parquet"))
    assert on_disk == sorted(s.file for info in m.splits.values() for s in info.shards)
    assert len(m.splits["train"].shards) > 1                         # the size bound split it
    for split, info in m.splits.items():
        assert sum(s.rows for s in info.shards) == info.rows
        next_index = 0
        for s in info.shards:
            data = (shapes_dir / s.file).read_bytes()
            assert hashlib.sha256(data).hexdigest() == s.sha256 and len(data) == s.bytes
            t = pq.read_table(shapes_dir / s.file)
            assert t.column_names[:4] == ["index", "png", "label", "caption"] and "shapes" in t.column_names
            assert t.schema.field("label").type == "int64"
            assert t.column("index").to_pylist() == list(range(next_index, next_index + s.rows))
            assert s.first_index == next_index
            next_index += s.rows
            png_bytes = sum(len(b) for b in t.column("png").to_pylist())
            assert png_bytes <= 20_000                               # bound holds (PNG dominates)
    raw = json.loads((shapes_dir / MANIFEST_NAME).read_text())
    assert raw["counts"] == {"train": 120, "val": 13} and raw["resolution"] == 20 and raw["channels"] == 3


def test_verify_detects_a_changed_shard(shapes_dir, tmp_path):
    import shutil
    copy = tmp_path / "copy"
    shutil.copytree(shapes_dir, copy)
    victim = sorted(copy.glob("train-*.parquet"))[0]
    victim.write_bytes(victim.read_bytes()[:-10] + b"0123456789")
    read_manifest(copy)  # cheap read does not hash
    with pytest.raises(DataError, match="checksum does not match"):
        read_manifest(copy, verify=True)


def test_read_manifest_errors_are_one_line(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        read_manifest(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="has no manifest.json .*interrupted.*raygen data prepare"):
        read_manifest(tmp_path / "empty")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / MANIFEST_NAME).write_text("{ not json")
    with pytest.raises(DataError, match="unreadable manifest") as err:
        read_manifest(bad)
    assert "\n" not in str(err.value)
    prepare_dataset("spheres", tmp_path / "ok", count=4)
    m = json.loads((tmp_path / "ok" / MANIFEST_NAME).read_text())
    m["splits"]["train"].update(rows=0, shards=[])
    (tmp_path / "ok" / MANIFEST_NAME).write_text(json.dumps(m))
    with pytest.raises(DataError, match="no training images"):
        read_manifest(tmp_path / "ok")
    prepare_dataset("spheres", tmp_path / "ok2", count=4)
    (tmp_path / "ok2" / "train-00000.parquet").unlink()
    with pytest.raises(DataError, match="train-00000.parquet: shard listed in manifest.json is missing"):
        read_manifest(tmp_path / "ok2")


def test_prepare_refuses_a_folder_with_other_files(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(DataError, match="not a raygen dataset"):
        prepare_dataset("spheres", tmp_path / "mine", count=4)
    assert (tmp_path / "mine" / "notes.txt").exists()


def test_a_prepare_killed_midway_leaves_no_manifest(tmp_path):
    out = tmp_path / "ds"
    code = ("from raygen.data import prepare_dataset; "
            f"prepare_dataset('spheres', {str(out)!r}, count=5000, resolution=32, shard_bytes=4096)")
    env = {**os.environ, "RAYGEN_NO_PROGRESS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, cwd=REPO)
    try:
        deadline = time.time() + 60
        while len(list(out.glob("train-*.parquet"))) < 3:
            assert proc.poll() is None, "prepare finished before it could be interrupted"
            assert time.time() < deadline, "no shards appeared"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert not (out / MANIFEST_NAME).exists()
    with pytest.raises(DataError, match="interrupted"):
        read_manifest(out)
    for shard in out.glob("*.parquet"):
        if not shard.name.startswith(".tmp-"):
            assert pq.read_metadata(shard).num_rows > 0        # renamed shards are whole files
    # Preparing again into the same folder replaces the leftovers cleanly.
    m = prepare_dataset("spheres", out, count=30, resolution=16, shard_bytes=4096)
    listed = {s.file for info in m.splits.values() for s in info.shards}
    assert {p.name for p in out.iterdir()} == listed | {MANIFEST_NAME}
    read_manifest(out, verify=True)


def test_ensure_dataset_prepares_once_and_reuses(tmp_path, capsys):
    spec = DataSpec(dataset="spheres", root=str(tmp_path / "root"), resolution=16, channels=3, count=8)
    first = ensure_dataset(spec)
    assert "preparing spheres" in capsys.readouterr().err
    assert first.parent == tmp_path / "root" and first.name.startswith("spheres-")
    stamp = (first / MANIFEST_NAME).stat().st_mtime_ns
    again = ensure_dataset(spec)
    assert again == first and (first / MANIFEST_NAME).stat().st_mtime_ns == stamp
    assert capsys.readouterr().err == ""
    other = ensure_dataset(spec.model_copy(update={"seed": 1}))
    assert other != first
    assert [p.name for p in (tmp_path / "root").iterdir() if p.name.startswith(".tmp-")] == []
    # a prepared folder is used as is; an interrupted one (no manifest) is rebuilt
    assert ensure_dataset(spec.model_copy(update={"dataset": str(first)})) == first.resolve()
    (first / MANIFEST_NAME).unlink()
    assert ensure_dataset(spec) == first and (first / MANIFEST_NAME).exists()


def test_ensure_dataset_imports_paths_and_rejects_nonsense(tmp_path, shapes_dir):
    spec = DataSpec(dataset=str(shapes_dir / "train-*.parquet"), root=str(tmp_path / "root"), resolution=20,
                    channels=3)
    imported = ensure_dataset(spec)
    m = read_manifest(imported)
    assert m.name == "parquet" and m.counts["train"] + m.counts["val"] == 120
    assert imported.parent == tmp_path / "root" and ensure_dataset(spec) == imported
    with pytest.raises(DataError, match="neither a built-in dataset"):
        ensure_dataset(spec.model_copy(update={"dataset": str(tmp_path / "nothing-here")}))
    (tmp_path / "emptydir").mkdir()
    with pytest.raises(DataError, match="matches no files"):
        ensure_dataset(spec.model_copy(update={"dataset": str(tmp_path / "emptydir")}))


def test_load_split_images_resizes_converts_and_crops(shapes_dir):
    spec = DataSpec(dataset=str(shapes_dir), resolution=16, channels=1, augment={"crop": 12})
    out = load_split_images(shapes_dir, "val", spec)
    assert out["image"].shape == (13, 1, 12, 12) and str(out["image"].dtype) == "torch.float32"
    assert 0.0 <= float(out["image"].min()) and float(out["image"].max()) <= 1.0
    assert out["label"].tolist() == [-1] * 13 and len(out["caption"]) == 13 and out["corrupt_count"] == 0
    assert out["shapes"].shape[1:] == (2, 5) and out["shapes_mask"].any(1).all()
    full = load_split_images(shapes_dir, "train", DataSpec(dataset="x", resolution=20, channels=3), limit=5)
    assert full["image"].shape == (5, 3, 20, 20) and full["index"].tolist() == [0, 1, 2, 3, 4]
    with pytest.raises(DataError, match="data.augment.crop: 40 is larger than data.resolution 16"):
        load_split_images(shapes_dir, "val", DataSpec(dataset="x", resolution=16, augment={"crop": 40}))


def test_decode_batch_flags_corrupt_and_wrong_sized_images():
    good = encode_png(np.full((8, 8, 3), 200, np.uint8))
    small = encode_png(np.full((4, 4, 3), 100, np.uint8))
    blobs = [good, b"garbage", None, small, good[: len(good) // 2]]
    imgs, status, msgs = decode_batch(blobs, stored_resolution=8, resolution=8, channels=3, bad_size_policy="resize")
    assert status.tolist() == [OK, CORRUPT, CORRUPT, RESIZED, CORRUPT]
    assert imgs.shape == (5, 3, 8, 8) and (imgs[0] == 200).all() and (imgs[3] == 100).all() and (imgs[1] == 0).all()
    assert "4x4" in msgs[3] and msgs[1]
    _, status, _ = decode_batch(blobs, stored_resolution=8, resolution=4, channels=1, bad_size_policy="reject")
    assert status.tolist() == [OK, CORRUPT, CORRUPT, REJECTED_SIZE, CORRUPT]


def test_augmentations_are_exact_and_seeded():
    from raygen.data.augment import augment_batch, center_crop, random_crop, random_shift
    from raygen.spec.schema import AugmentSpec
    x = np.arange(2 * 1 * 6 * 6, dtype=np.uint8).reshape(2, 1, 6, 6) + 1
    rng = np.random.default_rng(5)
    dy, dx = rng.integers(-2, 3, size=2), rng.integers(-2, 3, size=2)
    shifted = random_shift(x, np.random.default_rng(5), 2)
    for b in range(2):
        expect = np.zeros((6, 6), np.uint8)
        for i in range(6):
            for j in range(6):
                si, sj = i - dy[b], j - dx[b]
                if 0 <= si < 6 and 0 <= sj < 6:
                    expect[i, j] = x[b, 0, si, sj]
        assert np.array_equal(shifted[b, 0], expect)
    crop = random_crop(x, np.random.default_rng(1), 4)
    rng = np.random.default_rng(1)
    oy, ox = rng.integers(0, 3, size=2), rng.integers(0, 3, size=2)
    for b in range(2):
        assert np.array_equal(crop[b], x[b, :, oy[b]:oy[b] + 4, ox[b]:ox[b] + 4])
    assert np.array_equal(center_crop(x, 4), x[:, :, 1:5, 1:5])
    aug = AugmentSpec(hflip=True, vflip=True, shift=1, crop=4)
    a = augment_batch(x, aug, np.random.default_rng(9))
    b = augment_batch(x, aug, np.random.default_rng(9))
    assert np.array_equal(a, b) and a.shape == (2, 1, 4, 4)
    flips = [augment_batch(x[:1], AugmentSpec(hflip=True), np.random.default_rng(s)) for s in range(8)]
    assert any(np.array_equal(f, x[:1, :, :, ::-1]) for f in flips) and any(np.array_equal(f, x[:1]) for f in flips)
