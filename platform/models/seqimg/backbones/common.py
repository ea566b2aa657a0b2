"""What every seqimg backbone shares: the interface, the registry, the block.

A backbone maps the token sequence to one output per token, causally:

    forward(x [B, T, D]) -> [B, T, D]            teacher forcing, output t sees x[:, :t+1]
    step(x_t [B, D], state) -> (y_t [B, D], state)  one new token; state None at t = 0

`step` run over x[:, 0], x[:, 1], ... gives exactly `forward(x)`; tests check it.

Every backbone is a `Stack` of `Block`s: a pre-norm *mixer* sublayer (the part
that looks at other tokens: attention, LSTM, scan, convolution, graph
messages, token-mixing MLP) and a pre-norm feed-forward sublayer, each joined
to its input by the configured residual kind. The mixer is what a backbone
file defines; the options norm / residual / activation / GLU / dropout /
DropPath / layer scale apply to every backbone the same way.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from raygen.models.layers.feedforward import FeedForward
from raygen.models.layers.norms import make_norm
from raygen.models.layers.residual import Branch


@dataclass(frozen=True)
class BackboneContext:
    """What a backbone may know about the sequence it models."""
    seq_len: int                        # tokens: the start token plus all patches but the last
    grid: tuple[int, int]               # patch grid (rows, cols)
    positions: tuple[tuple[int, int], ...]  # grid (row, col) of patch i, in sequence order


class Mixer(nn.Module):
    """A sublayer that looks at other tokens. Subclasses define forward and step."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def step(self, x: torch.Tensor, state: Any) -> tuple[torch.Tensor, Any]:
        raise NotImplementedError


class Block(nn.Module):
    def __init__(self, mixer: Mixer | None, cfg, *, drop_path: float = 0.0):
        super().__init__()
        dim = cfg.dim
        join = dict(dropout=cfg.dropout_rate, drop_path=drop_path, layer_scale=cfg.layer_scale_init)
        self.mixer = mixer
        if mixer is not None:
            self.norm1 = make_norm(cfg.norm, dim)
            self.join1 = Branch(dim, cfg.residual, **join)
        self.ff = None
        if cfg.ff_mult > 0:
            self.norm2 = make_norm(cfg.norm, dim)
            self.ff = FeedForward(dim, max(1, int(round(cfg.ff_mult * dim))), cfg.activation, glu=cfg.glu,
                                  dropout=cfg.dropout_rate)
            self.join2 = Branch(dim, cfg.residual, **join)

    def forward(self, x):
        if self.mixer is not None:
            x = self.join1(x, self.mixer(self.norm1(x)))
        if self.ff is not None:
            x = self.join2(x, self.ff(self.norm2(x)))
        return x

    def step(self, x, state):
        s = state or {}
        new = {}
        if self.mixer is not None:
            h, new["n1"] = self.norm1.step(x, s.get("n1"))
            h, new["mix"] = self.mixer.step(h, s.get("mix"))
            x = self.join1(x, h)
        if self.ff is not None:
            h, new["n2"] = self.norm2.step(x, s.get("n2"))
            x = self.join2(x, self.ff(h))
        return x, new


class Stack(nn.Module):
    """Blocks and a final norm. DropPath grows linearly from 0 to the configured rate."""

    def __init__(self, mixers: list[Mixer | None], cfg):
        super().__init__()
        n = len(mixers)
        rates = [cfg.drop_path_rate * i / (n - 1) if n > 1 else cfg.drop_path_rate for i in range(n)]
        self.blocks = nn.ModuleList(Block(m, cfg, drop_path=r) for m, r in zip(mixers, rates))
        self.norm = make_norm(cfg.norm, cfg.dim)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def step(self, x, state=None):
        states = state or [None] * (len(self.blocks) + 1)
        new = []
        for block, s in zip(self.blocks, states):
            x, s = block.step(x, s)
            new.append(s)
        x, s = self.norm.step(x, states[-1])
        new.append(s)
        return x, new


class History:
    """A mixer's past inputs for cached sampling, preallocated to the sequence
    length: each step writes one row instead of copying the whole prefix."""

    __slots__ = ("buf", "len")

    def __init__(self, first: torch.Tensor, max_len: int):
        self.buf = first.new_empty(first.shape[0], max_len, *first.shape[1:])
        self.buf[:, 0] = first
        self.len = 1

    def append(self, x: torch.Tensor) -> "History":
        if self.len >= self.buf.shape[1]:
            raise ValueError(f"the cache holds {self.buf.shape[1]} tokens, the sequence length it was built for")
        self.buf[:, self.len] = x
        self.len += 1
        return self

    def view(self) -> torch.Tensor:
        return self.buf[:, : self.len]


BACKBONES: dict[str, Callable[[Any, BackboneContext], Stack]] = {}


def register_backbone(name: str):
    """Decorator: `@register_backbone("lstm")` on a `build(cfg, ctx) -> Stack`."""
    def deco(build):
        if name in BACKBONES:
            raise ValueError(f"backbone '{name}' is registered twice")
        BACKBONES[name] = build
        return build
    return deco


def build_backbone(cfg, ctx: BackboneContext) -> Stack:
    if cfg.backbone not in BACKBONES:
        raise ValueError(f"unknown backbone '{cfg.backbone}'; registered: {', '.join(sorted(BACKBONES))}")
    return BACKBONES[cfg.backbone](cfg, ctx)
