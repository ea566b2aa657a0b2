"""MLP backbone: blocks of a causal token-mixing layer and a feed-forward MLP.

The seed's MLP was position-wise: each output saw only its own input token
(the previous patch) and its position embedding, a first-order Markov model.
Here each block first mixes tokens with a learned lower-triangular matrix
(MLP-Mixer's token mixing, made causal by the mask):

    y_t = W_proj (sum_{s <= t} M[t, s] x_s)

M starts as the running mean of the prefix. The feed-forward sublayer carries
every seed MLP option (23 activations, GLU, residual kind, norm).
`mlp_token_mixing: false` gives back the seed's position-wise MLP.

Sampling keeps the mixer's past inputs (one row of M per new token), so the
feed-forward layers never re-run on the prefix.
"""
from __future__ import annotations

import torch
from torch import nn

from raygen.models.seqimg.backbones.common import BackboneContext, History, Mixer, Stack, register_backbone


class CausalTokenMix(Mixer):
    def __init__(self, dim: int, max_len: int):
        super().__init__()
        mask = torch.tril(torch.ones(max_len, max_len))
        self.register_buffer("mask", mask, persistent=False)
        self.mix = nn.Parameter(mask / mask.sum(1, keepdim=True))  # causal mean of the prefix
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        t = x.shape[1]
        m = (self.mix[:t, :t] * self.mask[:t, :t]).to(x.dtype)
        return self.proj(torch.einsum("ts,bsd->btd", m, x))

    def step(self, x, state=None):
        past = History(x, self.mix.shape[0]) if state is None else state.append(x)
        t = past.len - 1
        m = (self.mix[t, : t + 1] * self.mask[t, : t + 1]).to(x.dtype)
        return self.proj(torch.einsum("s,bsd->bd", m, past.view())), past


@register_backbone("mlp")
def build_mlp(cfg, ctx: BackboneContext) -> Stack:
    mixers = [CausalTokenMix(cfg.dim, ctx.seq_len) if cfg.mlp_token_mixing else None for _ in range(cfg.depth)]
    return Stack(mixers, cfg)
