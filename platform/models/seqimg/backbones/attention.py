"""Causal multi-head self-attention with a KV cache, shared by the three
transformer backbones (gpt2, alibi, modern). Position comes from outside
(absolute embeddings), from rotary embeddings, or from ALiBi biases."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from raygen.models.layers.positional import Rotary, alibi_slopes
from raygen.models.seqimg.backbones.common import Mixer


class CausalSelfAttention(Mixer):
    def __init__(self, dim: int, heads: int, max_len: int, *, depth: int = 1, dropout: float = 0.0,
                 rotary: bool = False, alibi: bool = False):
        super().__init__()
        self.max_len = max_len
        self.heads = heads
        self.head_dim = dim // heads
        self.dropout = dropout
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        # GPT-2 init: N(0, 0.02), residual projections shrunk by sqrt(2 * depth) so
        # the residual stream's variance does not grow with depth
        nn.init.normal_(self.qkv.weight, std=0.02)
        nn.init.zeros_(self.qkv.bias)
        nn.init.normal_(self.proj.weight, std=0.02 / math.sqrt(2 * depth))
        nn.init.zeros_(self.proj.bias)
        self.rotary = Rotary(self.head_dim) if rotary else None
        if alibi:
            self.register_buffer("slopes", alibi_slopes(heads), persistent=False)
        else:
            self.slopes = None

    def _heads(self, x):
        b, t, _ = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        return q, k, v  # each [B, H, T, hd]

    def _merge(self, y):
        b, h, t, d = y.shape
        return self.proj(y.transpose(1, 2).reshape(b, t, h * d))

    def _alibi(self, q_pos, k_pos, dtype):
        """-slope * distance to each key; future keys masked out."""
        dist = (q_pos.view(-1, 1) - k_pos.view(1, -1)).to(dtype)
        bias = -self.slopes.to(dtype).view(-1, 1, 1) * dist.clamp(min=0)
        return bias.masked_fill(dist < 0, float("-inf"))

    def forward(self, x):
        q, k, v = self._heads(x)
        t = x.shape[1]
        pos = torch.arange(t, device=x.device)
        if self.rotary is not None:
            cos, sin = self.rotary.cos_sin(pos, q.dtype)
            q, k = Rotary.rotate(q, cos, sin), Rotary.rotate(k, cos, sin)
        p = self.dropout if self.training else 0.0
        if self.slopes is not None:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=self._alibi(pos, pos, q.dtype), dropout_p=p)
        else:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=p)
        return self._merge(y)

    def step(self, x, state=None):
        """state: (keys [B, H, max_len, hd], values, filled length). The cache is
        preallocated, so a step writes one key and one value, never copies the prefix."""
        q, k, v = self._heads(x.unsqueeze(1))
        if state is None:
            shape = (x.shape[0], self.heads, self.max_len, self.head_dim)
            state = (k.new_empty(shape), v.new_empty(shape), 0)
        keys, values, t = state
        if t >= self.max_len:
            raise ValueError(f"the KV cache holds {self.max_len} tokens, the sequence length it was built for")
        if self.rotary is not None:
            cos, sin = self.rotary.cos_sin(torch.tensor([t], device=x.device), q.dtype)
            q, k = Rotary.rotate(q, cos, sin), Rotary.rotate(k, cos, sin)
        keys[:, :, t] = k[:, :, 0]
        values[:, :, t] = v[:, :, 0]
        mask = None
        if self.slopes is not None:
            mask = self._alibi(torch.tensor([t], device=x.device), torch.arange(t + 1, device=x.device), q.dtype)
        p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, keys[:, :, : t + 1], values[:, :, : t + 1], attn_mask=mask, dropout_p=p)
        return self._merge(y)[:, 0], (keys, values, t + 1)
