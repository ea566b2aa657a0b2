"""Standalone samplers: turn one step's head output into the next patch.

Both take a `torch.Generator`, or one per image, so that a seeded run draws the same numbers in
the same order whatever the path (cached or not) that produced the logits.
"""
from __future__ import annotations

from typing import Sequence

import torch

from raygen.models.sampling import per_image_rand, per_image_randn


def _rand(shape, generator, like: torch.Tensor) -> torch.Tensor:
    """Uniform [0, 1) numbers of `shape`, moved to `like`'s device. With one
    generator per image (a sequence), row i of the leading dimension comes
    from generator i, so an image's draws do not depend on its batch."""
    if isinstance(generator, Sequence):
        return per_image_rand(generator, shape[1:], dtype=torch.float64).to(like.device)
    device = generator.device if generator is not None else like.device
    return torch.rand(shape, generator=generator, device=device, dtype=torch.float64).to(like.device)


def _randn(shape, generator, like: torch.Tensor) -> torch.Tensor:
    if isinstance(generator, Sequence):
        return per_image_randn(generator, shape[1:], dtype=torch.float64).to(like.device)
    device = generator.device if generator is not None else like.device
    return torch.randn(shape, generator=generator, device=device, dtype=torch.float64).to(like.device)


class CategoricalSampler:
    """Temperature and top-k sampling of independent categoricals (one per sub-pixel).

    temperature 0 takes the most likely level; top_k 0 keeps every level.
    Draws by inverting the CDF with one uniform number per sub-pixel (`inverse_cdf`).
    """

    def __init__(self, temperature: float = 1.0, top_k: int = 0):
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        if top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 keeps all levels), got {top_k}")
        self.temperature = float(temperature)
        self.top_k = int(top_k)

    def __call__(self, logits: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """logits [..., K] -> indices [...] (long)."""
        k = logits.shape[-1]
        if self.temperature == 0.0:
            return logits.argmax(-1)
        if logits.dtype in (torch.float16, torch.bfloat16):
            logits = logits.float()
        if self.temperature != 1.0:
            logits = logits / self.temperature
        if 0 < self.top_k < k:
            kth = logits.topk(self.top_k, dim=-1).values[..., -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        u = _rand(logits.shape[:-1] + (1,), generator, logits).to(logits.dtype)
        return inverse_cdf(torch.softmax(logits, dim=-1), u)


def inverse_cdf(probs: torch.Tensor, u: torch.Tensor, block: int = 16) -> torch.Tensor:
    """The first level whose cumulative probability reaches u * total: probs
    [..., K], u [..., 1] uniform in [0, 1) -> levels [...] (long).

    Two levels of search when K splits into blocks: cumulative sums over the
    K/block block totals pick a block, then over that block's own entries.
    Exactly the one-level answer up to float rounding, with 1/block of the
    cumulative-sum work (a plain cumsum over 256 levels per sub-pixel was the
    largest cost of a cached sampling step). A level of probability 0 (cut by
    top-k) is never returned: the searched value is kept strictly positive
    and no larger than the chosen block's total.
    """
    k = probs.shape[-1]
    tiny = torch.finfo(probs.dtype).tiny
    if k % block or k <= block:
        cdf = probs.cumsum(-1)
        target = (u * cdf[..., -1:]).clamp(min=tiny)
        return torch.searchsorted(cdf, target).squeeze(-1).clamp(max=k - 1)
    blocks = probs.unflatten(-1, (k // block, block))                     # [..., K/b, b]
    block_cdf = blocks.sum(-1).cumsum(-1)                                 # [..., K/b]
    target = (u * block_cdf[..., -1:]).clamp(min=tiny)                    # [..., 1]
    chosen = torch.searchsorted(block_cdf, target).clamp(max=k // block - 1)
    before = torch.where(chosen > 0, block_cdf.gather(-1, (chosen - 1).clamp(min=0)), torch.zeros_like(target))
    inner_cdf = blocks.gather(-2, chosen.unsqueeze(-1).expand(*chosen.shape, block)).squeeze(-2).cumsum(-1)
    rest = torch.minimum((target - before).clamp(min=tiny), inner_cdf[..., -1:])
    within = torch.searchsorted(inner_cdf, rest).clamp(max=block - 1)
    return (chosen * block + within).squeeze(-1)


class RegressionSampler:
    """Sampling for a regression head, as the seed does it.

    The predicted mean is what goes into the image; the patch fed back as the
    next input is the mean plus noise, temperature * scale * eps, where scale
    is the head's running estimate of its own error (Gaussian eps for L2,
    Laplace for L1: the noise models those losses imply). The noise is what
    makes unconditional samples differ; temperature 0 gives the greedy image.
    """

    def __init__(self, temperature: float = 1.0, scale: torch.Tensor | float = 1.0, laplace: bool = False):
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        self.temperature = float(temperature)
        self.scale = scale
        self.laplace = laplace

    def __call__(self, mean: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """mean [..., P] -> the noisy value to feed back, same shape."""
        if self.temperature == 0.0:
            return mean
        if self.laplace:
            u = _rand(mean.shape, generator, mean) - 0.5
            eps = -torch.sign(u) * torch.log1p(-2.0 * u.abs()).clamp(min=-30.0)  # Laplace(0, 1)
        else:
            eps = _randn(mean.shape, generator, mean)
        return mean + (self.temperature * eps).to(mean.dtype) * self.scale
