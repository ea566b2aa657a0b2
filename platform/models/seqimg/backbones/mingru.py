"""minGRU backbone (Feng et al., "Were RNNs All We Needed?", 2024; the seed used
lucidrains' version adapted to patches).

A minGRU's gate and candidate depend on the input only, never on the previous
state:

    z_t = sigmoid(W_z x_t)        h~_t = g(W_h x_t)
    h_t = (1 - z_t) * h_{t-1} + z_t * h~_t,     h_{-1} = 0

so training runs all positions at once with a parallel scan (Heinsen's
log-space cumulative sum: log h_t = a*_t + logcumsumexp(log v - a*)_t with
a* = cumsum log(1 - z)), and sampling runs the recurrence one step at a time
from the carried h. g(x) = x + 0.5 for x >= 0, sigmoid(x) below keeps h
positive, which is what lets the scan work in log space.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from raygen.models.seqimg.backbones.common import BackboneContext, Mixer, Stack, register_backbone


def g(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x >= 0, x + 0.5, torch.sigmoid(x))


def log_g(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x >= 0, (F.relu(x) + 0.5).log(), -F.softplus(-x))


def heinsen_scan_log(log_coeffs: torch.Tensor, log_values: torch.Tensor) -> torch.Tensor:
    """h_t = sum_{s<=t} (prod_{s<r<=t} coeff_r) * value_s, computed in log space."""
    a_star = log_coeffs.cumsum(dim=1)
    return (a_star + (log_values - a_star).logcumsumexp(dim=1)).exp()


class MinGRUMixer(Mixer):
    def __init__(self, dim: int, expand: float = 1.5):
        super().__init__()
        inner = max(1, int(round(dim * expand)))
        self.to_hidden_and_gate = nn.Linear(dim, 2 * inner)
        self.to_out = nn.Linear(inner, dim)

    def forward(self, x):
        hidden, gate = self.to_hidden_and_gate(x).chunk(2, dim=-1)
        if gate.dtype in (torch.float16, torch.bfloat16):  # the log-space scan needs fp32's range and precision
            hidden, gate = hidden.float(), gate.float()
        log_coeffs = -F.softplus(gate)            # log(1 - z)
        log_values = -F.softplus(-gate) + log_g(hidden)  # log(z * g(h~))
        return self.to_out(heinsen_scan_log(log_coeffs, log_values).to(x.dtype))

    def step(self, x, state=None):
        hidden, gate = self.to_hidden_and_gate(x).chunk(2, dim=-1)
        z = torch.sigmoid(gate)
        h = g(hidden) * z if state is None else torch.lerp(state, g(hidden), z)
        return self.to_out(h), h


@register_backbone("mingru")
def build_mingru(cfg, ctx: BackboneContext) -> Stack:
    return Stack([MinGRUMixer(cfg.dim, cfg.mingru_expand) for _ in range(cfg.depth)], cfg)
