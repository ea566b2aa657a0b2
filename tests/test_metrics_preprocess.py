"""Explicit preprocessing: quantization like PNG files, channels, resize, range."""
import io

import numpy as np
import pytest
import torch
from PIL import Image

from raygen.metrics import MetricsError, Preprocess
from raygen.metrics.preprocess import out_of_range_fraction


def test_quantization_matches_a_png_round_trip():
    x = torch.rand(1, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    buf = io.BytesIO()
    arr = np.floor(x[0, 0].numpy() * 255 + 0.5).astype(np.uint8)  # what a PNG writer stores
    Image.fromarray(arr).save(buf, format="PNG")
    reread = torch.from_numpy(np.asarray(Image.open(buf)).copy())[None, None]
    p = Preprocess(size=8, channels=1)
    assert torch.equal(p(x), p(reread))  # in-memory samples == the same samples read back from PNG
    assert torch.equal(p(x), reread.float() / 255)


def test_clamp_range_channels_and_resize():
    p = Preprocess(size=4, channels=3, value_range=(-1.0, 1.0), quantize=False)
    x = torch.tensor([-3.0, -1.0, 0.0, 1.0]).view(1, 1, 2, 2)
    out = p(x)
    assert out.shape == (1, 3, 4, 4)
    assert torch.equal(out[:, 0], out[:, 2])  # replicated channels
    assert out.min() >= 0 and out.max() <= 1
    assert out_of_range_fraction(x, (-1.0, 1.0)) == pytest.approx(0.25)
    up = Preprocess(size=2, channels=1, quantize=False)(torch.ones(2, 1, 6, 6) * 0.3)
    assert up.shape == (2, 1, 2, 2) and torch.allclose(up, torch.full_like(up, 0.3))
    gray = Preprocess(size=2, channels=1, quantize=False)(torch.ones(1, 3, 2, 2))
    assert torch.allclose(gray, torch.ones_like(gray))  # luma weights sum to 1


def test_bad_settings_name_the_field():
    with pytest.raises(MetricsError, match="channels"):
        Preprocess(size=4, channels=2)
    with pytest.raises(MetricsError, match="value_range"):
        Preprocess(size=4, channels=1, value_range=(1.0, 0.0))
    with pytest.raises(MetricsError, match=r"\[N, C, H, W\]"):
        Preprocess(size=4, channels=1)(torch.zeros(4, 4))
