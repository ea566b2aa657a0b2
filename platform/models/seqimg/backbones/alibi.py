"""ALiBi transformer: GPT-2 blocks with no positional embedding at all; each
head adds -slope * distance to its attention scores (Press et al., 2022), so
attention itself learns where things are. The slopes are the paper's geometric
sequence, one per head.

With a KV cache the bias of a new query is just -slope * (t - j) over the cached
keys j, so cached sampling stays one step per patch.
"""
from __future__ import annotations

from raygen.models.seqimg.backbones.attention import CausalSelfAttention
from raygen.models.seqimg.backbones.common import BackboneContext, Stack, register_backbone


@register_backbone("alibi")
def build_alibi(cfg, ctx: BackboneContext) -> Stack:
    return Stack([CausalSelfAttention(cfg.dim, cfg.heads, ctx.seq_len, depth=cfg.depth, dropout=cfg.dropout_rate,
                                      alibi=True)
                  for _ in range(cfg.depth)], cfg)
