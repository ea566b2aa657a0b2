"""Causal convnet: 1-D convolutions over the token sequence, padded on the
left only, so output t sees tokens t - (k-1)*d .. t. Dilations double per
layer (1, 2, 4, ...; WaveNet) unless `conv_dilation: constant`, so the
receptive field grows exponentially with depth.

Each layer also adds a projection of the start token (position 0) to every
output: the start token holds the label or caption, and this WaveNet-style
global conditioning lets it reach positions beyond the receptive field.

Sampling keeps each layer's last (k-1)*d inputs (and the start token) in a
buffer: one kernel application per new patch.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from raygen.models.seqimg.backbones.common import BackboneContext, Mixer, Stack, register_backbone


class CausalConv(Mixer):
    def __init__(self, dim: int, kernel: int, dilation: int):
        super().__init__()
        self.kernel = kernel
        self.dilation = dilation
        self.conv = nn.Conv1d(dim, dim, kernel, dilation=dilation)
        self.cond = nn.Linear(dim, dim, bias=False)
        nn.init.zeros_(self.cond.weight)  # global conditioning starts off, grows if useful

    @property
    def span(self) -> int:
        return (self.kernel - 1) * self.dilation

    def forward(self, x):
        y = self.conv(F.pad(x.transpose(1, 2), (self.span, 0))).transpose(1, 2)
        return y + self.cond(x[:, :1])

    def step(self, x, state=None):
        if state is None:  # zeros = the left padding of forward
            state = (x.new_zeros(x.shape[0], x.shape[1], self.span), x)
        past, first = state
        window = torch.cat([past, x.unsqueeze(-1)], dim=-1)          # [B, D, span + 1]
        taps = window[:, :, :: self.dilation]                         # the k inputs the kernel sees
        y = torch.einsum("bik,oik->bo", taps, self.conv.weight) + self.conv.bias
        return y + self.cond(first), (window[:, :, 1:], first)


@register_backbone("convnet")
def build_convnet(cfg, ctx: BackboneContext) -> Stack:
    dilations = [2 ** i if cfg.conv_dilation == "exponential" else 1 for i in range(cfg.depth)]
    return Stack([CausalConv(cfg.dim, cfg.conv_kernel, d) for d in dilations], cfg)
