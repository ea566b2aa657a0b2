"""Normalizations for token sequences [B, T, D], usable one token at a time.

Every norm offers `forward(x [B, T, D])` and `step(x_t [B, D], state) ->
(y_t, state)` so that autoregressive sampling can cache. Only the instance
norm carries state; the others ignore it.

The seed's numbers: 0 none, 1 instance, 2 batch, 3 RMS, 4 layer.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn


class SeqNorm(nn.Module):
    """A norm with no state between tokens: `step` is `forward` on one token."""

    def step(self, x: torch.Tensor, state: Any = None) -> tuple[torch.Tensor, Any]:
        return self(x), state


class NoNorm(SeqNorm):
    def __init__(self, dim: int):
        super().__init__()

    def forward(self, x):
        return x


class LayerNorm(SeqNorm):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=eps)

    def forward(self, x):
        return self.norm(x)


class RMSNorm(SeqNorm):
    """x / rms(x) * weight: no mean subtraction, no bias."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class BatchNorm(SeqNorm):
    """Batch norm over every token of the batch (features are the channels).

    In training the statistics pool all tokens of the batch, as any batch norm
    over a sequence does (a position sees the batch's mean, to which later
    positions contributed, a 1/(B*T) share); in eval the running statistics make
    it exactly per-token, so sampling and its cache are exact.
    """

    def __init__(self, dim: int, eps: float = 1e-5, momentum: float = 0.1):
        super().__init__()
        self.norm = nn.BatchNorm1d(dim, eps=eps, momentum=momentum)

    def forward(self, x):
        shape = x.shape
        return self.norm(x.reshape(-1, shape[-1])).reshape(shape)


class CausalInstanceNorm(SeqNorm):
    """Instance norm over the sequence seen so far.

    An instance norm normalizes each channel by its statistics over the
    positions of one sample. Pooling over the whole sequence would let every
    token see future patches, so position t uses the mean and variance of
    positions 0..t only (cumulative sums), which is also what the cached
    `step` keeps: (count, sum, sum of squares).
    """

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))

    def _normalize(self, x, count, s1, s2):
        mean = s1 / count
        var = (s2 / count - mean * mean).clamp(min=0.0)
        return (x - mean) * torch.rsqrt(var + self.eps) * self.weight + self.bias

    def forward(self, x):
        work = torch.promote_types(x.dtype, torch.float32)  # running sums in fp32 at least
        xw = x.to(work)
        count = torch.arange(1, x.shape[1] + 1, device=x.device, dtype=work).view(1, -1, 1)
        return self._normalize(xw, count, xw.cumsum(1), (xw * xw).cumsum(1)).to(x.dtype)

    def step(self, x, state=None):
        xw = x.to(torch.promote_types(x.dtype, torch.float32))
        if state is None:
            count, s1, s2 = 1, xw, xw * xw
        else:
            count, s1, s2 = state[0] + 1, state[1] + xw, state[2] + xw * xw
        return self._normalize(xw, count, s1, s2).to(x.dtype), (count, s1, s2)


NORMS: dict[str, type[SeqNorm]] = {
    "none": NoNorm,
    "instance": CausalInstanceNorm,
    "batch": BatchNorm,
    "rms": RMSNorm,
    "layer": LayerNorm,
}
NORM_NUMBERS: dict[int, str] = {0: "none", 1: "instance", 2: "batch", 3: "rms", 4: "layer"}


def norm_name(key: str | int) -> str:
    if isinstance(key, int) and not isinstance(key, bool):
        if key not in NORM_NUMBERS:
            raise ValueError(f"norm number {key} is not one of {NORM_NUMBERS}")
        return NORM_NUMBERS[key]
    if key not in NORMS:
        raise ValueError(f"unknown norm '{key}'; choose one of: {', '.join(NORMS)} (or its number 0-4)")
    return key


def make_norm(key: str | int, dim: int) -> SeqNorm:
    return NORMS[norm_name(key)](dim)
