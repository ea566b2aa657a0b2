"""Best-of-n: generate n images for a prompt, keep the k the scorer likes best."""
from __future__ import annotations

import torch

from raygen.metrics.errors import MetricsError


class BestOfN:
    """Rerank candidates with an `ImageTextScorer` (or anything with
    `similarity(images, text) -> [n]`). Ties keep the generation order."""

    def __init__(self, scorer):
        self.scorer = scorer

    def rerank(self, prompt: str, images: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> (images_topk [k, C, H, W], scores_topk [k], order [k]): the best k, best
        first; scores are 100 * cosine (unclamped); order indexes into `images`."""
        n = images.shape[0]
        if not 1 <= k <= n:
            raise MetricsError(f"k must be between 1 and the number of candidates {n} (got {k})")
        scores = torch.as_tensor(self.scorer.similarity(images, prompt)).float().cpu().view(-1)
        if scores.numel() != n:
            raise MetricsError(f"scorer returned {scores.numel()} scores for {n} images")
        order = torch.sort(scores, descending=True, stable=True).indices[:k]
        return images[order.to(images.device)], scores[order], order
