"""Output heads: what a token predicts about the next patch.

Pixels are in [0, 1]. Patches fed into the model are "signed", 2x - 1 in
[-1, 1] (the seed's convention).

Each head: `forward(h [..., D])` -> its output, `loss(out, target)` ->
(loss, metrics), `sample(out, temperature, top_k, generator)` -> (pixels for
the image [..., P] in [0, 1], signed patch to feed back [..., P]),
`bits(out, target)` -> bits per sub-pixel or None.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from raygen.models.seqimg.sampling import CategoricalSampler, RegressionSampler

LEVELS = 256


class Head(nn.Module):
    def bits(self, out, target):
        return None


class RegressionHead(Head):
    """Predicts the signed next patch; L1 or L2 loss.

    Keeps a running per-value estimate of its error (RMSE for L2, mean absolute
    error for L1): the scale of the noise its sampler feeds back.
    """

    def __init__(self, dim: int, patch_dim: int, kind: str, momentum: float = 0.01):
        super().__init__()
        self.kind = kind
        self.momentum = momentum
        self.proj = nn.Linear(dim, patch_dim)
        nn.init.normal_(self.proj.weight, std=0.02)
        nn.init.zeros_(self.proj.bias)
        self.register_buffer("noise_scale", torch.full((patch_dim,), 0.1))

    def forward(self, h):
        return self.proj(h)

    def loss(self, out, target01):
        target = target01 * 2 - 1
        err = out - target
        loss = err.abs().mean() if self.kind == "l1" else err.pow(2).mean()
        if self.training and torch.is_grad_enabled():
            with torch.no_grad():
                flat = err.detach().reshape(-1, err.shape[-1]).to(self.noise_scale.dtype)
                now = flat.abs().mean(0) if self.kind == "l1" else flat.pow(2).mean(0).sqrt()
                self.noise_scale.lerp_(now, self.momentum)
        pixel_err = err.detach() / 2  # in [0, 1] pixel units
        return loss, {"mae": pixel_err.abs().mean(), "mse": pixel_err.pow(2).mean()}

    def sample(self, out, *, temperature=1.0, top_k=0, generator=None):
        feed = RegressionSampler(temperature, self.noise_scale.to(out.dtype), laplace=self.kind == "l1")(out, generator)
        return ((out + 1) / 2).clamp(0, 1), feed


class CategoricalHead(Head):
    """256 levels per sub-pixel, cross-entropy; sampled with temperature and top-k.
    The sub-pixels of one patch are independent given the prefix."""

    def __init__(self, dim: int, patch_dim: int):
        super().__init__()
        self.patch_dim = patch_dim
        self.proj = nn.Linear(dim, patch_dim * LEVELS)
        nn.init.normal_(self.proj.weight, std=0.02)  # starts near uniform: loss ~ ln 256
        nn.init.zeros_(self.proj.bias)

    def forward(self, h):
        return self.proj(h).unflatten(-1, (self.patch_dim, LEVELS))

    @staticmethod
    def levels(target01):
        return (target01 * (LEVELS - 1)).round().clamp(0, LEVELS - 1).long()

    def loss(self, out, target01):
        nats = F.cross_entropy(out.reshape(-1, LEVELS).float(), self.levels(target01).reshape(-1))
        return nats, {"bpd": nats.detach() / math.log(2)}

    def bits(self, out, target01):
        return F.cross_entropy(out.reshape(-1, LEVELS).float(), self.levels(target01).reshape(-1)) / math.log(2)

    def sample(self, out, *, temperature=1.0, top_k=0, generator=None):
        level = CategoricalSampler(temperature, top_k)(out, generator)
        pixels = level.to(out.dtype) / (LEVELS - 1)
        return pixels, pixels * 2 - 1


HEADS = {
    "regression_l1": lambda dim, p: RegressionHead(dim, p, "l1"),
    "regression_l2": lambda dim, p: RegressionHead(dim, p, "l2"),
    "categorical": CategoricalHead,
}
