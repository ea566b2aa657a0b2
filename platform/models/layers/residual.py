"""How a sublayer's output h joins its input x: residual kinds, DropPath, layer scale.

The seed's numbers: 0 none, 1 highway, 2 standard, 3 ReZero.
"""
from __future__ import annotations

import torch
from torch import nn


class DropPath(nn.Module):
    """Stochastic depth: in training, drop the whole branch for a random subset
    of samples and rescale the rest by 1/(1-p) so the expectation is unchanged."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = float(p)

    def forward(self, h):
        if self.p == 0.0 or not self.training:
            return h
        keep = 1.0 - self.p
        mask = torch.rand((h.shape[0],) + (1,) * (h.ndim - 1), device=h.device, dtype=h.dtype) < keep
        return h * mask.to(h.dtype) / keep

    def extra_repr(self) -> str:
        return f"p={self.p}"


class LayerScale(nn.Module):
    """Trainable per-channel scale on a branch, starting small (CaiT), so a deep
    stack starts close to the identity yet every channel can grow on its own."""

    def __init__(self, dim: int, init: float):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init)))

    def forward(self, h):
        return h * self.gamma


class Residual(nn.Module):
    """Base: `forward(x, h)` joins the input x and the branch output h."""

    uses_skip = True

    def __init__(self, dim: int):
        super().__init__()


class NoResidual(Residual):
    """Plain feed-forward: the branch output replaces the input."""

    uses_skip = False

    def forward(self, x, h):
        return h


class StandardResidual(Residual):
    def forward(self, x, h):
        return x + h


class ReZero(Residual):
    """x + gamma * h with gamma a trainable scalar starting at 0: the network
    starts as the identity and lets each layer in at its own pace."""

    def __init__(self, dim: int):
        super().__init__(dim)
        self.gamma = nn.Parameter(torch.zeros(1))

    def forward(self, x, h):
        return x + self.gamma * h


class Highway(Residual):
    """t * h + (1 - t) * x with the transform gate t = sigmoid(W x + b). The gate
    bias starts at -1 so layers first mostly carry their input (Srivastava et al.)."""

    def __init__(self, dim: int, gate_bias: float = -1.0):
        super().__init__(dim)
        self.gate = nn.Linear(dim, dim)
        nn.init.xavier_uniform_(self.gate.weight)
        nn.init.constant_(self.gate.bias, gate_bias)

    def forward(self, x, h):
        t = torch.sigmoid(self.gate(x))
        return t * h + (1.0 - t) * x


RESIDUALS: dict[str, type[Residual]] = {
    "none": NoResidual,
    "highway": Highway,
    "standard": StandardResidual,
    "rezero": ReZero,
}
RESIDUAL_NUMBERS: dict[int, str] = {0: "none", 1: "highway", 2: "standard", 3: "rezero"}


def residual_name(key: str | int) -> str:
    if isinstance(key, int) and not isinstance(key, bool):
        if key not in RESIDUAL_NUMBERS:
            raise ValueError(f"residual number {key} is not one of {RESIDUAL_NUMBERS}")
        return RESIDUAL_NUMBERS[key]
    if key not in RESIDUALS:
        raise ValueError(f"unknown residual '{key}'; choose one of: {', '.join(RESIDUALS)} (or its number 0-3)")
    return key


def make_residual(key: str | int, dim: int) -> Residual:
    return RESIDUALS[residual_name(key)](dim)


class Branch(nn.Module):
    """One residual sublayer's join: dropout, layer scale and DropPath on the
    branch output, then the residual kind. DropPath needs a skip path to fall
    back on, so it is off for residual 'none'."""

    def __init__(self, dim: int, residual: str | int = "standard", *, dropout: float = 0.0,
                 drop_path: float = 0.0, layer_scale: float | None = None):
        super().__init__()
        self.residual = make_residual(residual, dim)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.scale = LayerScale(dim, layer_scale) if layer_scale is not None else nn.Identity()
        self.drop_path = DropPath(drop_path if self.residual.uses_skip else 0.0)

    def forward(self, x, h):
        return self.residual(x, self.drop_path(self.scale(self.dropout(h))))
