"""Non-square images through the data layer: spec sizes, prepare (aspect
kept by centre-cropping), manifest height/width (old square manifests still
read), the plain loader, WorkerBatches crops, DataInfo and the Ray pipeline."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from raygen.data import DataError, WorkerBatches, ensure_dataset, load_split_images, prepare_dataset, read_manifest
from raygen.data.images import decode_image
from raygen.data.manifest import MANIFEST_NAME
from raygen.spec.schema import AugmentSpec, DataSpec

RED, BLUE, GREEN = (255, 0, 0), (0, 0, 255), (0, 255, 0)


def _write(path: Path, w: int, h: int, stripes: list[tuple[int, tuple]]) -> None:
    """An RGB image w wide and h high, filled column band by column band:
    stripes = [(band width, colour), ...] from left to right."""
    img = np.zeros((h, w, 3), np.uint8)
    x = 0
    for width, colour in stripes:
        img[:, x:x + width] = colour
        x += width
    assert x == w
    Image.fromarray(img).save(path)


@pytest.fixture(scope="module")
def wide_folder(tmp_path_factory) -> Path:
    """Images of two shapes: 40x24 (exactly the 5:3 aspect of 12x20, left
    half red, right half blue) and 60x24 (wider: 10 green columns at each
    end that a centre crop to 5:3 cuts off; a squash would keep them)."""
    src = tmp_path_factory.mktemp("wide") / "imgs"
    (src / "a").mkdir(parents=True)
    (src / "b").mkdir()
    for i in range(6):
        _write(src / "a" / f"{i}.png", 40, 24, [(20, RED), (20, BLUE)])
        _write(src / "b" / f"{i}.png", 60, 24, [(10, GREEN), (20, RED), (20, BLUE), (10, GREEN)])
    return src


@pytest.fixture(scope="module")
def wide_dir(wide_folder, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wide-ds") / "ds"
    prepare_dataset(str(wide_folder), out, resolution=[12, 20], channels=3)
    return out


def test_spec_sizes_are_one_number_or_height_width():
    assert DataSpec(resolution=[12, 20]).resolution == [12, 20]
    assert DataSpec(resolution=[16, 16]).resolution == 16           # a square pair is one number
    assert DataSpec().resolution == 16 and AugmentSpec(crop=[8, 16]).crop == [8, 16]
    for bad, why in ([12], "height, width"), ([12, 20, 3], "height, width"), ([2, 20], "between 4 and 1024"), \
                    (True, "whole number"):
        with pytest.raises(ValueError, match=why):
            DataSpec(resolution=bad)
    with pytest.raises(ValueError, match="at least 1"):
        AugmentSpec(crop=[0, 4])


def test_prepare_keeps_the_aspect_and_stores_height_and_width(wide_dir):
    m = read_manifest(wide_dir, verify=True)
    assert (m.height, m.width, m.size, m.resolution) == (12, 20, (12, 20), [12, 20])
    raw = json.loads((wide_dir / MANIFEST_NAME).read_text())
    assert (raw["height"], raw["width"], raw["resolution"]) == (12, 20, [12, 20])
    assert raw["prepare"]["resolution"] == [12, 20]
    seen = {0: 0, 1: 0}
    for split in m.splits:
        for p in m.shard_paths(split):
            t = pq.read_table(p, columns=["png", "label"])
            for png, label in zip(t.column("png").to_pylist(), t.column("label").to_pylist()):
                img = np.asarray(decode_image(png).convert("RGB")).astype(int)
                assert img.shape == (12, 20, 3)                        # exactly H x W
                # both sources end up red on the left, blue on the right: the
                # wide one was centre-cropped to 5:3 (its green ends are gone)
                # (LANCZOS rings a little next to the red/blue edge)
                assert np.abs(img[:, :9] - RED).max() <= 8 and np.abs(img[:, 11:] - BLUE).max() <= 8, label
                assert not (img[..., 1] > 32).any()                     # no green: cropped, not squashed
                seen[label] += 1
    assert seen[0] == seen[1] == 6


def test_plain_loader_delivers_height_by_width_and_crops(wide_dir):
    out = load_split_images(wide_dir, "train", DataSpec(dataset=str(wide_dir), resolution=[12, 20], channels=3))
    n = read_manifest(wide_dir).counts["train"]
    assert out["image"].shape == (n, 3, 12, 20)
    # a resize to another non-square size, and a centre crop of [8, 16] for validation
    spec = DataSpec(dataset=str(wide_dir), resolution=[6, 10], channels=1, augment={"crop": [4, 8]})
    assert load_split_images(wide_dir, "train", spec)["image"].shape == (n, 1, 4, 8)
    crop = load_split_images(wide_dir, "val", DataSpec(dataset="x", resolution=[12, 20], channels=3,
                                                       augment={"crop": [8, 16]}))
    full = load_split_images(wide_dir, "val", DataSpec(dataset="x", resolution=[12, 20], channels=3))
    assert crop["image"].shape[1:] == (3, 8, 16) and torch.equal(crop["image"], full["image"][:, :, 2:10, 2:18])
    with pytest.raises(DataError, match=r"data.augment.crop: \[8, 24\] is larger than data.resolution"):
        load_split_images(wide_dir, "val", DataSpec(dataset="x", resolution=[12, 20], augment={"crop": [8, 24]}))
    with pytest.raises(DataError, match="data.augment.shift: 12 must be smaller"):
        load_split_images(wide_dir, "val", DataSpec(dataset="x", resolution=[12, 20], augment={"shift": 12}))


def test_worker_batches_random_crop_height_by_width(wide_dir):
    from test_data_pipeline import LocalShard  # the in-process stand-in for a Ray shard
    spec = DataSpec(dataset=str(wide_dir), resolution=[12, 20], channels=3, batch_size=4, shuffle_buffer=8,
                    augment={"hflip": True, "shift": 2, "crop": [8, 16]})
    wb = WorkerBatches(LocalShard(wide_dir, spec, 0, 1), spec, rank=0, world_size=1, train=True)
    batches = list(wb.epoch(0))
    assert len(batches) == wb.steps_per_epoch > 0
    assert all(b["image"].shape == (4, 3, 8, 16) for b in batches)
    assert [torch.equal(a["image"], b["image"]) for a, b in zip(batches, wb.epoch(0))] == [True] * len(batches)
    info = read_manifest(wide_dir).data_info(spec)
    assert (info.height, info.width, info.resolution, info.shape) == (8, 16, None, (3, 8, 16))
    info = read_manifest(wide_dir).data_info(spec.model_copy(update={"augment": AugmentSpec()}))
    assert (info.height, info.width, info.resolution) == (12, 20, None)


def test_a_non_square_spec_imports_a_folder_through_ensure_dataset(wide_folder, tmp_path):
    spec = DataSpec(dataset=str(wide_folder), root=str(tmp_path / "root"), resolution=[12, 20], channels=3)
    target = ensure_dataset(spec)
    assert read_manifest(target).size == (12, 20) and ensure_dataset(spec) == target
    square = ensure_dataset(spec.model_copy(update={"resolution": 12}))
    assert square != target and read_manifest(square).size == (12, 12)


def test_old_square_manifests_without_height_and_width_still_read(wide_dir, tmp_path):
    import shutil
    old = tmp_path / "old"
    shutil.copytree(wide_dir, old)
    raw = json.loads((old / MANIFEST_NAME).read_text())
    for k in ("height", "width"):
        raw.pop(k)
    raw["resolution"] = 12
    (old / MANIFEST_NAME).write_text(json.dumps(raw))
    m = read_manifest(old)
    assert (m.height, m.width, m.resolution) == (12, 12, 12)


def test_show_describes_non_square_images_and_writes_a_grid(wide_dir, tmp_path):
    from raygen.data.inspect import summarize, write_grid
    assert "images: 12x20 (HxW), 3 channel(s)" in summarize(wide_dir)
    n = write_grid(wide_dir, tmp_path / "grid.png", n=4)
    assert n == 4
    w, h = Image.open(tmp_path / "grid.png").size
    assert w > h                                                       # four wide cells in a row


def test_spheres_data_info_lists_the_scene_columns(tmp_path):
    from raygen.data.sources.spheres import GLOBAL_FIELDS, SPHERE_FIELDS
    m = prepare_dataset("spheres", tmp_path / "s", count=8, resolution=16, max_spheres=3)
    info = m.data_info(DataSpec(dataset=str(tmp_path / "s"), resolution=16, channels=3))
    assert (info.height, info.width, info.resolution) == (16, 16, 16)
    scene, glob = info.condition_columns["scene"], info.condition_columns["scene_globals"]
    assert scene["kind"] == "sequence" and scene["fields"] == SPHERE_FIELDS and scene["max_len"] == 3
    assert scene["width"] == len(SPHERE_FIELDS) and isinstance(scene, dict)
    assert glob["kind"] == "vector" and glob["fields"] == GLOBAL_FIELDS
    # DataInfo round-trips with its columns (it is stored beside a model's weights)
    from raygen.models.base import DataInfo
    assert DataInfo.from_dict(json.loads(json.dumps(info.to_dict()))) == info


def test_generated_sources_widen_the_view_for_non_square_sizes(tmp_path):
    """Spheres and shapes render a non-square image as the square one with
    more of the scene beside it (same field of view on the shorter side)."""
    from raygen.data.sources.shapes import draw_shapes, random_shapes
    from raygen.data.sources.spheres import random_scene, render_spheres
    scene = random_scene(np.random.default_rng(3), 3)
    wide, square = render_spheres(scene, (12, 20)).astype(int), render_spheres(scene, 12).astype(int)
    assert wide.shape == (12, 20, 3) and np.abs(wide[:, 4:16] - square).max() <= 1
    tall = render_spheres(scene, (20, 12)).astype(int)
    assert tall.shape == (20, 12, 3) and np.abs(tall[4:16] - square).max() <= 1
    params, _ = random_shapes(np.random.default_rng(5), 2)
    wide, square = draw_shapes(params, (16, 24)).astype(int), draw_shapes(params, 16).astype(int)
    assert np.abs(wide[:, 4:20] - square).max() <= 1 and not wide[:, :4].any() and not wide[:, 20:].any()
    m = prepare_dataset("spheres", tmp_path / "s", count=4, resolution=[12, 20], max_spheres=2)
    assert m.size == (12, 20) and m.prepare["resolution"] == [12, 20]


@pytest.mark.slow
def test_ray_pipeline_delivers_height_by_width(ray_session, wide_dir):
    from raygen.data import build_datasets, make_data_config
    spec = DataSpec(dataset=str(wide_dir), resolution=[12, 20], channels=3, batch_size=4, shuffle_buffer=8,
                    augment={"crop": [8, 16]})
    dss = build_datasets(wide_dir, spec)
    shards = make_data_config(spec).configure(dss, world_size=1, worker_handles=None, worker_node_ids=None)[0]
    train = list(WorkerBatches(shards["train"], spec, rank=0, world_size=1, train=True).epoch(0))
    assert train and all(b["image"].shape == (4, 3, 8, 16) for b in train)
    val = WorkerBatches(shards["val"], spec, rank=0, world_size=1, train=False)
    got = torch.cat([b["image"] for b in val.epoch(0)])
    assert got.shape[1:] == (3, 8, 16) and torch.equal(got, load_split_images(wide_dir, "val", spec)["image"])
