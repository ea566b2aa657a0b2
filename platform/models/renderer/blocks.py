"""The renderer's attention blocks: a transformer layer over the scene tokens,
ImageToSeq (the sequence reads the image) and SeqToImage (the image reads the
sequence through a gate).

Scene tokens carry no position: every block is permutation-equivariant over
the tokens, so the rendered image does not depend on the order of the spheres.
`mask` is bool [B, T], True for real tokens; padded tokens never act as keys.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from raygen.models.layers import FeedForward


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
           key_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Multi-head attention of q [B, Q, D] over k, v [B, K, D]; key_mask [B, K] True = attend."""
    b, nq, d = q.shape
    split = lambda t: t.reshape(b, t.shape[1], heads, d // heads).transpose(1, 2)  # noqa: E731
    mask = None if key_mask is None else key_mask[:, None, None, :]
    out = F.scaled_dot_product_attention(split(q), split(k), split(v), attn_mask=mask)
    return out.transpose(1, 2).reshape(b, nq, d)


class TransformerLayer(nn.Module):
    """Pre-norm self-attention + feed-forward over the scene tokens."""

    def __init__(self, dim: int, heads: int, ff_mult: int, activation: str, dropout: float = 0.0):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.ff = FeedForward(dim, ff_mult * dim, activation, dropout=dropout)
        self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(self.norm1(x)).chunk(3, dim=-1)
        x = x + self.drop(self.proj(attend(q, k, v, self.heads, mask)))
        x = x + self.drop(self.ff(self.norm2(x)))
        return x * mask[..., None]  # padded tokens stay zero, whatever they computed


class ImageToSeq(nn.Module):
    """Each token attends to the image's pooled feature cells; the result is
    added with an overall weight of its own, computed from that token.

    The weight's layer starts at zero, so at initialization the output is the
    input sequence exactly and the image is ignored (seed 002: this start
    "helps with avoiding loss of information"). Each token of each sequence
    gets its own weight: the seed's bug was one shared weight for all."""

    def __init__(self, dim: int, channels: int, heads: int, pool: int):
        super().__init__()
        self.heads, self.pool = heads, pool
        self.norm = nn.LayerNorm(dim)
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(channels, 2 * dim)
        self.cell = nn.Parameter(torch.zeros(pool * pool, channels))  # where a cell sits, so position is readable
        self.proj = nn.Linear(dim, dim)
        self.weight = nn.Linear(dim, 1)
        nn.init.zeros_(self.weight.weight)
        nn.init.zeros_(self.weight.bias)

    def pooled(self, image: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] -> [B, cells, C]: each image pooled on its own."""
        h, w = image.shape[-2:]
        cells = F.adaptive_avg_pool2d(image, (min(self.pool, h), min(self.pool, w))).flatten(2).transpose(1, 2)
        return cells + self.cell[:cells.shape[1]]

    def forward(self, seq: torch.Tensor, mask: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        k, v = self.kv(self.pooled(image)).chunk(2, dim=-1)
        read = self.proj(attend(self.q(self.norm(seq)), k, v, self.heads))
        return (seq + self.weight(seq) * read) * mask[..., None]


class SeqToImage(nn.Module):
    """Every pixel of a chosen set of channels cross-attends to the scene
    tokens; the read value is mixed in through the gate sigmoid(mix_bias):

        x_sel <- x_sel + sigmoid(mix_bias) * (read - x_sel)

    The read value enters once (seed 002's double add diverged). mix_bias is
    per channel and starts at `mix_bias_init`: 0 gives a gate of 0.5 (the seed's
    fix; -10 gave 4.5e-5 and the attention did nothing)."""

    def __init__(self, channels: int, dim: int, attn_channels: int, heads: int, fraction: float = 1.0,
                 mix_bias_init: float = 0.0):
        super().__init__()
        self.heads = heads
        self.selected = max(1, round(channels * fraction))  # the first `selected` channels get the attention
        self.q = nn.Conv2d(self.selected, attn_channels, 1)
        self.kv = nn.Linear(dim, 2 * attn_channels)
        self.out = nn.Conv2d(attn_channels, self.selected, 1)
        self.mix_bias = nn.Parameter(torch.full((self.selected,), float(mix_bias_init)))

    @property
    def gate(self) -> torch.Tensor:
        return torch.sigmoid(self.mix_bias)

    def read(self, image: torch.Tensor, seq: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """What the selected channels read from the sequence: [B, selected, H, W]."""
        b, _, h, w = image.shape
        q = self.q(image[:, :self.selected]).flatten(2).transpose(1, 2)  # [B, HW, A]
        k, v = self.kv(seq).chunk(2, dim=-1)
        out = attend(q, k, v, self.heads, mask).transpose(1, 2).reshape(b, -1, h, w)
        return self.out(out)

    def forward(self, image: torch.Tensor, seq: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        sel = image[:, :self.selected]
        mixed = sel + self.gate[None, :, None, None].to(sel.dtype) * (self.read(image, seq, mask) - sel)
        return torch.cat([mixed, image[:, self.selected:]], dim=1)
