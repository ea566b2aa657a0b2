"""The one image-output module: one rounding rule, grids and PNGs, torch and numpy alike."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from raygen.images import grid, make_grid, png_bytes, quantize, save_grid, to_uint8


def test_stored_levels_round_trip_exactly():
    levels = torch.arange(256, dtype=torch.float32) / 255  # what decoding a PNG gives
    assert torch.equal(quantize(levels), torch.arange(256, dtype=torch.uint8))


def test_half_levels_round_up_not_to_even():
    k = torch.arange(255, dtype=torch.float32)
    x = (k + 0.5) / 255
    exact = (x * 255) == (k + 0.5)  # the float32 values that land exactly on a half level
    assert exact.sum() > 10
    got = quantize(x[exact]).long()
    assert torch.equal(got, k[exact].long() + 1)
    # the rule the training grids used before (round half to even) differs on even levels
    assert not torch.equal(got, (x[exact] * 255).round().long())


def test_nan_is_black_and_values_are_clamped_in_torch_and_numpy():
    x = torch.tensor([float("nan"), -0.3, 1.7, float("inf"), float("-inf"), 0.2])
    want = [0, 0, 255, 255, 0, 51]
    assert quantize(x).tolist() == want
    assert quantize(x.numpy()).tolist() == want and quantize(x.numpy()).dtype == np.uint8
    assert quantize(torch.full((2,), 7, dtype=torch.uint8)).tolist() == [7, 7]  # uint8 passes through


def test_to_uint8_png_and_grid():
    images = torch.rand(5, 3, 8, 6, generator=torch.Generator().manual_seed(0))
    u8 = to_uint8(images)
    assert u8.shape == (5, 8, 6, 3) and u8.dtype == np.uint8
    assert np.array_equal(u8, to_uint8(images.numpy()))  # torch and numpy give the same pixels
    decoded = np.asarray(Image.open(io.BytesIO(png_bytes(u8[0]))))
    assert np.array_equal(decoded, u8[0])
    g = grid(u8, pad=2)
    assert g.shape == (2 * 8 + 3 * 2, 3 * 6 + 4 * 2, 3)  # 5 images: 3 columns, 2 rows
    assert np.array_equal(g[2:10, 2:8], u8[0]) and g[0].max() == 0
    big = grid(u8, nrow=5, pad=1, fill=64, upscale=2)
    assert big.shape == (16 + 2, 5 * 12 + 6, 3) and big[0, 0, 0] == 64
    assert np.array_equal(big[1:17:2, 1:13:2], u8[0])
    assert make_grid(images).shape == g.shape
    with pytest.raises(ValueError, match="uint8"):
        grid(images.numpy())


def test_save_grid_writes_a_png(tmp_path):
    images = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    path = save_grid(images, tmp_path / "sub" / "g.png", upscale=4)
    img = Image.open(path)
    assert img.mode == "L" and img.size == (2 * 32 + 3 * 2, 2 * 32 + 3 * 2)
    cell = np.asarray(img)[2:34:4, 2:34:4]
    assert np.array_equal(cell, to_uint8(images)[0, ..., 0])
