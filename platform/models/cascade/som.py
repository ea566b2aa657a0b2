"""Stage 3: self-organizing maps over the latent map's patches (family `som`).

The latent map [C, h, w] is cut into P_H x P_W patches, each flattened to a
vector of C·P_H·P_W values; a map of K units (laid out on a near-square 2-D
grid) quantises each vector to its best-matching unit (BMU, the nearest by
Euclidean distance). One map per cascade level, coarse (large patches) to
fine, plus a whole-map one (one patch = the whole map) whose unit is the base
model's conditional token.

Fitting is the batch SOM, so it runs from streamed data on any number of
workers: each worker sums, per unit, the vectors whose BMU it is and their
count (`fit_statistics`, additive); the engine adds them over workers, and
every rank applies the same update (`apply_fit`), at step t

    target_k = Σ_j h_jk(t)·S_j / Σ_j h_jk(t)·n_j      h_jk = exp(-d_grid(j, k)² / 2σ(t)²)
    w_k     <- w_k + lr(t)·(target_k - w_k)
    σ(t)     = max(neighbourhood_end, σ_0 · 2^(-t / neighbourhood_step))    σ_0 = half the grid's longer side
    lr(t)    = max(min_lr, lr · 2^(-t / lr_half_life))

so the neighbourhood shrinks and the learning rate decays on a schedule of
the step alone (a resumed fit continues the schedule). With a neighbourhood
of ~0 the update is k-means (each unit moves to the mean of its own vectors).

Pruning (the seed's prune_codebook.py): from step `count_from` on, the units
are frozen and their use is counted; units used fewer than `prune_threshold`
times are pruned. Tokens are the kept units' compact indices 0..K'-1, and a
pruned unit's vectors go to the nearest kept unit (`remap` maps every old unit
to its new token), so a kept unit's token still decodes to the same vector.
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from raygen.models.base import DataInfo, Generator
from raygen.models.cascade.autoencoder import latent_shape_of
from raygen.models.cascade.config import SOMConfig

# distances are computed in slices of at most this many elements
_SLICE_ELEMENTS = 1 << 22


def grid_shape(k: int) -> tuple[int, int]:
    """A near-square rows x cols layout of k units (rows the largest divisor of k not above sqrt(k))."""
    rows = max(d for d in range(1, int(math.isqrt(k)) + 1) if k % d == 0)
    return rows, k // rows


def patchify(x: torch.Tensor, ph: int, pw: int) -> torch.Tensor:
    """[B, C, h, w] -> [B, (h/ph)·(w/pw), C·ph·pw], patches in row-major order."""
    b, c, h, w = x.shape
    x = x.reshape(b, c, h // ph, ph, w // pw, pw).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // ph) * (w // pw), c * ph * pw)


def unpatchify(v: torch.Tensor, shape: tuple[int, int, int], ph: int, pw: int) -> torch.Tensor:
    """[B, n, C·ph·pw] -> [B, C, h, w], the inverse of `patchify`."""
    c, h, w = shape
    b = v.shape[0]
    x = v.reshape(b, h // ph, w // pw, c, ph, pw).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c, h, w)


class SOMMap(nn.Module):
    """One self-organizing map of `k` units of `dim` values on a 2-D grid."""

    def __init__(self, k: int, dim: int, *, patch: tuple[int, int], lr: float, neighbourhood_step: int,
                 generator: torch.Generator, init_scale: float):
        super().__init__()
        self.k, self.dim, self.patch = k, dim, patch
        self.lr, self.neighbourhood_step = lr, neighbourhood_step
        rows, cols = grid_shape(k)
        self.sigma0 = max(rows, cols) / 2
        at = torch.arange(k)
        coords = torch.stack([at // cols, at % cols], 1).double()
        self.register_buffer("grid_d2", torch.cdist(coords, coords).pow(2), persistent=False)  # [K, K]
        self.register_buffer("weight", torch.randn(k, dim, generator=generator, dtype=torch.float64) * init_scale)
        self.register_buffer("usage", torch.zeros(k, dtype=torch.float64))     # counted from `count_from` on
        self.register_buffer("kept", torch.ones(k, dtype=torch.bool))          # not pruned
        self.register_buffer("remap", torch.arange(k))                         # unit -> token (compact index)

    # ------------------------------------------------------------ schedules
    def sigma(self, step: int, end: float) -> float:
        """Neighbourhood radius (grid units) at fit step `step` (1-based)."""
        return max(end, self.sigma0 * 0.5 ** ((step - 1) / self.neighbourhood_step))

    def rate(self, step: int, half_life: int, floor: float) -> float:
        return max(floor, self.lr * 0.5 ** ((step - 1) / half_life))

    def neighbourhood(self, sigma: float) -> torch.Tensor:
        """h [K, K]: how much unit j's vectors pull unit k (1 on the diagonal)."""
        return torch.exp(-self.grid_d2 / (2 * max(sigma, 1e-3) ** 2))

    # ------------------------------------------------------------ matching
    def bmu(self, x: torch.Tensor, units: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Best-matching unit of each row of x [N, D] among `units` (default all): unit indices long [N] and
        squared distances [N]. Distances from differences (not the |x|²-2x·w+|w|² product), so a vector's BMU
        does not depend on the batch it sits in; ties go to the lowest index."""
        w = self.weight if units is None else self.weight[units]
        x = x.to(w.device, torch.float64)
        if len(x) == 0:
            return torch.zeros(0, dtype=torch.long, device=x.device), torch.zeros(0, dtype=torch.float64)
        rows = max(1, _SLICE_ELEMENTS // max(1, w.shape[0]))
        index = torch.cat([torch.cdist(part, w, compute_mode="donot_use_mm_for_euclid_dist").argmin(1)
                           for part in x.split(rows)])
        d2 = (x - w[index]).pow(2).sum(-1)
        return (index if units is None else units[index]), d2

    def statistics(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """count [K], sum [K, D], sse [K] of the vectors x [N, D] by their BMU (float64, additive)."""
        index, d2 = self.bmu(x)
        x = x.to(self.weight.device, torch.float64)
        z = dict(dtype=torch.float64, device=x.device)
        return {"count": torch.zeros(self.k, **z).index_add_(0, index, torch.ones_like(d2)),
                "sum": torch.zeros(self.k, self.dim, **z).index_add_(0, index, x),
                "sse": torch.zeros(self.k, **z).index_add_(0, index, d2)}

    # ------------------------------------------------------------ fitting
    @torch.no_grad()
    def update(self, count: torch.Tensor, total: torch.Tensor, sigma: float, lr: float) -> None:
        """One batch-SOM step from summed statistics."""
        h = self.neighbourhood(sigma)
        num, den = h @ total, h @ count
        target = num / den.clamp_min(1e-12)[:, None]
        moved = self.weight + lr * (target - self.weight)
        self.weight.copy_(torch.where(den[:, None] > 1e-12, moved, self.weight))

    @torch.no_grad()
    def prune(self, threshold: int) -> torch.Tensor:
        """Keep the units used at least `threshold` times (the most used one always), and map every unit to its
        token: a kept unit's compact index, a pruned one's nearest kept unit's. Returns the remap [K]."""
        kept = self.usage >= threshold
        if not kept.any():
            kept[int(self.usage.argmax())] = True
        units = torch.nonzero(kept).flatten()
        nearest, _ = self.bmu(self.weight, units)
        compact = torch.full((self.k,), -1, dtype=torch.long, device=kept.device)
        compact[units] = torch.arange(len(units), device=kept.device)
        self.kept.copy_(kept)
        self.remap.copy_(compact[nearest])
        return self.remap.clone()

    # ------------------------------------------------------------ tokens
    @property
    def units(self) -> torch.Tensor:
        """token -> unit index, long [K']."""
        return torch.nonzero(self.kept).flatten()

    @property
    def vocab(self) -> int:
        return int(self.kept.sum())

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Vectors [..., D] -> tokens long [...] (the BMU among the kept units, as its compact index)."""
        index, _ = self.bmu(x.reshape(-1, self.dim), None if bool(self.kept.all()) else self.units)
        return self.remap[index].reshape(x.shape[:-1])

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """Tokens long [...] -> vectors float32 [..., D]."""
        tokens = tokens.to(self.weight.device).long()
        vocab = self.vocab
        if tokens.numel() and (tokens.min() < 0 or tokens.max() >= vocab):
            raise ValueError(f"tokens must lie in 0..{vocab - 1}, got {int(tokens.min())}..{int(tokens.max())}")
        return self.weight[self.units[tokens]].float()


class SOMCodebooks(Generator):
    """The codebooks of every cascade level (and the whole-map one); capabilities fit, encode.

    Its data is the latent map [C, h, w] (a latent dataset's rows, "latent"; a batch with "image" is read as
    latent maps too). `encode`/`decode` use the finest level; the cascade uses `tokens` and `decode_level`."""

    def __init__(self, config: SOMConfig, data_info: DataInfo, components: dict | None = None):
        super().__init__(data_info)
        c, h, w = data_info.shape
        self.config = config
        self.condition_kind = "none"
        components = dict(components or {})
        if components:
            made = latent_shape_of(components["autoencoder"])
            if made != (c, h, w):
                raise ValueError(f"model.components.autoencoder: its latent map is {list(made)} but this data is "
                                 f"{[c, h, w]}; fit the codebooks on that autoencoder's latents")
            self.attach_components(components)
        g = torch.Generator().manual_seed(config.seed)
        maps = []
        for i, lv in enumerate(config.levels):
            if h % lv.patch_H or w % lv.patch_W:
                raise ValueError(f"model.options.levels.{i}: patch {lv.patch_H}x{lv.patch_W} must divide the latent "
                                 f"map {h}x{w}")
            maps.append(SOMMap(lv.num_embeddings, c * lv.patch_H * lv.patch_W, patch=(lv.patch_H, lv.patch_W),
                               lr=lv.lr, neighbourhood_step=lv.neighbourhood_step, generator=g,
                               init_scale=config.init_scale))
        sizes = [(h // m.patch[0]) * (w // m.patch[1]) for m in maps]
        if sizes != sorted(sizes):
            raise ValueError(f"model.options.levels: patches must go from coarse to fine (tokens per level {sizes})")
        self.levels = nn.ModuleList(maps)
        cond = config.condition
        self.whole = None if cond is None else SOMMap(cond.num_embeddings, c * h * w, patch=(h, w), lr=cond.lr,
                                                      neighbourhood_step=cond.neighbourhood_step, generator=g,
                                                      init_scale=config.init_scale)
        self.latent_shape = (c, h, w)

    # ------------------------------------------------------------ what the cascade reads
    def named_maps(self) -> list[tuple[str, SOMMap]]:
        out = [(f"level{i}", m) for i, m in enumerate(self.levels)]
        return out + ([("condition", self.whole)] if self.whole is not None else [])

    @property
    def vocab_sizes(self) -> list[int]:
        return [m.vocab for m in self.levels]

    def grid(self, level: int) -> tuple[int, int]:
        ph, pw = self.levels[level].patch
        return self.latent_shape[1] // ph, self.latent_shape[2] // pw

    def _maps(self, latents: torch.Tensor) -> torch.Tensor:
        if latents.dim() != 4 or tuple(latents.shape[1:]) != self.latent_shape:
            raise ValueError(f"expected latent maps [B, {', '.join(map(str, self.latent_shape))}], "
                             f"got {list(latents.shape)}")
        return latents.to(self.levels[0].weight.device, torch.float64)

    @torch.no_grad()
    def tokens(self, latents: torch.Tensor) -> list[torch.Tensor]:
        """Latent maps [B, C, h, w] -> one long [B, n_l] per level, row-major over its patch grid."""
        x = self._maps(latents)
        return [m.encode(patchify(x, *m.patch)) for m in self.levels]

    @torch.no_grad()
    def cond_tokens(self, latents: torch.Tensor) -> torch.Tensor:
        """Latent maps -> the whole-map codebook's token, long [B]."""
        if self.whole is None:
            raise ValueError("these codebooks have no whole-map codebook (model.options.condition is null)")
        return self.whole.encode(self._maps(latents).reshape(latents.shape[0], -1))

    @torch.no_grad()
    def decode_level(self, level: int, tokens: torch.Tensor) -> torch.Tensor:
        """Tokens long [B, n_l] of `level` -> the quantised latent map float32 [B, C, h, w]."""
        m = self.levels[level]
        return unpatchify(m.decode(tokens), self.latent_shape, *m.patch)

    @torch.no_grad()
    def decode_condition(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.whole.decode(tokens).reshape(-1, *self.latent_shape)

    # ------------------------------------------------------------ capability encode (the finest level)
    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Latent maps [B, C, h, w] -> the finest level's tokens long [B, h/P_H, w/P_W]."""
        return self.tokens(images)[-1].reshape(images.shape[0], *self.grid(len(self.levels) - 1))

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """The finest level's tokens [B, h/P_H, w/P_W] -> quantised latent maps [B, C, h, w]."""
        return self.decode_level(len(self.levels) - 1, latents.reshape(latents.shape[0], -1))

    # ------------------------------------------------------------ capability fit
    @torch.no_grad()
    def fit_statistics(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Per map: count, sum, sse by BMU; with an autoencoder component also the squared error of the
        decoded finest quantised map against the decoded latent map (for the PSNR metric)."""
        x = self._maps(batch["latent"] if "latent" in batch else batch["image"])
        stats = {}
        for name, m in self.named_maps():
            vectors = x.reshape(x.shape[0], -1) if m is self.whole else patchify(x, *m.patch).reshape(-1, m.dim)
            stats.update({f"{name}.{k}": v for k, v in m.statistics(vectors).items()})
        if getattr(self, "components", None) is not None and "autoencoder" in self.components:
            ae = self.components["autoencoder"]
            reference = ae.decode(x.float())
            for i, tokens in enumerate(self.tokens(x)):
                quantised = ae.decode(self.decode_level(i, tokens))
                stats[f"level{i}.psnr_sse"] = (quantised - reference).double().pow(2).sum().reshape(1)
            stats["psnr_n"] = torch.tensor([float(reference.numel())], dtype=torch.float64)
        return stats

    @torch.no_grad()
    def apply_fit(self, stats: dict[str, torch.Tensor], step: int) -> dict[str, float]:
        """One batch-SOM step of every map (or, from `count_from` on, counting and pruning). Metrics per map:
        usage, perplexity, dead units (no vector this step), quantisation error (per value), PSNR."""
        from raygen.metrics.recon import codebook_metrics

        cfg = self.config
        counting = cfg.count_from is not None and step >= cfg.count_from
        metrics: dict[str, float] = {}
        loss = 0.0
        for name, m in self.named_maps():
            dev = m.weight.device
            count, total, sse = (stats[f"{name}.{k}"].to(dev, torch.float64) for k in ("count", "sum", "sse"))
            n = float(count.sum())
            if n <= 0:
                raise ValueError("apply_fit got statistics of no vectors: is the batch empty?")
            qerr = float(sse.sum()) / (n * m.dim)
            used = torch.repeat_interleave(torch.arange(m.k, device=dev), count.round().long())
            cb = codebook_metrics(used, m.k)
            metrics.update({f"{name}_qerr": qerr, f"{name}_usage": cb["codebook_usage"],
                            f"{name}_perplexity": cb["codebook_perplexity"],
                            f"{name}_dead": float((count == 0).sum())})
            loss += qerr
            if counting:
                m.usage += count
                if cfg.prune_threshold:
                    m.prune(cfg.prune_threshold)
                metrics[f"{name}_kept"] = float(m.vocab)
            else:
                sigma = m.sigma(step, cfg.neighbourhood_end)
                m.update(count, total, sigma, m.rate(step, cfg.lr_half_life, cfg.min_lr))
                metrics[f"{name}_sigma"] = sigma
        if "psnr_n" in stats:
            pixels = float(stats["psnr_n"].sum())
            for i in range(len(self.levels)):
                mse = float(stats[f"level{i}.psnr_sse"].sum()) / pixels
                metrics[f"level{i}_psnr"] = -10 * math.log10(max(mse, 1e-10))
        metrics["loss"] = loss
        return metrics


def build_codebooks(config: SOMConfig, data_info: DataInfo, components=None) -> SOMCodebooks:
    return SOMCodebooks(config, data_info, components)
