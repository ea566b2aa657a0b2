"""Reconstruction, codebook and likelihood metrics; plain tensor arithmetic.

Images are float [N, C, H, W] in [0, 1]. Per-image values are means over that
image's sub-pixels; the summary is the mean over images (so PSNR is the mean of
per-image PSNRs, the usual convention, not the PSNR of the pooled MSE).
"""
from __future__ import annotations

import math

import torch

from raygen.metrics.errors import MetricsError

PSNR_MAX_DB = 100.0  # a perfect reconstruction gets this instead of inf, so means stay finite


def _pair(original: torch.Tensor, recon: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if original.shape != recon.shape:
        raise MetricsError(f"original {tuple(original.shape)} and reconstruction {tuple(recon.shape)} differ in shape")
    return original.detach().double().flatten(1), recon.detach().to(original.device).double().flatten(1)


def l1_per_image(original: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
    a, b = _pair(original, recon)
    return (a - b).abs().mean(1)


def mse_per_image(original: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
    a, b = _pair(original, recon)
    return ((a - b) ** 2).mean(1)


def psnr_per_image(original: torch.Tensor, recon: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """10 log10(range^2 / MSE) in dB, capped at PSNR_MAX_DB."""
    mse = mse_per_image(original, recon)
    psnr = 10.0 * torch.log10(data_range ** 2 / mse.clamp(min=1e-300))
    return psnr.clamp(max=PSNR_MAX_DB)


def ssim_per_image(original: torch.Tensor, recon: torch.Tensor, data_range: float = 1.0,
                   sigma: float = 1.5) -> torch.Tensor:
    """Structural similarity (Wang et al. 2004): Gaussian window (sigma 1.5, 11 wide or the
    largest odd size the image allows), valid positions only, mean over channels and positions."""
    import torch.nn.functional as F
    if original.shape != recon.shape or original.dim() != 4:
        raise MetricsError(f"SSIM needs two [N, C, H, W] batches of one shape, got {tuple(original.shape)} "
                           f"and {tuple(recon.shape)}")
    x, y = original.detach().double(), recon.detach().to(original.device).double()
    c = x.shape[1]
    size = min(11, *(s if s % 2 else s - 1 for s in x.shape[-2:]))
    ax = torch.arange(size, dtype=torch.float64, device=x.device) - (size - 1) / 2
    g = torch.exp(-ax ** 2 / (2 * sigma ** 2))
    window = (g[:, None] * g[None, :] / g.sum() ** 2).expand(c, 1, size, size)
    blur = lambda t: F.conv2d(t, window, groups=c)  # noqa: E731
    mx, my = blur(x), blur(y)
    vx, vy, cov = blur(x * x) - mx ** 2, blur(y * y) - my ** 2, blur(x * y) - mx * my
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    ssim = ((2 * mx * my + c1) * (2 * cov + c2)) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))
    return ssim.flatten(1).mean(1)


def fidelity_metrics(reference: torch.Tensor, rendered: torch.Tensor, data_range: float = 1.0) -> dict[str, float]:
    """{"psnr", "ssim"}: means over images of rendered images against their ground truth
    (a scene renderer's output against the procedural renderer's image of the same scene)."""
    return {"psnr": float(psnr_per_image(reference, rendered, data_range).mean()),
            "ssim": float(ssim_per_image(reference, rendered, data_range).mean())}


def reconstruction_metrics(original: torch.Tensor, recon: torch.Tensor, data_range: float = 1.0) -> dict[str, float]:
    """{"l1", "l2" (mean squared error), "psnr"}: means over images."""
    return {"l1": float(l1_per_image(original, recon).mean()),
            "l2": float(mse_per_image(original, recon).mean()),
            "psnr": float(psnr_per_image(original, recon, data_range).mean())}


def codebook_metrics(indices: torch.Tensor, codebook_size: int) -> dict[str, float]:
    """Usage and perplexity of code indices (any shape, values in [0, codebook_size)).

    usage: fraction of codes used at least once; perplexity: exp(entropy) of the
    code histogram, from 1 (one code) to codebook_size (uniform use)."""
    idx = torch.as_tensor(indices).detach().reshape(-1).long().cpu()
    if idx.numel() == 0:
        raise MetricsError("no code indices given")
    if idx.min() < 0 or idx.max() >= codebook_size:
        raise MetricsError(f"code indices must lie in [0, {codebook_size}) (got {int(idx.min())}..{int(idx.max())})")
    counts = torch.bincount(idx, minlength=codebook_size).double()
    p = counts / counts.sum()
    nz = p[p > 0]
    entropy = float(-(nz * nz.log()).sum())
    used = int((counts > 0).sum())
    return {"codebook_usage": used / codebook_size, "codebook_used": float(used),
            "codebook_perplexity": math.exp(entropy)}


def bits_per_dim(nll_nats, num_dims: int, *, data_bins: int | None = None) -> float:
    """Mean bits per dimension from NLL in nats per example (a float or a tensor of them).

    `num_dims` is C*H*W. The NLL must be of the discrete data (8-bit values); for
    a continuous density over [0, 1] data, pass `data_bins=256` to add the
    D*log(256) nats that turn it into a discrete NLL under uniform dequantization."""
    if num_dims <= 0:
        raise MetricsError(f"num_dims must be positive (got {num_dims})")
    nll = float(torch.as_tensor(nll_nats, dtype=torch.float64).mean())
    if data_bins is not None:
        nll += num_dims * math.log(data_bins)
    return nll / (num_dims * math.log(2.0))
