"""Reconstruction, codebook and bits-per-dim metrics against hand computations."""
import math

import pytest
import torch

from raygen.metrics import (MetricsError, bits_per_dim, codebook_metrics, l1_per_image, mse_per_image,
                            psnr_per_image, reconstruction_metrics)
from raygen.metrics.recon import PSNR_MAX_DB


def test_l1_l2_psnr_by_hand():
    a = torch.zeros(2, 1, 2, 2)
    b = a.clone()
    b[0] = 0.5            # image 0: every pixel off by 0.5
    b[1, 0, 0, 0] = 1.0   # image 1: one pixel of four off by 1
    assert l1_per_image(a, b).tolist() == pytest.approx([0.5, 0.25])
    assert mse_per_image(a, b).tolist() == pytest.approx([0.25, 0.25])
    psnr = 10 * math.log10(1 / 0.25)
    assert psnr_per_image(a, b).tolist() == pytest.approx([psnr, psnr])
    m = reconstruction_metrics(a, b)
    assert m == pytest.approx({"l1": 0.375, "l2": 0.25, "psnr": psnr})


def test_psnr_is_capped_for_perfect_reconstruction_and_shapes_must_match():
    x = torch.rand(3, 3, 4, 4)
    assert psnr_per_image(x, x).tolist() == [PSNR_MAX_DB] * 3
    with pytest.raises(MetricsError, match="differ in shape"):
        reconstruction_metrics(x, x[:, :1])


def test_codebook_usage_and_perplexity_by_hand():
    m = codebook_metrics(torch.tensor([[0, 0], [1, 1]]), codebook_size=8)
    assert m["codebook_usage"] == pytest.approx(2 / 8)
    assert m["codebook_used"] == 2
    assert m["codebook_perplexity"] == pytest.approx(2.0)  # two codes, equally used
    uniform = codebook_metrics(torch.arange(16).repeat(3), codebook_size=16)
    assert uniform["codebook_perplexity"] == pytest.approx(16.0) and uniform["codebook_usage"] == 1.0
    skew = codebook_metrics(torch.tensor([0, 0, 0, 1]), codebook_size=4)
    h = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert skew["codebook_perplexity"] == pytest.approx(math.exp(h))
    with pytest.raises(MetricsError, match=r"\[0, 4\)"):
        codebook_metrics(torch.tensor([4]), codebook_size=4)


def test_bits_per_dim_by_hand():
    dims = 3 * 8 * 8
    # a uniform model over 256 values per sub-pixel has exactly 8 bits per dim
    assert bits_per_dim(dims * math.log(256), dims) == pytest.approx(8.0)
    assert bits_per_dim(torch.tensor([dims * math.log(2.0), dims * math.log(8.0)]), dims) == pytest.approx(2.0)
    # a continuous density on [0,1]^D with NLL 0 (uniform) is 8 bpd once dequantized
    assert bits_per_dim(0.0, dims, data_bins=256) == pytest.approx(8.0)
