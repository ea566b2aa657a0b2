"""Output activations and reconstruction losses of the renderer (seed 002)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

#: the output activation maps the decoder's last layer into image values
OUTPUT_ACTIVATIONS = {
    "none": lambda x: x,
    "tanh": lambda x: (torch.tanh(x) + 1) / 2,   # tanh's range moved onto the [0, 1] images
    "relu": F.relu,
    "celu": F.celu,
    "exp": torch.exp,                            # seed 002: "performed very poorly"
}


def value_smooth_l1(pred: torch.Tensor, target: torch.Tensor, beta: float = 0.1) -> torch.Tensor:
    """Smooth L1 scaled by the true image's value + 1: bright pixels (highlights)
    weigh up to twice as much, the seed's "more perceptual" loss."""
    return (F.smooth_l1_loss(pred, target, reduction="none", beta=beta) * (target + 1)).mean()


def render_loss(name: str, pred: torch.Tensor, target: torch.Tensor, beta: float = 0.1) -> torch.Tensor:
    """The configured loss, a mean over sub-pixels (so it does not grow with the image size)."""
    if name == "l1":
        return F.l1_loss(pred, target)
    if name == "l2":
        return F.mse_loss(pred, target)
    if name == "value_smooth_l1":
        return value_smooth_l1(pred, target, beta)
    raise ValueError(f"unknown loss {name!r}; use l1, l2 or value_smooth_l1")
