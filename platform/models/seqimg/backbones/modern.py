"""The seed's "modernized" GPT-2: rotary position embeddings inside attention,
dropout (on attention weights and every branch), DropPath (stochastic depth,
rising linearly to the last block) and trainable per-channel layer scale on
each residual branch.

Defaults that make it modern (config.py): pos_embedding 'rotary', dropout 0.1,
drop_path 0.1, layer_scale 0.1; each can be overridden. Rotary keys are stored
already rotated in the KV cache: relative offsets come out of q.k, so a cached
key never needs re-rotating.
"""
from __future__ import annotations

from raygen.models.seqimg.backbones.attention import CausalSelfAttention
from raygen.models.seqimg.backbones.common import BackboneContext, Stack, register_backbone


@register_backbone("modern")
def build_modern(cfg, ctx: BackboneContext) -> Stack:
    rotary = cfg.positional == "rotary"
    return Stack([CausalSelfAttention(cfg.dim, cfg.heads, ctx.seq_len, depth=cfg.depth, dropout=cfg.dropout_rate,
                                      rotary=rotary)
                  for _ in range(cfg.depth)], cfg)
