"""`raygen data prepare|show|list` through the real CLI entry point."""
from __future__ import annotations

import numpy as np
from PIL import Image

from raygen.data import read_manifest
from raygen.jobs.cli import main


def test_prepare_show_and_grid(tmp_path, capsys):
    out = tmp_path / "shapes"
    assert main(["data", "prepare", "shapes", "--out", str(out), "--count", "24", "--resolution", "16",
                 "--seed", "5", "--val-fraction", "0.25", "--opt", "max_shapes=1"]) == 0
    said = capsys.readouterr().out
    assert "prepared shapes: train 24, val 8 images at 16x16x3" in said
    m = read_manifest(out)
    assert m.prepare["seed"] == 5 and m.prepare["options"] == {"max_shapes": 1}

    grid = tmp_path / "grid.png"
    assert main(["data", "show", str(out), "--grid", str(grid), "--samples", "10", "--verify"]) == 0
    said = capsys.readouterr().out
    assert "splits: train 24" in said and "val 8" in said and "images: 16x16, 3 channel(s)" in said
    assert "checksums: ok" in said and "captions: yes" in said and "caption: 'a" in said
    assert "extra column shapes" in said and f"grid: wrote 10 training images to {grid}" in said
    img = np.asarray(Image.open(grid))
    # 8 columns x 2 rows of 32px cells (16px images upscaled 2x) with 1px borders
    assert img.shape == (2 * 33 + 1, 8 * 33 + 1, 3)


def test_prepare_a_folder_given_as_path(tmp_path, capsys):
    src = tmp_path / "imgs" / "red"
    src.mkdir(parents=True)
    for i in range(5):
        Image.fromarray(np.full((12, 12, 3), (200, 10 * i, 0), np.uint8)).save(src / f"{i}.png")
    assert main(["data", "prepare", "folder", str(tmp_path / "imgs"), "--out", str(tmp_path / "ds")]) == 0
    m = read_manifest(tmp_path / "ds")
    assert m.class_names == ["red"] and m.resolution == 12 and m.counts["train"] + m.counts["val"] == 5


def test_user_errors_are_one_line_and_exit_2(tmp_path, capsys):
    assert main(["data", "show", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("raygen data: error: ") and err.count("\n") == 1
    assert main(["data", "prepare", "spheres", "--out", str(tmp_path / "x"), "--opt", "nokey"]) == 2
    assert "expected KEY=VALUE" in capsys.readouterr().err
    assert main(["data", "prepare", "fashion-mnist", "--out", str(tmp_path / "f"),
                 "--source", str(tmp_path / "nowhere")]) == 2
    assert "apt-get install dataset-fashion-mnist" in capsys.readouterr().err


def test_list_names_every_builtin(capsys):
    assert main(["data", "list"]) == 0
    said = capsys.readouterr().out
    for name in ("fashion-mnist", "digits", "spheres", "kali", "shapes", "folder", "parquet", "webdataset"):
        assert f"\n{name} " in "\n" + said
