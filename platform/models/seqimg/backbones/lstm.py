"""LSTM backbone: each block's mixer is a one-layer LSTM over the tokens.

Stacking single-layer LSTMs inside pre-norm residual blocks (rather than one
multi-layer nn.LSTM, as the seed did) lets the shared norm / residual /
feed-forward options apply, and keeps gradients flowing through depth.
Sampling carries (h, c) per block: one LSTM step per new patch.
"""
from __future__ import annotations

from torch import nn

from raygen.models.seqimg.backbones.common import BackboneContext, Mixer, Stack, register_backbone


class LSTMMixer(Mixer):
    def __init__(self, dim: int):
        super().__init__()
        self.rnn = nn.LSTM(dim, dim, batch_first=True)
        h = dim
        for name, p in self.rnn.named_parameters():
            if name.startswith("weight_hh"):
                for i in range(4):  # orthogonal recurrent weights per gate keep the state's scale over time
                    nn.init.orthogonal_(p.data[i * h:(i + 1) * h])
            elif name.startswith("bias"):
                nn.init.zeros_(p)
        # forget-gate bias 1 (Jozefowicz et al. 2015): remember by default early in training
        nn.init.ones_(self.rnn.bias_ih_l0.data[h:2 * h])

    def forward(self, x):
        return self.rnn(x)[0]

    def step(self, x, state=None):
        y, state = self.rnn(x.unsqueeze(1), state)
        return y[:, 0], state


@register_backbone("lstm")
def build_lstm(cfg, ctx: BackboneContext) -> Stack:
    return Stack([LSTMMixer(cfg.dim) for _ in range(cfg.depth)], cfg)
