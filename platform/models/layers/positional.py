"""Positional information: absolute embeddings, rotary embeddings, ALiBi slopes.

Seed numbers for absolute embeddings: 0 none, 1 sinusoidal, 2 learned.
"""
from __future__ import annotations

import math

import torch
from torch import nn


def sinusoidal_table(length: int, dim: int, base: float = 10000.0) -> torch.Tensor:
    """The original transformer's table: sin on even channels, cos on odd."""
    pos = torch.arange(length, dtype=torch.float64).unsqueeze(1)
    freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float64) * (-math.log(base) / dim))
    table = torch.zeros(length, dim, dtype=torch.float64)
    table[:, 0::2] = torch.sin(pos * freq)
    table[:, 1::2] = torch.cos(pos * freq[: dim // 2])
    return table.float()


class PositionalEmbedding(nn.Module):
    """Base: `forward(start, length) -> [length, dim]` or None for no embedding."""

    def __init__(self, max_len: int, dim: int):
        super().__init__()
        self.max_len = max_len

    def _check(self, start: int, length: int) -> None:
        if start + length > self.max_len:
            raise ValueError(f"positions up to {start + length} exceed the {self.max_len} this embedding was built for")


class NoPositional(PositionalEmbedding):
    def forward(self, start: int, length: int):
        return None


class SinusoidalPositional(PositionalEmbedding):
    def __init__(self, max_len: int, dim: int):
        super().__init__(max_len, dim)
        self.register_buffer("table", sinusoidal_table(max_len, dim), persistent=False)

    def forward(self, start: int, length: int):
        self._check(start, length)
        return self.table[start:start + length]


class LearnedPositional(PositionalEmbedding):
    def __init__(self, max_len: int, dim: int, std: float = 0.02):
        super().__init__(max_len, dim)
        # GPT-2's 0.02: unit-variance embeddings (the seed's randn) swamp the tokens at the start
        self.table = nn.Parameter(torch.randn(max_len, dim) * std)

    def forward(self, start: int, length: int):
        self._check(start, length)
        return self.table[start:start + length]


POSITIONAL: dict[str, type[PositionalEmbedding]] = {
    "none": NoPositional,
    "sinusoidal": SinusoidalPositional,
    "learned": LearnedPositional,
}
POSITIONAL_NUMBERS: dict[int, str] = {0: "none", 1: "sinusoidal", 2: "learned"}


def make_positional(kind: str, max_len: int, dim: int) -> PositionalEmbedding:
    if kind not in POSITIONAL:
        raise ValueError(f"unknown positional embedding '{kind}'; choose one of: {', '.join(POSITIONAL)}")
    return POSITIONAL[kind](max_len, dim)


class Rotary(nn.Module):
    """Rotary position embedding (RoFormer) for attention heads of size head_dim.

    `cos_sin(positions)` gives the rotation of each position, `rotate(x, cos,
    sin)` applies it to queries or keys [B, H, T, head_dim]. Relative offsets
    fall out of the dot product, so cached keys never need re-rotating.
    """

    def __init__(self, head_dim: int, base: float = 10000.0):
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"rotary embeddings need an even head size, got {head_dim}")
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
        self.register_buffer("inv_freq", inv_freq.float(), persistent=False)

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions.to(torch.float64).unsqueeze(-1) * self.inv_freq.to(torch.float64)
        emb = torch.cat([freqs, freqs], dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)

    @staticmethod
    def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x1, x2 = x.chunk(2, dim=-1)
        return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def alibi_slopes(heads: int) -> torch.Tensor:
    """ALiBi's per-head slopes: a geometric sequence starting at 2^(-8/n); for a
    head count that is not a power of two, the paper's interleaving."""
    def power_of_two(n: int) -> list[float]:
        start = 2.0 ** (-8.0 / n)
        return [start ** (i + 1) for i in range(n)]

    if math.log2(heads).is_integer():
        slopes = power_of_two(heads)
    else:
        closest = 2 ** math.floor(math.log2(heads))
        slopes = power_of_two(closest) + power_of_two(2 * closest)[0::2][: heads - closest]
    return torch.tensor(slopes, dtype=torch.float32)
