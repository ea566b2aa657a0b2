"""Decoding one level: temperature, top-k / top-p, and beam search, as one function over a `Stepper`.

Every image keeps `beam_width` hypotheses (W). At each step every hypothesis
proposes `num_beam` candidates (C): at temperature 0 its C most likely next
tokens, else C tokens drawn without replacement from its tempered, filtered
distribution (Gumbel-top-k, the uniforms from that image's own generator). All
W·C candidates of an image are ranked by length-normalised log-likelihood (the
model's own, untempered, summed over the sequence and divided by its length)
and the best W survive. So:

    W = 1, temperature 0       greedy decoding
    W = 1, C = 1, temperature > 0   plain sampling (Gumbel-max is exact sampling)
    W >= V^(L-1), C = V, temperature 0   exhaustive search (every sequence is scored)

Ties go to the earlier candidate (stable sorts), and each image's random
numbers come from its own generator in a fixed order, so a batch decodes
exactly like its images one by one.
"""
from __future__ import annotations

from typing import Sequence

import torch

from raygen.models.cascade.config import LevelDecoding
from raygen.models.sampling import preview
from raygen.models.cascade.transformer import Stepper


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Logits with everything outside the top-k tokens and outside the nucleus of mass top_p set to -inf
    (the most likely token always stays)."""
    out = logits.clone()
    v = out.shape[-1]
    if 0 < top_k < v:
        kth = torch.topk(out, top_k, dim=-1).values[..., -1:]
        out = out.masked_fill(out < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(out, dim=-1, descending=True, stable=True)
        probs = sorted_logits.softmax(-1)
        before = probs.cumsum(-1) - probs          # mass of the tokens ranked above each one
        drop = before >= top_p                     # the nucleus: tokens until the mass reaches p
        drop[..., 0] = False
        out = out.masked_fill(torch.zeros_like(drop).scatter(-1, order, drop), float("-inf"))
    return out


def _gumbel(generators: Sequence[torch.Generator], h: int, v: int, device: torch.device) -> torch.Tensor:
    """Gumbel noise [N, h, v], image i's from generators[i]."""
    u = torch.stack([torch.rand(h, v, generator=g, device=g.device, dtype=torch.float64) for g in generators])
    u = u.to(device).clamp(1e-12, 1 - 1e-12)
    return -torch.log(-torch.log(u))


@torch.no_grad()
def decode(stepper: Stepper, generators: Sequence[torch.Generator],
           settings: LevelDecoding) -> torch.Tensor:
    """Decode `stepper.length` tokens for N images (the stepper holds N rows, one per image). Leaves the best
    hypothesis of each image in the stepper (one row per image again) and returns its mean log-likelihood per
    token, float64 [N]."""
    n = len(generators)
    steps = stepper.length
    h = 1
    scores = None
    logits = stepper.first()
    for t in range(steps):
        v = logits.shape[-1]
        logp = torch.log_softmax(logits.double(), -1).view(n, h, v)
        allowed = filter_logits(logits.double(), settings.top_k, settings.top_p)
        c = min(settings.num_beam, v)
        if settings.temperature == 0:
            keys = allowed
        else:
            keys = allowed / settings.temperature + _gumbel(generators, h, v, logits.device).view(n * h, v)
        keys = keys.view(n, h, v)
        cand_keys, cand = torch.sort(keys, dim=-1, descending=True, stable=True)
        cand_keys, cand = cand_keys[..., :c], cand[..., :c]                         # [N, h, C]
        prev = torch.zeros(n, h, 1, dtype=torch.float64, device=logp.device) if scores is None else scores[..., None]
        cand_scores = prev + logp.gather(-1, cand)
        cand_scores = cand_scores.masked_fill(torch.isinf(cand_keys), float("-inf")).reshape(n, h * c)
        keep = min(settings.beam_width, h * c)
        order = torch.sort(cand_scores / (t + 1), dim=-1, descending=True, stable=True).indices[:, :keep]
        parent = torch.div(order, c, rounding_mode="floor")
        tokens = cand.reshape(n, h * c).gather(1, order)
        rows = (torch.arange(n, device=order.device)[:, None] * h + parent).reshape(-1)
        stepper.select(rows)
        scores = cand_scores.gather(1, order)
        h = keep
        if t < steps - 1:
            logits = stepper.feed(tokens.reshape(-1))
        else:
            stepper.finish(tokens.reshape(-1))
        preview(t + 1, steps)  # progress only (a stream can stop here); the level's image comes when it is done
    best = torch.arange(n, device=scores.device) * h
    stepper.select(best)
    return scores[:, 0] / max(steps, 1)
