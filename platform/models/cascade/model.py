"""The cascade generator (family `cascade`): base transformer + refiners over frozen codebooks and autoencoder.

    components  autoencoder (cascade_ae, or any family with `encode`)   image <-> latent map
                codebooks   (som)                                       latent map <-> tokens per level
    train       latent map (a latent dataset's "latent", or the autoencoder's encoding of "image")
                -> tokens of every level and the whole-map token -> the base's and every refiner's
                next-token cross-entropy (teacher forcing; the refiner's encoder reads the true
                previous level). The levels have separate weights, so one run trains them all as
                separate runs would (`train_levels` picks some).
    sample      base (cond token, then level 0) -> refiner 1 -> ... -> the last level's tokens
                -> codebook lookup -> autoencoder decoder -> image

Each level is decoded by raygen.models.cascade.beam with its own settings.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from raygen.models.base import DataInfo, Generator
from raygen.models.cascade.autoencoder import latent_shape_of
from raygen.models.cascade.beam import decode
from raygen.models.cascade.config import CascadeConfig, CascadeSampling
from raygen.models.cascade.transformer import BaseStepper, BaseTransformer, Refiner, RefinerStepper
from raygen.models.conditions import Conditions
from raygen.models.sampling import check_generators, preview

#: share of training labels dropped to the "no class" start token, so a label model also samples unconditioned
LABEL_DROPOUT = 0.1


class CascadeGenerator(Generator):
    """Capabilities train, sample."""

    def __init__(self, config: CascadeConfig, data_info: DataInfo, components: dict[str, Generator]):
        missing = [k for k in ("autoencoder", "codebooks") if k not in components]
        if missing:
            raise ValueError(f"model.components.{missing[0]}: the cascade needs an autoencoder (cascade_ae) and "
                             "its codebooks (som), trained by earlier stages; see jobs/specs/cascade_fashion.yaml")
        ae, books = components["autoencoder"], components["codebooks"]
        latent = latent_shape_of(ae)
        if tuple(books.latent_shape) != latent:
            raise ValueError(f"model.components.codebooks: fitted on latent maps {list(books.latent_shape)}, but the "
                             f"autoencoder makes {list(latent)}; fit them on this autoencoder's latents")
        image = tuple(ae.data_info.shape)
        if tuple(data_info.shape) not in (image, latent):
            raise ValueError(f"data: the cascade trains on the autoencoder's images {list(image)} or its latent "
                             f"maps {list(latent)}, got {list(data_info.shape)}")
        # it samples images: its data_info is the autoencoder's image size with this data's classes
        info = DataInfo(channels=image[0], height=image[1], width=image[2], num_classes=data_info.num_classes,
                        class_names=list(data_info.class_names), has_captions=data_info.has_captions)
        super().__init__(info)
        self.attach_components(components)
        self.config = config
        self.condition_kind = config.conditioning
        if config.conditioning == "label" and data_info.num_classes < 1:
            raise ValueError("model.options.conditioning: 'label' needs a dataset with labels; use 'none'")
        self.latent_shape = latent
        n_levels = len(books.levels)
        bad = [lv for lv in (config.train_levels or []) if not 0 <= lv < n_levels]
        if bad:
            raise ValueError(f"model.options.train_levels: level {bad[0]} does not exist; the codebooks have "
                             f"levels 0..{n_levels - 1}")
        sizes = [books.grid(i)[0] * books.grid(i)[1] for i in range(n_levels)]
        vocabs = books.vocab_sizes
        cond_vocab = books.whole.vocab if books.whole is not None else 0
        n_starts = 1 + (data_info.num_classes if config.conditioning == "label" else 0)
        self.base = BaseTransformer(config.base, n_tokens=sizes[0], vocab=vocabs[0], cond_vocab=cond_vocab,
                                    n_starts=n_starts)
        self.refiners = nn.ModuleList(
            Refiner(config.refiner, n_prev=sizes[i - 1], prev_vocab=vocabs[i - 1], n_tokens=sizes[i],
                    vocab=vocabs[i], cond_vocab=cond_vocab) for i in range(1, n_levels))
        for stack in [self.base.stack, *(s for r in self.refiners for s in (r.encoder, r.decoder))]:
            stack.checkpointing = config.activation_checkpoint

    @property
    def n_levels(self) -> int:
        return 1 + len(self.refiners)

    def _device(self) -> torch.device:
        return self.base.head.weight.device

    # ------------------------------------------------------------ data -> tokens
    @torch.no_grad()
    def tokenize(self, batch: dict[str, Any]) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
        """(whole-map tokens [B] or None, tokens [B, n_l] of every level) of a batch of latent maps or images."""
        if "latent" in batch:
            latents = batch["latent"].to(self._device(), torch.float32)
        else:
            latents = self.components["autoencoder"].encode(batch["image"].to(self._device()))
        books = self.components["codebooks"]
        cond = books.cond_tokens(latents).to(self._device()) if books.whole is not None else None
        return cond, [t.to(self._device()) for t in books.tokens(latents)]

    def _starts(self, labels: torch.Tensor | None, n: int) -> torch.Tensor:
        if self.condition_kind != "label" or labels is None:
            return torch.zeros(n, dtype=torch.long, device=self._device())
        labels = labels.to(self._device()).long()
        return torch.where(labels < 0, torch.zeros_like(labels), labels + 1)

    # ------------------------------------------------------------ training
    def training_step(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        cond, tokens = self.tokenize(batch)
        n = tokens[0].shape[0]
        labels = batch.get("label")
        if self.condition_kind == "label" and labels is not None and self.training:
            labels = labels.to(self._device()).long()
            labels = torch.where(torch.rand(n, device=labels.device) < LABEL_DROPOUT, -1, labels)
        trained = self.config.train_levels if self.config.train_levels is not None else range(self.n_levels)
        out: dict[str, torch.Tensor] = {}
        losses = []
        for level in trained:
            if level == 0:
                cond_logits, logits = self.base(self._starts(labels, n), cond, tokens[0])
                ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[0].reshape(-1))
                if cond_logits is not None:
                    cond_ce = F.cross_entropy(cond_logits, cond)
                    out["level0_cond_ce"] = cond_ce.detach()
                    k = tokens[0].shape[1]
                    ce = (ce * k + cond_ce) / (k + 1)  # the mean over every predicted token of the base
            else:
                logits = self.refiners[level - 1](cond, tokens[level - 1], tokens[level])
                ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[level].reshape(-1))
            out[f"level{level}_ce"] = ce.detach()
            losses.append(ce)
        out["loss"] = torch.stack(losses).mean()
        return out

    # ------------------------------------------------------------ sampling
    @torch.no_grad()
    def sample_tokens(self, conditions: Conditions, params: CascadeSampling,
                      generators: Sequence[torch.Generator]) -> dict[str, Any]:
        """{"cond": [N] or None, "tokens": [[N, n_l] per decoded level], "loglik": [[N] per level]}: the
        mean log-likelihood per token of each level's decoded sequence."""
        n = conditions.n
        check_generators(n, generators)
        last = self.n_levels - 1 if params.levels < 0 else min(params.levels, self.n_levels - 1)
        labels = conditions.columns(self.data_info).get("label") if self.condition_kind == "label" else None
        forced = None
        if params.cond_token >= 0:
            if not self.base.has_cond or params.cond_token >= self.base.cond_vocab:
                raise ValueError(f"cond_token: {params.cond_token} is not a unit of the whole-map codebook "
                                 f"(0..{self.base.cond_vocab - 1})" if self.base.has_cond else
                                 "cond_token: this model has no whole-map codebook; leave cond_token at -1")
            forced = torch.full((n,), params.cond_token, dtype=torch.long, device=self._device())
        stepper = BaseStepper(self.base, self._starts(labels, n), cached=params.cache, cond=forced)
        loglik = [decode(stepper, generators, params.for_level(0))]
        cond, first = stepper.tokens()
        tokens = [first]
        # a preview per decoded level: coarse to fine, each a whole image at its level's detail
        preview(1, last + 1, lambda: self.decode_tokens(0, first))
        for level in range(1, last + 1):
            stepper = RefinerStepper(self.refiners[level - 1], cond, tokens[-1], cached=params.cache)
            loglik.append(decode(stepper, generators, params.for_level(level)))
            tokens.append(stepper.tokens())
            preview(level + 1, last + 1, lambda: self.decode_tokens(level, tokens[-1]))
        return {"cond": cond, "tokens": tokens, "loglik": loglik}

    @torch.no_grad()
    def decode_tokens(self, level: int, tokens: torch.Tensor) -> torch.Tensor:
        """A level's tokens [N, n_l] -> images [N, C, H, W] in [0, 1] (codebook lookup, then the decoder)."""
        latent = self.components["codebooks"].decode_level(level, tokens)
        return self.components["autoencoder"].decode(latent).float().clamp(0, 1)

    @torch.no_grad()
    def sample(self, conditions: Conditions, params: CascadeSampling,
               generators: Sequence[torch.Generator]) -> torch.Tensor:
        out = self.sample_tokens(conditions, params, generators)
        return self.decode_tokens(len(out["tokens"]) - 1, out["tokens"][-1])

    @torch.no_grad()
    def sample_levels(self, conditions: Conditions, params: CascadeSampling,
                      generators: Sequence[torch.Generator]) -> list[torch.Tensor]:
        """Every decoded level's images (base, refiner 1, ...), each [N, C, H, W]: the seed's rows."""
        out = self.sample_tokens(conditions, params, generators)
        return [self.decode_tokens(i, t) for i, t in enumerate(out["tokens"])]


def build_cascade(config: CascadeConfig, data_info: DataInfo, components=None) -> CascadeGenerator:
    return CascadeGenerator(config, data_info, dict(components or {}))
