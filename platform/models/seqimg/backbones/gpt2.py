"""GPT-2 style decoder: pre-norm blocks of causal self-attention and a
feed-forward MLP, position from absolute embeddings added to the tokens
(learned by default; sinusoidal, none, or rotary inside attention on request).

The seed's verdict: very good even on complex datasets; overfits small ones.
Sampling keeps a KV cache per block, so each new patch attends once over the
cached keys instead of re-running the whole prefix.
"""
from __future__ import annotations

from raygen.models.seqimg.backbones.attention import CausalSelfAttention
from raygen.models.seqimg.backbones.common import BackboneContext, Stack, register_backbone


@register_backbone("gpt2")
def build_gpt2(cfg, ctx: BackboneContext) -> Stack:
    rotary = cfg.positional == "rotary"
    return Stack([CausalSelfAttention(cfg.dim, cfg.heads, ctx.seq_len, depth=cfg.depth, dropout=cfg.dropout_rate,
                                      rotary=rotary)
                  for _ in range(cfg.depth)], cfg)
