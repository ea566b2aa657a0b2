"""Built-in datasets and imports: determinism, content and split checks (no Ray)."""
from __future__ import annotations

import gzip
import io
import json
import re
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from raygen.data import DataError, prepare_dataset, read_manifest
from raygen.data.images import decode_image
from raygen.data.registry import builder_names, get_builder

FMNIST = Path("/usr/share/datasets/fashion-mnist")


def rows(dir: Path, split: str = "train") -> list[dict]:
    m = read_manifest(dir)
    return [r for p in m.shard_paths(split) for r in pq.read_table(p).to_pylist()]


def pixels(png: bytes) -> np.ndarray:
    return np.asarray(decode_image(png))


def test_registry_lists_every_builtin_and_rejects_unknown_names():
    assert {"fashion-mnist", "digits", "spheres", "kali", "shapes", "folder", "parquet", "webdataset"} <= set(
        builder_names())
    with pytest.raises(DataError, match="unknown dataset 'nope'.*spheres"):
        get_builder("nope")
    with pytest.raises(DataError, match="neither a built-in dataset"):
        prepare_dataset("nope", "/tmp/never-written")


def test_generation_is_deterministic_for_a_seed(tmp_path):
    a = prepare_dataset("spheres", tmp_path / "a", count=12, seed=3)
    b = prepare_dataset("spheres", tmp_path / "b", count=12, seed=3)
    c = prepare_dataset("spheres", tmp_path / "c", count=12, seed=4)
    sha = lambda m: [s.sha256 for info in m.splits.values() for s in info.shards]  # noqa: E731
    assert sha(a) == sha(b)
    assert (tmp_path / "a/manifest.json").read_bytes() == (tmp_path / "b/manifest.json").read_bytes()
    assert sha(a) != sha(c)
    # Record i does not depend on count: a longer run starts with the same images.
    d = prepare_dataset("spheres", tmp_path / "d", count=20, seed=3)
    assert [r["png"] for r in rows(tmp_path / "a")] == [r["png"] for r in rows(tmp_path / "d")][:12]
    assert d.counts == {"train": 20, "val": 2}


def test_spheres_scene_parameters_reproduce_the_stored_image(tmp_path):
    from raygen.data.sources.spheres import SPHERE_FIELDS, Scene, render_spheres
    m = prepare_dataset("spheres", tmp_path / "s", count=16, resolution=24, max_spheres=3)
    assert m.extra_columns["scene"].kind == "sequence" and m.extra_columns["scene"].width == len(SPHERE_FIELDS)
    recs = rows(tmp_path / "s")
    lengths = {len(r["scene"]) for r in recs}
    assert lengths <= {1, 2, 3} and len(lengths) > 1
    for r in recs:
        img = pixels(r["png"])
        assert img.shape == (24, 24, 3)
        assert np.array_equal(render_spheres(Scene.from_record(r), 24), img)
    # Moving a sphere changes the picture: the parameters really drive the render.
    scene = Scene.from_record(recs[0])
    scene.spheres[0, 0] += 0.5
    assert not np.array_equal(render_spheres(scene, 24), pixels(recs[0]["png"]))


def test_spheres_render_shading_has_highlights_and_background():
    from raygen.data.sources.spheres import Scene, render_spheres
    sphere = np.array([[0, 0, 4, 1.2, 0.8, 0.1, 0.1, 0.8, 0.8, 32]], np.float32)
    glob = np.array([0.0, 0.6, -0.8, 0.1, 0.3, 0.3, 0.3, 0.0, 0.0, 0.0], np.float32)
    img = render_spheres(Scene(sphere, glob), 32).astype(int)
    centre, corner = img[16, 16], img[0, 0]
    assert centre[0] > centre[1] + 40                 # red sphere in the middle
    assert img[..., 1].max() > 200                    # a white-ish specular highlight on a red sphere
    assert abs(corner[0] - corner[2]) < 3 and corner[0] > 60   # grey gradient background at the top


def test_shapes_caption_describes_what_is_drawn(tmp_path):
    from raygen.data.sources.shapes import COLOR_NAMES, COLORS, KINDS
    prepare_dataset("shapes", tmp_path / "sh", count=40, resolution=32)
    pattern = re.compile(r"^an? (\w+) (\w+)(?: (above|below|to the left of|to the right of) an? (\w+) (\w+))?$")
    relations_seen = set()
    for r in rows(tmp_path / "sh"):
        match = pattern.match(r["caption"])
        assert match, r["caption"]
        c0, k0, rel, c1, k1 = match.groups()
        shapes = np.asarray(r["shapes"])
        named = [(c0, k0)] + ([(c1, k1)] if rel else [])
        assert len(shapes) == len(named)
        img = pixels(r["png"]).astype(int)
        for (color, kind), (k, c, cx, cy, s) in zip(named, shapes):
            assert KINDS[int(k)] == kind and COLOR_NAMES[int(c)] == color
            # probe inside the shape (a triangle is widest towards its base)
            px, py = int(cx * 32), int((cy + (0.3 * s if kind == "triangle" else 0)) * 32)
            assert np.abs(img[py, px] - np.array(COLORS[color])).max() <= 2, (r["caption"], img[py, px])
        if rel:
            relations_seen.add(rel)
            (_, _, x0, y0, _), (_, _, x1, y1, _) = shapes
            expect = {"above": y0 < y1, "below": y0 > y1, "to the left of": x0 < x1, "to the right of": x0 > x1}
            assert expect[rel], r["caption"]
    assert len(relations_seen) >= 3


def test_kali_patches_are_cropped_renders_resized_to_the_resolution(tmp_path):
    m = prepare_dataset("kali", tmp_path / "k", count=10, resolution=16, patches_per_render=4)
    assert (m.resolution, m.channels) == (16, 3)
    imgs = [pixels(r["png"]) for r in rows(tmp_path / "k")]
    assert all(i.shape == (16, 16, 3) for i in imgs)
    assert all(i.std() > 3 for i in imgs)                          # no flat patches
    assert len({i.tobytes() for i in imgs}) == len(imgs)           # distinct crops
    prepare_dataset("kali", tmp_path / "k2", count=10, resolution=16, patches_per_render=4)
    assert [r["png"] for r in rows(tmp_path / "k")] == [r["png"] for r in rows(tmp_path / "k2")]


@pytest.mark.skipif(not FMNIST.is_dir(), reason="apt-get install dataset-fashion-mnist")
def test_fashion_mnist_images_labels_and_captions_come_from_the_idx_files(tmp_path):
    from raygen.data.sources.fashion_mnist import CAPTIONS, read_idx
    m = prepare_dataset("fashion-mnist", tmp_path / "f", count=300, val_fraction=0.25)
    assert m.counts == {"train": 300, "val": 100} and m.num_classes == 10 and m.has_captions
    src = read_idx(FMNIST / "train-images-idx3-ubyte.gz")
    src_labels = read_idx(FMNIST / "train-labels-idx1-ubyte.gz")
    by_bytes = {src[i].tobytes(): int(src_labels[i]) for i in range(len(src))}
    for r in rows(tmp_path / "f"):
        img = pixels(r["png"])
        assert by_bytes[img.tobytes()] == r["label"]              # the exact source image and its label
        assert r["caption"] == CAPTIONS[r["label"]]
    assert "a photo of a sneaker" in CAPTIONS


def test_fashion_mnist_missing_source_says_how_to_install(tmp_path):
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist"):
        prepare_dataset("fashion-mnist", tmp_path / "f", source=str(tmp_path / "nowhere"))


def test_fashion_mnist_source_override_reads_a_copy(tmp_path):
    if not FMNIST.is_dir():
        pytest.skip("apt-get install dataset-fashion-mnist")
    src = tmp_path / "src"
    src.mkdir()
    for name in ("train", "t10k"):
        imgs = np.random.default_rng(0).integers(0, 256, (30, 28, 28), dtype=np.uint8)
        labels = np.arange(30, dtype=np.uint8) % 10
        (src / f"{name}-images-idx3-ubyte.gz").write_bytes(
            gzip.compress(bytes([0, 0, 8, 3]) + (30).to_bytes(4, "big") + (28).to_bytes(4, "big") * 2 + imgs.tobytes()))
        (src / f"{name}-labels-idx1-ubyte").write_bytes(
            bytes([0, 0, 8, 1]) + (30).to_bytes(4, "big") + labels.tobytes())
    m = prepare_dataset("fashion-mnist", tmp_path / "f", source=str(src), resolution=14, channels=3)
    assert m.counts["train"] == 30 and (m.resolution, m.channels) == (14, 3)
    assert pixels(rows(tmp_path / "f")[0]["png"]).shape == (14, 14, 3)


def test_digits_split_sizes_and_captions(tmp_path):
    m = prepare_dataset("digits", tmp_path / "d", val_fraction=0.2, resolution=16)
    assert m.counts["train"] + m.counts["val"] == 1797
    assert abs(m.counts["val"] - round(1797 * 0.2)) <= 1
    recs = rows(tmp_path / "d")
    assert {r["label"] for r in recs} == set(range(10))
    words = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    assert all(r["caption"] == f"a handwritten digit {words[r['label']]}" for r in recs)
    small = prepare_dataset("digits", tmp_path / "d2", count=100, val_fraction=0.2)
    assert small.counts == {"train": 100, "val": 25}


def _png(arr: np.ndarray, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


def test_folder_import_classes_captions_and_skipped_corrupt_files(tmp_path, caplog):
    src = tmp_path / "photos"
    rng = np.random.default_rng(0)
    for cls in ("cat", "dog"):
        (src / cls).mkdir(parents=True)
        for i in range(6):
            arr = rng.integers(0, 256, (20 + i, 24, 3), dtype=np.uint8)  # odd, non-square sizes
            (src / cls / f"{i}.{'jpg' if i % 2 else 'png'}").write_bytes(_png(arr, "JPEG" if i % 2 else "PNG"))
            if i < 3:
                (src / cls / f"{i}.txt").write_text(f"a {cls} number {i}\n")
    (src / "dog" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    m = prepare_dataset("folder", tmp_path / "out", source=str(src), resolution=16, val_fraction=0.2)
    assert m.class_names == ["cat", "dog"] and m.num_classes == 2 and m.has_captions
    assert (m.resolution, m.channels) == (16, 3)
    assert m.counts["train"] + m.counts["val"] == 12
    assert sum(s.skipped for s in m.splits.values()) == 1
    assert "broken.png" in caplog.text
    recs = rows(tmp_path / "out") + rows(tmp_path / "out", "val")
    captions = {r["caption"] for r in recs}
    assert {"a cat number 0", "a dog number 2", ""} <= captions
    for r in recs:
        if r["caption"]:
            assert r["caption"].split()[1] == m.class_names[r["label"]]
        assert pixels(r["png"]).shape == (16, 16, 3)
    # A path as NAME is detected as a folder import.
    m2 = prepare_dataset(str(src), tmp_path / "out2", resolution=16, val_fraction=0.2)
    assert m2.name == "folder" and m2.counts == m.counts


def test_parquet_import_hugging_face_style_and_our_own_shards(tmp_path):
    rng = np.random.default_rng(1)
    imgs = [_png(rng.integers(0, 256, (12, 12), dtype=np.uint8)) for _ in range(20)]
    table = pa.table({"image": [{"bytes": b, "path": None} for b in imgs], "label": [i % 4 for i in range(20)],
                      "text": [f"item {i}" for i in range(20)], "score": [float(i) for i in range(20)]})
    (tmp_path / "hf").mkdir()
    pq.write_table(table.slice(0, 10), tmp_path / "hf/part-0.parquet")
    pq.write_table(table.slice(10), tmp_path / "hf/part-1.parquet")
    m = prepare_dataset(str(tmp_path / "hf/*.parquet"), tmp_path / "imp")
    assert m.name == "parquet" and (m.resolution, m.channels) == (12, 1)
    assert m.counts["train"] + m.counts["val"] == 20 and m.num_classes == 4 and m.has_captions
    assert m.extra_columns["score"].kind == "scalar"
    recs = rows(tmp_path / "imp") + rows(tmp_path / "imp", "val")
    for r in recs:
        i = int(r["score"])
        assert r["caption"] == f"item {i}" and r["label"] == i % 4 and r["png"] == imgs[i]  # bytes kept as is

    # Re-importing our own spheres shards keeps the scene column and its docs.
    prepare_dataset("spheres", tmp_path / "sph", count=10, max_spheres=2)
    m3 = prepare_dataset("parquet", tmp_path / "sph2", source=str(tmp_path / "sph"))
    assert m3.extra_columns["scene"].fields[:3] == ["x", "y", "z"]
    assert m3.extra_columns["scene"].max_len == 2


def test_webdataset_tar_import(tmp_path):
    rng = np.random.default_rng(2)
    tar_path = tmp_path / "shard-000.tar"
    with tarfile.open(tar_path, "w") as tar:
        for i in range(8):
            for ext, data in (("png", _png(rng.integers(0, 256, (10, 10, 3), dtype=np.uint8))),
                              ("cls", str(i % 2).encode()), ("txt", f"sample {i}".encode()),
                              ("json", json.dumps({"i": i}).encode())):
                info = tarfile.TarInfo(f"samples/{i:04d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    m = prepare_dataset(str(tar_path), tmp_path / "wds", val_fraction=0.25)
    assert m.name == "webdataset" and m.counts == {"train": 6, "val": 2}
    assert m.num_classes == 2 and m.has_captions and (m.resolution, m.channels) == (10, 3)
    for r in rows(tmp_path / "wds"):
        i = int(r["caption"].split()[1])
        assert r["label"] == i % 2


def test_bad_options_are_one_line_errors(tmp_path):
    with pytest.raises(DataError, match="has no option bogus; its options are: max_spheres"):
        prepare_dataset("spheres", tmp_path / "x", bogus=1)
    with pytest.raises(DataError, match="channels: 2 must be 1 or 3"):
        prepare_dataset("spheres", tmp_path / "x", channels=2)
    with pytest.raises(DataError, match="takes no source"):
        prepare_dataset("spheres", tmp_path / "x", source="/tmp")
    with pytest.raises(DataError, match="folder import needs a path"):
        prepare_dataset("folder", tmp_path / "x")


def test_parquet_glob_of_shards_with_different_columns_names_both_files(tmp_path, capfd):
    """Spheres shards (with `scene` columns) next to digits shards: one line
    naming the two files and the differing columns, no traceback."""
    from raygen.jobs.cli import main

    prepare_dataset("spheres", tmp_path / "sph", resolution=8, count=8)
    prepare_dataset("digits", tmp_path / "dig", resolution=8, count=8)
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    (mixed / "a.parquet").write_bytes((tmp_path / "sph" / "train-00000.parquet").read_bytes())
    (mixed / "b.parquet").write_bytes((tmp_path / "dig" / "train-00000.parquet").read_bytes())
    with pytest.raises(DataError) as err:
        prepare_dataset("parquet", tmp_path / "out", source=str(mixed / "*.parquet"))
    message = str(err.value)
    assert f"{mixed / 'a.parquet'} and {mixed / 'b.parquet'} have different columns" in message
    assert f"only {mixed / 'a.parquet'} has scene, scene_globals" in message
    capfd.readouterr()
    assert main(["data", "prepare", str(mixed / "*.parquet"), "--out", str(tmp_path / "out")]) == 2
    out, stderr = capfd.readouterr()
    assert stderr.count("\n") == 1 and "Traceback" not in stderr and "different columns" in stderr
