"""Losses of seed 001: L1 or L2 reconstruction, and the batch std/mean constraint on the codes."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def reconstruction_loss(kind: str, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    if kind == "l1":
        return F.l1_loss(output, target)
    if kind == "l2":
        return F.mse_loss(output, target)
    raise ValueError(f"loss must be 'l1' or 'l2', got {kind!r}")


def code_constraint(codes: torch.Tensor, target_std: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """(|target_std - std over the batch of each code dimension, averaged|, |mean of all codes|).

    The seed's `(.5 - feature_batch.std(0).mean()).abs()` and `feature_batch.mean().abs()`: it pulls the
    codes towards mean 0 and std `target_std`, so codes drawn from N(0, target_std²) decode to images."""
    if codes.shape[0] < 2:
        raise ValueError("the code constraint needs at least 2 codes in a batch (a std over one is undefined)")
    return (target_std - codes.std(0).mean()).abs(), codes.mean().abs()
