"""Graph neural network over patches with causal edges.

Nodes are the tokens: node 0 is the start token, node s >= 1 carries patch
s-1. Node t predicts patch t, at grid cell pos(t). Its in-edges:

    self    t -> t
    start   0 -> t                          (the condition reaches every node)
    local   s -> t for 1 <= s < t whose patch s-1 lies within `gnn_radius`
            (Chebyshev distance on the patch grid) of pos(t)

Every source s <= t, so the graph is causal, and every node has at least its
self-loop. That last point is the fix for the seed's version, which masked
edges to j < i only: node 0 had no neighbour at all, its softmax ran over
nothing but -inf and returned NaN on the first step.

Each layer is graph attention in the seed's form: an edge MLP scores
[x_t, x_s, x_t - x_s] per head, plus a learned bias per edge type (self,
start, or the grid offset (dy, dx)), softmax over the node's in-edges;
messages are value(x_s) plus an edge-type embedding, so a node knows the
direction each message came from. Aggregation is a convex combination
(softmax weights), so activations cannot blow up with the node degree.

Sampling keeps each layer's past inputs; a new node gathers only its own
neighbours (at most about (r+1)(2r+1) + 2 of them).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from raygen.models.seqimg.backbones.common import BackboneContext, History, Mixer, Stack, register_backbone

SELF, START = 0, 1


def causal_neighbourhood(ctx: BackboneContext, radius: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """index [T, K], edge type [T, K], valid mask [T, K] of each node's in-edges, and the number of edge types."""
    side = 2 * radius + 1
    rows = []
    for t in range(ctx.seq_len):
        ty, tx = ctx.positions[t]
        edges = [(t, SELF)] + ([(0, START)] if t > 0 else [])
        for s in range(1, t):
            sy, sx = ctx.positions[s - 1]
            dy, dx = sy - ty, sx - tx
            if max(abs(dy), abs(dx)) <= radius:
                edges.append((s, 2 + (dy + radius) * side + (dx + radius)))
        rows.append(edges)
    k = max(len(r) for r in rows)
    index = torch.zeros(ctx.seq_len, k, dtype=torch.long)
    etype = torch.zeros(ctx.seq_len, k, dtype=torch.long)
    valid = torch.zeros(ctx.seq_len, k, dtype=torch.bool)
    for t, edges in enumerate(rows):
        for j, (s, e) in enumerate(edges):
            index[t, j], etype[t, j], valid[t, j] = s, e, True
    return index, etype, valid, 2 + side * side


class GraphAttention(Mixer):
    def __init__(self, dim: int, heads: int, ctx: BackboneContext, radius: int):
        super().__init__()
        self.heads = heads
        self.head_dim = dim // heads
        index, etype, valid, n_types = causal_neighbourhood(ctx, radius)
        self.register_buffer("index", index, persistent=False)
        self.register_buffer("etype", etype, persistent=False)
        self.register_buffer("valid", valid, persistent=False)
        self.edge_mlp = nn.Sequential(nn.Linear(3 * dim, dim), nn.SiLU(), nn.Linear(dim, heads))
        self.edge_bias = nn.Embedding(n_types, heads)
        self.edge_value = nn.Embedding(n_types, dim)
        self.value = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)
        nn.init.zeros_(self.edge_bias.weight)
        nn.init.normal_(self.edge_value.weight, std=0.02)
        nn.init.zeros_(self.edge_mlp[-1].weight)  # start as the mean over in-edges
        nn.init.zeros_(self.edge_mlp[-1].bias)

    def _aggregate(self, x_t, x_s, etype, valid):
        """x_t [..., D] receiving, x_s [..., K, D] sending -> [..., D]."""
        x_i = x_t.unsqueeze(-2).expand_as(x_s)
        score = self.edge_mlp(torch.cat([x_i, x_s, x_i - x_s], dim=-1)) + self.edge_bias(etype)  # [..., K, H]
        score = score.masked_fill(~valid.unsqueeze(-1), float("-inf"))
        attn = F.softmax(score, dim=-2)  # every node has its self-edge: never all -inf
        msg = (self.value(x_s) + self.edge_value(etype)).unflatten(-1, (self.heads, self.head_dim))
        return self.out((attn.unsqueeze(-1) * msg).sum(-3).flatten(-2))

    def forward(self, x):
        t = x.shape[1]
        index, etype, valid = self.index[:t], self.etype[:t], self.valid[:t]
        x_s = x[:, index.reshape(-1)].unflatten(1, index.shape)  # [B, T, K, D]
        return self._aggregate(x, x_s, etype, valid)

    def step(self, x, state=None):
        past = History(x, self.index.shape[0]) if state is None else state.append(x)
        t = past.len - 1
        x_s = past.buf[:, self.index[t]]  # [B, K, D]; padded slots point at row 0 and are masked
        return self._aggregate(x, x_s, self.etype[t], self.valid[t]), past


@register_backbone("gnn")
def build_gnn(cfg, ctx: BackboneContext) -> Stack:
    return Stack([GraphAttention(cfg.dim, cfg.heads, ctx, cfg.gnn_radius) for _ in range(cfg.depth)], cfg)
