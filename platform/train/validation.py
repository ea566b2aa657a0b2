"""Validation loss and bits/dim of a model over batches (training eval and `raygen eval`)."""
from __future__ import annotations

from typing import Any, Iterable

import torch

from raygen.train.strategy import batch_rows, batch_to_device


@torch.no_grad()
def validation_sums(model, batches: Iterable[dict[str, Any]]) -> torch.Tensor:
    """[Σ loss·n, Σ bits/dim·n, Σ n] over the batches: sums, so workers can all-reduce them."""
    loss, bpd_total, count = 0.0, 0.0, 0
    first = next(iter(model.parameters()), None)
    device = first.device if first is not None else torch.device("cpu")
    for batch in batches:
        batch = batch_to_device(batch, device)
        n = batch_rows(batch)
        loss += float(model.training_step(batch)["loss"]) * n
        bpd = model.bits_per_dim(batch)
        if bpd is not None:
            bpd_total += float(bpd) * n
        count += n
    return torch.tensor([loss, bpd_total, float(count)], dtype=torch.float64)


def validation_metrics(sums: torch.Tensor) -> dict[str, float]:
    metrics: dict[str, float] = {}
    if sums[2] > 0:
        metrics["val_loss"] = float(sums[0] / sums[2])
        if sums[1] != 0:  # families without a likelihood report none
            metrics["val_bits_per_dim"] = float(sums[1] / sums[2])
    return metrics
