"""GRU backbone: each block's mixer is a one-layer GRU over the tokens.

The seed's GRU (a bare multi-layer nn.GRU on raw patch vectors) trained
"terribly"; inside pre-norm residual blocks with orthogonal recurrent weights
it trains like the LSTM. Sampling carries the hidden state per block: one GRU
step per new patch.
"""
from __future__ import annotations

from torch import nn

from raygen.models.seqimg.backbones.common import BackboneContext, Mixer, Stack, register_backbone


class GRUMixer(Mixer):
    def __init__(self, dim: int):
        super().__init__()
        self.rnn = nn.GRU(dim, dim, batch_first=True)
        for name, p in self.rnn.named_parameters():
            if name.startswith("weight_hh"):
                for i in range(3):  # per gate (reset, update, new)
                    nn.init.orthogonal_(p.data[i * dim:(i + 1) * dim])
            elif name.startswith("bias"):
                nn.init.zeros_(p)

    def forward(self, x):
        return self.rnn(x)[0]

    def step(self, x, state=None):
        y, state = self.rnn(x.unsqueeze(1), state)
        return y[:, 0], state


@register_backbone("gru")
def build_gru(cfg, ctx: BackboneContext) -> Stack:
    return Stack([GRUMixer(cfg.dim) for _ in range(cfg.depth)], cfg)
