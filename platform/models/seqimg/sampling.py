"""Standalone samplers: turn one step's head output into the next patch.

Both take a `torch.Generator` so that a seeded run draws the same numbers in
the same order whatever the path (cached or not) that produced the logits.
"""
from __future__ import annotations

import torch


def _rand(shape, generator: torch.Generator | None, like: torch.Tensor) -> torch.Tensor:
    """Uniform [0, 1) numbers drawn on the generator's device, moved to `like`'s."""
    device = generator.device if generator is not None else like.device
    return torch.rand(shape, generator=generator, device=device, dtype=torch.float64).to(like.device)


def _randn(shape, generator: torch.Generator | None, like: torch.Tensor) -> torch.Tensor:
    device = generator.device if generator is not None else like.device
    return torch.randn(shape, generator=generator, device=device, dtype=torch.float64).to(like.device)


class CategoricalSampler:
    """Temperature and top-k sampling of independent categoricals (one per sub-pixel).

    temperature 0 takes the most likely level; top_k 0 keeps every level.
    Draws by inverting the CDF with one uniform number per sub-pixel.
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
        # inverse CDF on unnormalized weights: the first level whose cumulative
        # weight reaches u * total (no softmax division pass; rounding in the
        # cumsum can never push the threshold past the last level)
        cdf = torch.exp(logits - logits.amax(-1, keepdim=True)).cumsum(-1)
        u = _rand(logits.shape[:-1] + (1,), generator, logits).to(cdf.dtype) * cdf[..., -1:]
        return torch.searchsorted(cdf, u).squeeze(-1).clamp(max=k - 1)


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
