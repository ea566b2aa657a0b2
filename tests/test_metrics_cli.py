"""`raygen metrics fit-features|fid|clip-score` on a prepared dataset and a PNG folder."""
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from raygen.jobs.cli import main
from raygen.metrics.imageio import load_dataset_images, read_image_folder, write_image_folder


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    from raygen.data import prepare_dataset
    out = tmp_path_factory.mktemp("digits")
    prepare_dataset("digits", out, count=400)
    return out


def test_fit_features_then_fid_on_png_folders(digits, tmp_path, capsys):
    feat = tmp_path / "feat"
    assert main(["metrics", "fit-features", str(digits), "--out", str(feat), "--steps", "40"]) == 0
    assert "domain:" in capsys.readouterr().out
    assert (feat / "weights.safetensors").is_file() and (feat / "config.json").is_file()

    val, _, _ = load_dataset_images(digits, "val")
    write_image_folder(val, tmp_path / "good")
    noise = torch.rand(val.shape, generator=torch.Generator().manual_seed(0))
    write_image_folder(noise, tmp_path / "noise")
    assert torch.allclose(read_image_folder(tmp_path / "good").float() / 255, val, atol=1e-6)  # exact PNG round trip

    results = {}
    for name in ("good", "noise"):
        rc = main(["metrics", "fid", "--generated", str(tmp_path / name), "--reference", str(digits),
                   "--extractor", f"domain:{feat}", "--cache-dir", str(tmp_path / "cache"), "--kid-subsets", "10"])
        assert rc == 0
        results[name] = json.loads(capsys.readouterr().out)
    assert results["good"]["n_generated"] == val.shape[0] and results["good"]["n_reference"] == 400
    assert results["noise"]["fid"] > 3 * results["good"]["fid"]
    assert len(list((tmp_path / "cache").glob("ref-*.safetensors"))) == 1  # reference computed once


def test_fid_with_domain_trains_into_the_cache(digits, tmp_path, capsys):
    val, _, _ = load_dataset_images(digits, "val")
    write_image_folder(val, tmp_path / "gen")
    args = ["metrics", "fid", "--generated", str(tmp_path / "gen"), "--reference", str(digits), "--extractor",
            "domain", "--cache-dir", str(tmp_path / "cache"), "--fit-steps", "10", "--kid-subsets", "5"]
    assert main(args) == 0
    first = json.loads(capsys.readouterr().out)
    assert main(args) == 0
    second = json.loads(capsys.readouterr().out)
    assert first["extractor"].startswith("domain:") and second == first
    assert len(list((tmp_path / "cache").glob("domain-*/config.json"))) == 1


def test_errors_are_one_line_and_name_the_fix(digits, tmp_path, capsys):
    write_image_folder(torch.rand(4, 1, 8, 8), tmp_path / "gen")
    rc = main(["metrics", "fid", "--generated", str(tmp_path / "gen"), "--reference", str(digits),
               "--extractor", f"inception:{tmp_path / 'pt_inception.pth'}"])
    err = capsys.readouterr().err
    assert rc == 2 and "pt_inception-2015-12-05" in err and "Traceback" not in err
    rc = main(["metrics", "fit-features", str(tmp_path / "nowhere"), "--out", str(tmp_path / "f")])
    assert rc == 2 and "raygen data prepare" in capsys.readouterr().err


def test_bare_parquet_shards_read_like_the_prepared_dataset(digits, tmp_path):
    """Shards without a manifest (written by other tools) are read directly."""
    import shutil
    for shard in digits.glob("train-*.parquet"):
        shutil.copy(shard, tmp_path / shard.name)
    x1, y1, c1 = load_dataset_images(digits)
    x2, y2, c2 = load_dataset_images(tmp_path)
    assert x2.dtype == torch.uint8 and torch.allclose(x2.float() / 255, x1, atol=1e-6)
    assert torch.equal(y1, y2) and c1 == c2
    # and a shard with only png bytes
    import io
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(np.full((4, 4, 3), 200, np.uint8)).save(buf, format="PNG")
    bare = tmp_path / "bare"
    bare.mkdir()
    pq.write_table(pa.table({"png": [buf.getvalue()] * 3}), bare / "train-00000.parquet")
    x, y, c = load_dataset_images(bare)
    assert x.shape == (3, 3, 4, 4) and int(x[0, 0, 0, 0]) == 200 and y is None and c is None
