"""The position-wise feed-forward sublayer, plain or GLU, with any seed activation."""
from __future__ import annotations

import torch
from torch import nn

from raygen.models.layers.activations import activation_name, init_linear, make_activation


class FeedForward(nn.Module):
    """Linear -> activation -> Linear, or its GLU variant.

    GLU (seed: "type of activation" 1): the chosen activation gates a linear
    value, act(W_g x) * (W_v x). The input projection gets the activation's
    initialization (for GLU, its gate half; the value half gets Xavier).
    """

    def __init__(self, dim: int, hidden: int, activation: str | int = "gelu", *, glu: bool = False,
                 dropout: float = 0.0, out_dim: int | None = None):
        super().__init__()
        self.activation_name = activation_name(activation)
        self.glu = glu
        self.hidden = hidden
        self.inp = nn.Linear(dim, hidden * (2 if glu else 1))
        self.act = make_activation(self.activation_name)
        self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.out = nn.Linear(hidden, out_dim or dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.glu:
            gate, value = nn.Linear(self.inp.in_features, self.hidden), nn.Linear(self.inp.in_features, self.hidden)
            init_linear(gate, self.activation_name)
            nn.init.xavier_uniform_(value.weight)
            self.inp.weight.data.copy_(torch.cat([gate.weight.data, value.weight.data], dim=0))
            self.inp.bias.data.zero_()
        else:
            init_linear(self.inp, self.activation_name)
        nn.init.xavier_uniform_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x):
        h = self.inp(x)
        if self.glu:
            gate, value = h.chunk(2, dim=-1)
            h = self.act(gate) * value
        else:
            h = self.act(h)
        return self.out(self.drop(h))

