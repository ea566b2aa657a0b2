"""A k-means codebook over an image's P×P pixel patches, fitted without gradients.

    encode   image [B, C, H, W] -> P×P patches -> index of the nearest code, long [B, H/P, W/P]
    decode   indices -> the codes' pixels put back in place -> image

Fitting is mini-batch k-means with an exponential moving average (the "EMA"
update of VQ-VAE codebooks). Each step, every worker sums, per code, the
patches assigned to it, their count, their squared error and their outer
products (`fit_statistics`, additive over workers); the engine sums those over
workers and every rank applies the same totals (`apply_fit`):

    N_k <- decay·N_k + (1-decay)·n_k          running count (starts at 0)
    c_k <- (decay·N_k·c_k + (1-decay)·s_k) / N_k'

which moves code k towards the mean of its assigned patches with step size
(1-decay)·n_k / N_k'. Counts start at 0, so the first step sets each code to
the mean of the first batch's patches nearest to it (from seeded random
starting points) and early steps average like a running mean.

A code whose running count falls below `dead_below` of the average code's is
dead: it is re-seeded by splitting one of the worst-fit clusters (the ones with
the largest squared error in this batch) along that cluster's principal axis,
c ± σ·v. Everything it needs is in the summed statistics, so fitting on W
workers equals fitting on one worker that sees the W batches together.
"""
from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from raygen.models.base import DataInfo, Generator

# distances and outer products are computed in slices of at most this many elements
_SLICE_ELEMENTS = 1 << 22


class CodebookConfig(BaseModel):
    """Options of the `codebook` family (`model.options`)."""
    model_config = ConfigDict(extra="forbid")

    patch: int = Field(2, ge=1, le=64, description="side P of the square pixel patches; must divide the image's "
                                                   "height and width")
    codes: int = Field(256, ge=2, le=65536, description="number of codes K in the codebook")
    init: Literal["data"] = Field("data", description="data: the first fit step sets each code to the mean of the "
                                                      "first batch's patches nearest to its seeded random start")
    decay: float = Field(0.95, ge=0.0, lt=1.0, description="EMA decay of the running counts and sums; each code "
                                                           "moves (1-decay)·n/N of the way to its batch mean "
                                                           "(0 = plain k-means on every batch)")
    dead_below: float = Field(0.03, ge=0.0, lt=1.0, description="a code whose running count is below this fraction "
                                                                "of the average code's is re-seeded by splitting a "
                                                                "worst-fit cluster (0 = never)")
    seed: int = Field(0, ge=0, description="seed of the codes' random starting points")

    @classmethod
    def debug(cls, **overrides: Any) -> "CodebookConfig":
        """The tiny flavor used by tests and smoke runs."""
        return cls.model_validate({"patch": 2, "codes": 16, "decay": 0.8, **overrides})


class PatchCodebook(Generator):
    """Vector quantisation of pixel patches; `fit`, `encode`, `reconstruct`."""

    def __init__(self, config: CodebookConfig, data_info: DataInfo):
        super().__init__(data_info)
        channels, height, width = data_info.shape
        p = config.patch
        if height % p or width % p:
            common = [str(d) for d in range(1, min(height, width) + 1) if height % d == 0 and width % d == 0]
            raise ValueError(f"model.options.patch: {p} must divide the image size {height}x{width} "
                             f"(accepted: {', '.join(common)})")
        self.config = config
        self.condition_kind = "none"
        self.grid = (height // p, width // p)
        self.dim = channels * p * p
        start = torch.rand(config.codes, self.dim, generator=torch.Generator().manual_seed(config.seed))
        self.register_buffer("codebook", start)                                      # [K, C·P·P] in [0, 1]
        self.register_buffer("counts", torch.zeros(config.codes))                    # running count N_k
        self.register_buffer("fitted_steps", torch.zeros((), dtype=torch.long))

    # ---------------------------------------------------------------- patches
    def patchify(self, images: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] -> [B, H/P, W/P, C·P·P]."""
        c, h, w = self.data_info.shape
        if images.dim() != 4 or tuple(images.shape[1:]) != (c, h, w):
            raise ValueError(f"expected images [B, {c}, {h}, {w}], got {list(images.shape)}")
        p, (gh, gw) = self.config.patch, self.grid
        x = images.reshape(images.shape[0], c, gh, p, gw, p)
        return x.permute(0, 2, 4, 1, 3, 5).reshape(images.shape[0], gh, gw, self.dim)

    def unpatchify(self, patches: torch.Tensor) -> torch.Tensor:
        """[B, H/P, W/P, C·P·P] -> [B, C, H, W]."""
        c, h, w = self.data_info.shape
        p, (gh, gw) = self.config.patch, self.grid
        x = patches.reshape(patches.shape[0], gh, gw, c, p, p)
        return x.permute(0, 3, 1, 4, 2, 5).reshape(patches.shape[0], c, h, w)

    def _nearest(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Nearest code of each row of x [N, D] (float64): indices long [N] and squared distances [N].

        Distances from differences, not the |x|² - 2x·c + |c|² matrix product:
        each is then computed the same way whatever batch the patch sits in, so
        splitting a batch across workers cannot change an assignment."""
        codes = self.codebook.to(x.device, torch.float64)
        rows = max(1, _SLICE_ELEMENTS // codes.shape[0])
        index = torch.cat([torch.cdist(part, codes, compute_mode="donot_use_mm_for_euclid_dist").argmin(1)
                           for part in x.split(rows)]) if len(x) else torch.zeros(0, dtype=torch.long, device=x.device)
        return index, (x - codes[index]).pow(2).sum(-1)  # ties go to the lowest index

    # ---------------------------------------------------------------- encode / decode
    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images float [B, C, H, W] in [0, 1] -> code indices long [B, H/P, W/P]."""
        patches = self.patchify(images.to(self.codebook.device, torch.float64))
        index, _ = self._nearest(patches.reshape(-1, self.dim))
        return index.reshape(patches.shape[:3])

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Code indices long [B, H/P, W/P] -> images float [B, C, H, W] in [0, 1]."""
        k, (gh, gw) = self.config.codes, self.grid
        if latents.dim() != 3 or tuple(latents.shape[1:]) != (gh, gw):
            raise ValueError(f"expected code indices [B, {gh}, {gw}], got {list(latents.shape)}")
        if latents.is_floating_point() or latents.is_complex():
            raise ValueError(f"code indices must be integers, got {latents.dtype}")
        index = latents.to(self.codebook.device).long()
        if index.numel() and (index.min() < 0 or index.max() >= k):
            raise ValueError(f"code indices must lie in 0..{k - 1}, got {int(index.min())}..{int(index.max())}")
        return self.unpatchify(self.codebook[index]).float().clamp(0, 1)

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(images))

    # ---------------------------------------------------------------- fitting
    @torch.no_grad()
    def fit_statistics(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Per-code sums over this worker's patches (float64, additive over workers):
        count [K], sum [K, D], sse [K] (squared error to the current code), outer [K, D, D]."""
        x = self.patchify(batch["image"].to(self.codebook.device, torch.float64)).reshape(-1, self.dim)
        index, d2 = self._nearest(x)
        k, d = self.config.codes, self.dim
        zeros = dict(dtype=torch.float64, device=x.device)
        outer = torch.zeros(k, d * d, **zeros)  # index_add_ into 2-D is many times faster than into [K, D, D]
        rows = max(1, _SLICE_ELEMENTS // (d * d))
        for part, at in zip(x.split(rows), index.split(rows)):
            outer.index_add_(0, at, (part[:, :, None] * part[:, None, :]).reshape(-1, d * d))
        return {"count": torch.zeros(k, **zeros).index_add_(0, index, torch.ones_like(d2)),
                "sum": torch.zeros(k, d, **zeros).index_add_(0, index, x),
                "sse": torch.zeros(k, **zeros).index_add_(0, index, d2),
                "outer": outer.reshape(k, d, d)}

    @torch.no_grad()
    def apply_fit(self, stats: dict[str, torch.Tensor], step: int) -> dict[str, float]:
        """One mini-batch k-means step from the summed statistics. Returns the
        batch's metrics, measured with the codes it was assigned to: mse (per
        sub-pixel; also reported as the run's loss), codebook usage and
        perplexity, and how many codes were re-seeded."""
        from raygen.metrics.recon import codebook_metrics

        dev = self.codebook.device
        n, s, sse, outer = (stats[key].to(dev, torch.float64) for key in ("count", "sum", "sse", "outer"))
        total = float(n.sum())
        if total <= 0:
            raise ValueError("apply_fit got statistics of no patches: is the batch empty?")
        k = self.config.codes
        used = torch.repeat_interleave(torch.arange(k, device=dev), n.round().long())
        mse = float(sse.sum()) / (total * self.dim)
        metrics = {"loss": mse, "mse": mse, **codebook_metrics(used, k)}

        decay = self.config.decay
        codes, counts = self.codebook.double(), self.counts.double()
        new_counts = decay * counts + (1 - decay) * n
        moved = (decay * counts[:, None] * codes + (1 - decay) * s) / new_counts.clamp_min(1e-12)[:, None]
        codes = torch.where(new_counts[:, None] > 0, moved, codes)

        reseeded = 0
        if self.config.dead_below > 0:
            dead = torch.nonzero(new_counts < self.config.dead_below * new_counts.mean()).flatten()
            reseeded = self._split_worst(codes, new_counts, dead, n, s, outer)
        self.codebook.copy_(codes.clamp(0, 1).to(self.codebook.dtype))
        self.counts.copy_(new_counts.to(self.counts.dtype))
        self.fitted_steps += 1
        metrics["codes_reseeded"] = float(reseeded)
        return metrics

    def _split_worst(self, codes: torch.Tensor, counts: torch.Tensor, dead: torch.Tensor, n: torch.Tensor,
                     s: torch.Tensor, outer: torch.Tensor) -> int:
        """Move dead codes onto the worst-fit clusters of this batch (in place).

        The clusters with the largest within-cluster squared error are split
        along their principal axis: the cluster's code goes to c - σ·v and the
        dead code to c + σ·v (σ² the largest eigenvalue of the cluster's
        covariance, v its eigenvector), and they share the running count."""
        if dead.numel() == 0:
            return 0
        is_dead = torch.zeros_like(counts, dtype=torch.bool)
        is_dead[dead] = True
        mean = s / n.clamp_min(1)[:, None]
        cov = outer / n.clamp_min(1)[:, None, None] - mean[:, :, None] * mean[:, None, :]
        spread = n * cov.diagonal(dim1=1, dim2=2).sum(-1)  # within-cluster squared error
        candidate = (n >= 2) & ~is_dead & (spread > 1e-9 * float(spread.max().clamp_min(1e-30)))
        order = torch.argsort(torch.where(candidate, spread, torch.full_like(spread, -1.0)), descending=True,
                              stable=True)
        worst = order[:min(int(candidate.sum()), dead.numel())]
        if worst.numel() == 0:
            return 0
        values, vectors = torch.linalg.eigh(cov[worst])
        sigma = values[:, -1].clamp_min(0).sqrt()
        axis = vectors[:, :, -1]
        # an eigenvector's sign is arbitrary: fix it so its largest entry is positive
        pick = axis.abs().argmax(1, keepdim=True)
        axis = axis * torch.sign(axis.gather(1, pick))
        into = dead[:worst.numel()]
        centre = codes[worst]
        codes[into] = centre + sigma[:, None] * axis
        codes[worst] = centre - sigma[:, None] * axis
        counts[into] = counts[worst] / 2
        counts[worst] = counts[worst] / 2
        return int(worst.numel())


def build_codebook(config: CodebookConfig, data_info: DataInfo, components=None) -> PatchCodebook:
    return PatchCodebook(config, data_info)
