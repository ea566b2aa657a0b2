"""A small trainable text encoder with nothing to download.

Shared by the families that condition on captions (seqimg, diffusion):

    enc = TextEncoder(TextEncoderConfig(dim=64))
    tokens, mask = enc.encode(["a red circle", "two squares"])   # [B, T, D], [B, T] bool
    vec = enc.pooled(["a red circle"])                          # [B, D]

Tokenizers are deterministic and need no vocabulary file: "byte" maps UTF-8
bytes to ids, "word" hashes lower-cased words into a fixed number of buckets
(crc32, stable across processes, unlike Python's salted `hash`).
"""
from __future__ import annotations

import re
import zlib
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from raygen.models.layers.feedforward import FeedForward

PAD, BOS, EOS = 0, 1, 2
_SPECIAL = 3


class TextEncoderConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    tokenizer: Literal["byte", "word"] = Field("byte", description="byte: UTF-8 bytes; word: hashed lower-case words")
    dim: int = Field(64, ge=8, description="width of the token vectors")
    depth: int = Field(2, ge=0, le=24, description="transformer encoder layers (0: embeddings only)")
    heads: int = Field(4, ge=1)
    max_len: int = Field(64, ge=4, description="tokens kept per caption, BOS and EOS included")
    word_buckets: int = Field(4096, ge=16, description="hash buckets of the word tokenizer")
    dropout: float = Field(0.0, ge=0.0, lt=1.0)


class ByteTokenizer:
    def __init__(self, config: TextEncoderConfig):
        self.vocab_size = _SPECIAL + 256

    def ids(self, text: str) -> list[int]:
        return [_SPECIAL + b for b in text.encode("utf-8")]


class WordTokenizer:
    _WORD = re.compile(r"[a-z0-9]+|[^\sa-z0-9]")

    def __init__(self, config: TextEncoderConfig):
        self.buckets = config.word_buckets
        self.vocab_size = _SPECIAL + self.buckets

    def ids(self, text: str) -> list[int]:
        return [_SPECIAL + zlib.crc32(w.encode("utf-8")) % self.buckets for w in self._WORD.findall(text.lower())]


TOKENIZERS = {"byte": ByteTokenizer, "word": WordTokenizer}


class _EncoderLayer(nn.Module):
    """Pre-norm bidirectional self-attention + feed-forward; padding is masked."""

    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        if dim % heads:
            raise ValueError(f"text encoder dim {dim} must be divisible by heads {heads}")
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim, 4 * dim, "gelu", dropout=dropout)
        self.dropout = dropout

    def forward(self, x, mask):
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        attn = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :],
                                              dropout_p=self.dropout if self.training else 0.0)
        x = x + self.proj(attn.transpose(1, 2).reshape(b, t, d))
        return x + self.ff(self.norm2(x))


class TextEncoder(nn.Module):
    def __init__(self, config: TextEncoderConfig | None = None, **overrides):
        super().__init__()
        config = config or TextEncoderConfig()
        if overrides:
            config = TextEncoderConfig.model_validate({**config.model_dump(), **overrides})
        self.config = config
        self.tokenizer = TOKENIZERS[config.tokenizer](config)
        self.dim = config.dim
        self.token = nn.Embedding(self.tokenizer.vocab_size, config.dim, padding_idx=PAD)
        self.pos = nn.Parameter(torch.randn(config.max_len, config.dim) * 0.02)
        self.layers = nn.ModuleList(_EncoderLayer(config.dim, config.heads, config.dropout) for _ in range(config.depth))
        self.norm = nn.LayerNorm(config.dim)
        nn.init.normal_(self.token.weight, std=0.02)
        with torch.no_grad():
            self.token.weight[PAD].zero_()

    @property
    def device(self) -> torch.device:
        return self.pos.device

    def tokenize(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """ids [B, T] long and mask [B, T] bool (True on real tokens); T is the
        longest caption's length, at most max_len (longer captions are cut, EOS kept)."""
        if isinstance(captions, str):
            raise TypeError("captions must be a list of strings, not one string")
        rows = []
        for text in captions:
            body = self.tokenizer.ids(str(text))[: self.config.max_len - 2]
            rows.append([BOS, *body, EOS])
        width = max(len(r) for r in rows) if rows else 2
        ids = torch.full((len(rows), width), PAD, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        return ids.to(self.device), (ids != PAD).to(self.device)

    def encode(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        ids, mask = self.tokenize(captions)
        x = self.token(ids) + self.pos[: ids.shape[1]]
        for layer in self.layers:
            x = layer(x, mask)
        x = self.norm(x) * mask.unsqueeze(-1).to(x.dtype)  # padded slots are exactly zero
        return x, mask

    @staticmethod
    def pool(tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean over the real tokens."""
        m = mask.unsqueeze(-1).to(tokens.dtype)
        return (tokens * m).sum(1) / m.sum(1).clamp(min=1.0)

    def pooled(self, captions: list[str] | None = None, *, tokens: torch.Tensor | None = None,
               mask: torch.Tensor | None = None) -> torch.Tensor:
        """[B, D]: the masked mean of `encode(captions)`, or of given tokens and mask."""
        if tokens is None:
            if captions is None:
                raise ValueError("pooled() needs captions, or tokens and mask from encode()")
            tokens, mask = self.encode(captions)
        elif mask is None:
            mask = torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
        return self.pool(tokens, mask)
