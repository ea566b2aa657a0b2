"""Stages 4+: the base decoder-only transformer and the encoder-decoder refiners.

    base     [start | class] cond t_1 ... t_n  ->  predicts cond, t_1 ... t_n (causal self-attention)
    refiner  encoder: [cond] s_1 ... s_m  (the previous level's tokens, bidirectional)
             decoder: [start] t_1 ... t_n-1 -> predicts t_1 ... t_n, causal self-attention + cross-attention

Pre-norm layers; the feed-forward sublayer is raygen.models.layers.FeedForward
with the seed's `hidden_activation`. Decoder self-attention has a preallocated
KV cache for step-by-step decoding and an optional sliding window (a query
sees itself and the `sliding_window - 1` tokens before it, in training and in
cached decoding alike). Cross-attention keys and values are computed once per
encoder output. `forward` (teacher forcing) and stepping through a `Stepper`
give the same logits; tests check it.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from raygen.models.cascade.config import TransformerOptions
from raygen.models.layers.feedforward import FeedForward


def window_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None, causal: bool) -> torch.Tensor:
    """Boolean [Tq, Tk], True where query i may attend to key j."""
    diff = q_pos[:, None] - k_pos[None, :]
    ok = torch.ones_like(diff, dtype=torch.bool)
    if causal:
        ok &= diff >= 0
    if window is not None:
        ok &= diff < window
    return ok


class Attention(nn.Module):
    """Multi-head attention; self-attention (causal, windowed, cached) or cross-attention."""

    def __init__(self, dim: int, heads: int, *, depth: int, dropout: float):
        super().__init__()
        self.heads, self.head_dim, self.dropout = heads, dim // heads, dropout
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        for lin in (self.q, self.kv):
            nn.init.normal_(lin.weight, std=0.02)
            nn.init.zeros_(lin.bias)
        nn.init.normal_(self.proj.weight, std=0.02 / math.sqrt(2 * depth))  # GPT-2: residual variance stays put
        nn.init.zeros_(self.proj.bias)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        return x.view(b, t, self.heads, self.head_dim).transpose(1, 2)  # [B, H, T, hd]

    def keys_values(self, source: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k, v = self.kv(source).chunk(2, dim=-1)
        return self._split(k), self._split(v)

    def attend(self, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        q = self._split(self.q(x))
        p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        b, h, t, d = y.shape
        return self.proj(y.transpose(1, 2).reshape(b, t, h * d))


class Layer(nn.Module):
    """Pre-norm: self-attention, (cross-attention), feed-forward; each a residual branch."""

    def __init__(self, opts: TransformerOptions, *, depth: int, causal: bool, cross: bool):
        super().__init__()
        d = opts.in_dim
        self.causal = causal
        self.window = opts.sliding_window if (causal and opts.use_sliding_window) else None
        self.norm1 = nn.LayerNorm(d)
        self.attn = Attention(d, opts.self_attn_heads, depth=depth, dropout=opts.dropout)
        self.cross = None
        if cross:
            self.norm_x = nn.LayerNorm(d)
            self.cross = Attention(d, opts.cross_attn_heads, depth=depth, dropout=opts.dropout)
        self.norm2 = nn.LayerNorm(d)
        self.ff = FeedForward(d, opts.hidden_dim, opts.hidden_activation, dropout=opts.dropout)
        self.drop = nn.Dropout(opts.dropout) if opts.dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, memory: torch.Tensor | None = None) -> torch.Tensor:
        t = x.shape[1]
        pos = torch.arange(t, device=x.device)
        mask = window_mask(pos, pos, self.window, self.causal) if (self.causal or self.window) else None
        h = self.norm1(x)
        k, v = self.attn.keys_values(h)
        x = x + self.drop(self.attn.attend(h, k, v, mask))
        if self.cross is not None:
            mk, mv = self.cross.keys_values(memory)
            x = x + self.drop(self.cross.attend(self.norm_x(x), mk, mv, None))
        return x + self.drop(self.ff(self.norm2(x)))

    def step(self, x: torch.Tensor, cache: dict) -> torch.Tensor:
        """One new token x [B, 1, D] at position cache["t"]; cache holds preallocated keys/values
        [B, H, T, hd] and (refiners) the cross-attention keys/values of the encoder output."""
        t = cache["t"]
        h = self.norm1(x)
        k, v = self.attn.keys_values(h)
        cache["k"][:, :, t], cache["v"][:, :, t] = k[:, :, 0], v[:, :, 0]
        lo = 0 if self.window is None else max(0, t + 1 - self.window)
        x = x + self.drop(self.attn.attend(h, cache["k"][:, :, lo:t + 1], cache["v"][:, :, lo:t + 1], None))
        if self.cross is not None:
            x = x + self.drop(self.cross.attend(self.norm_x(x), cache["mk"], cache["mv"], None))
        return x + self.drop(self.ff(self.norm2(x)))


class Stack(nn.Module):
    def __init__(self, opts: TransformerOptions, n: int, *, causal: bool, cross: bool):
        super().__init__()
        self.layers = nn.ModuleList(Layer(opts, depth=n, causal=causal, cross=cross) for _ in range(n))
        self.norm = nn.LayerNorm(opts.in_dim)
        self.checkpointing = False

    def forward(self, x: torch.Tensor, memory: torch.Tensor | None = None) -> torch.Tensor:
        for layer in self.layers:
            if self.checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(layer, x, memory, use_reentrant=False)
            else:
                x = layer(x, memory)
        return self.norm(x)

    def new_cache(self, batch: int, length: int, like: torch.Tensor, memory: torch.Tensor | None) -> list[dict]:
        caches = []
        for layer in self.layers:
            a = layer.attn
            shape = (batch, a.heads, length, a.head_dim)
            c = {"t": 0, "k": like.new_zeros(shape), "v": like.new_zeros(shape)}
            if layer.cross is not None:
                c["mk"], c["mv"] = layer.cross.keys_values(memory)
            caches.append(c)
        return caches

    def step(self, x: torch.Tensor, caches: list[dict]) -> torch.Tensor:
        for layer, c in zip(self.layers, caches):
            x = layer.step(x, c)
            c["t"] += 1
        return self.norm(x)


class BaseTransformer(nn.Module):
    """Decoder-only over [start or class] + cond + the coarsest level's n tokens."""

    def __init__(self, opts: TransformerOptions, *, n_tokens: int, vocab: int, cond_vocab: int, n_starts: int):
        super().__init__()
        d = opts.in_dim
        self.n_tokens, self.vocab, self.cond_vocab = n_tokens, vocab, cond_vocab
        self.start = nn.Embedding(n_starts, d)               # row 0: no class; 1 + c: class c
        self.cond_embed = nn.Embedding(max(cond_vocab, 1), d)
        self.embed = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.randn(n_tokens + 2, d) * 0.02)
        self.stack = Stack(opts, opts.num_dec_layers, causal=True, cross=False)
        self.cond_head = nn.Linear(d, max(cond_vocab, 1))
        self.head = nn.Linear(d, vocab)

    @property
    def has_cond(self) -> bool:
        return self.cond_vocab > 0

    def _inputs(self, starts: torch.Tensor, cond: torch.Tensor | None, tokens: torch.Tensor) -> torch.Tensor:
        parts = [self.start(starts)[:, None]]
        if self.has_cond:
            parts.append(self.cond_embed(cond)[:, None])
        parts.append(self.embed(tokens))
        x = torch.cat(parts, 1)
        return x + self.pos[: x.shape[1]]

    def forward(self, starts: torch.Tensor, cond: torch.Tensor | None,
                tokens: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Teacher forcing: (cond logits [B, Vc] or None, token logits [B, n, V])."""
        h = self.stack(self._inputs(starts, cond, tokens[:, :-1]))
        if self.has_cond:
            return self.cond_head(h[:, 0]), self.head(h[:, 1:])
        return None, self.head(h)


class Refiner(nn.Module):
    """Encoder-decoder: reads [cond] + the previous level's m tokens, predicts this level's n tokens."""

    def __init__(self, opts: TransformerOptions, *, n_prev: int, prev_vocab: int, n_tokens: int, vocab: int,
                 cond_vocab: int):
        super().__init__()
        d = opts.in_dim
        self.n_tokens, self.vocab, self.has_cond = n_tokens, vocab, cond_vocab > 0
        self.cond_embed = nn.Embedding(max(cond_vocab, 1), d)
        self.prev_embed = nn.Embedding(prev_vocab, d)
        self.enc_pos = nn.Parameter(torch.randn(n_prev + 1, d) * 0.02)
        self.encoder = Stack(opts, opts.num_enc_layers, causal=False, cross=False)
        self.start = nn.Parameter(torch.randn(d) * 0.02)
        self.embed = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.randn(n_tokens, d) * 0.02)
        self.decoder = Stack(opts, opts.num_dec_layers, causal=True, cross=True)
        self.head = nn.Linear(d, vocab)

    def encode(self, cond: torch.Tensor | None, prev: torch.Tensor) -> torch.Tensor:
        x = self.prev_embed(prev)
        if self.has_cond:
            x = torch.cat([self.cond_embed(cond)[:, None], x], 1)
            return self.encoder(x + self.enc_pos[: x.shape[1]])
        return self.encoder(x + self.enc_pos[1: x.shape[1] + 1])

    def _dec_inputs(self, tokens: torch.Tensor) -> torch.Tensor:
        b = tokens.shape[0]
        x = torch.cat([self.start.expand(b, 1, -1), self.embed(tokens)], 1)
        return x + self.pos[: x.shape[1]]

    def forward(self, cond: torch.Tensor | None, prev: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Teacher forcing: token logits [B, n, V]."""
        return self.head(self.decoder(self._dec_inputs(tokens[:, :-1]), self.encode(cond, prev)))


# ---------------------------------------------------------------- steppers: one level, token by token
class Stepper:
    """Decodes one level for a batch of hypotheses: `first()` gives the logits of the first token, `feed(tokens)`
    those of the next after appending `tokens` [B]; `select(index)` keeps (and repeats) hypotheses. Cached: one
    new position per call. Uncached: every call reruns the whole prefix (the benchmark's baseline)."""

    def __init__(self, cached: bool):
        self.cached = cached
        self.prefix: torch.Tensor | None = None   # tokens so far [B, t]

    @property
    def length(self) -> int:
        raise NotImplementedError

    def first(self) -> torch.Tensor:
        raise NotImplementedError

    def feed(self, tokens: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def select(self, index: torch.Tensor) -> None:
        raise NotImplementedError

    def finish(self, tokens: torch.Tensor) -> None:
        """Record the last token (nothing follows it, so no logits are computed)."""
        self.seq.append(tokens)


def _select_cache(caches: list[dict], index: torch.Tensor) -> None:
    for c in caches:
        for key in ("k", "v", "mk", "mv"):
            if key in c:
                c[key] = c[key].index_select(0, index)


class BaseStepper(Stepper):
    """The base level: (cond, when the model has one) then the n tokens. `cond` given: it is forced."""

    def __init__(self, model: BaseTransformer, starts: torch.Tensor, *, cached: bool,
                 cond: torch.Tensor | None = None):
        super().__init__(cached)
        self.model, self.starts, self.forced = model, starts, cond
        self.caches = None
        self.seq: list[torch.Tensor] = []                # what was fed: cond then tokens, each [B]

    @property
    def length(self) -> int:
        return self.model.n_tokens + (1 if self.model.has_cond and self.forced is None else 0)

    def vocab_at(self, i: int) -> int:
        has_cond_step = self.model.has_cond and self.forced is None
        return self.model.cond_vocab if (has_cond_step and i == 0) else self.model.vocab

    def first(self) -> torch.Tensor:
        m = self.model
        if self.forced is not None:  # the cond token is given: feed it, the first prediction is t_1
            return self._after_cond(self.forced)
        if self.cached:
            x = m.start(self.starts)[:, None] + m.pos[:1]
            self.caches = m.stack.new_cache(len(self.starts), m.n_tokens + 2, x, None)
            return self._head(m.stack.step(x, self.caches), cond=m.has_cond)
        return self._recompute(cond=m.has_cond)

    def _after_cond(self, cond: torch.Tensor) -> torch.Tensor:
        m = self.model
        self.seq.append(cond)
        if self.cached:
            x = m.start(self.starts)[:, None] + m.pos[:1]
            self.caches = m.stack.new_cache(len(self.starts), m.n_tokens + 2, x, None)
            m.stack.step(x, self.caches)
            return self._head(m.stack.step(m.cond_embed(cond)[:, None] + m.pos[1:2], self.caches), cond=False)
        return self._recompute(cond=False)

    def feed(self, tokens: torch.Tensor) -> torch.Tensor:
        m = self.model
        i = len(self.seq)
        self.seq.append(tokens)
        if not self.cached:
            return self._recompute(cond=False)
        emb = m.cond_embed(tokens) if (m.has_cond and i == 0) else m.embed(tokens)
        return self._head(m.stack.step(emb[:, None] + m.pos[i + 1:i + 2], self.caches), cond=False)

    def _recompute(self, *, cond: bool) -> torch.Tensor:
        m = self.model
        x = [m.start(self.starts)[:, None]]
        for i, tok in enumerate(self.seq):
            x.append((m.cond_embed(tok) if (m.has_cond and i == 0) else m.embed(tok))[:, None])
        x = torch.cat(x, 1)
        h = m.stack(x + m.pos[: x.shape[1]])
        return self._head(h[:, -1:], cond=cond)

    def _head(self, h: torch.Tensor, *, cond: bool) -> torch.Tensor:
        return (self.model.cond_head if cond else self.model.head)(h[:, 0])

    def select(self, index: torch.Tensor) -> None:
        self.starts = self.starts.index_select(0, index)
        self.seq = [s.index_select(0, index) for s in self.seq]
        if self.forced is not None:
            self.forced = self.forced.index_select(0, index)
        if self.caches is not None:
            _select_cache(self.caches, index)

    def tokens(self) -> tuple[torch.Tensor | None, torch.Tensor]:
        """(cond [B] or None, the level's tokens [B, n]) once decoded."""
        if self.model.has_cond:
            return self.seq[0], torch.stack(self.seq[1:], 1)
        return None, torch.stack(self.seq, 1)


class RefinerStepper(Stepper):
    def __init__(self, model: Refiner, cond: torch.Tensor | None, prev: torch.Tensor, *, cached: bool):
        super().__init__(cached)
        self.model = model
        self.memory = model.encode(cond, prev)
        self.caches = None
        self.seq: list[torch.Tensor] = []

    @property
    def length(self) -> int:
        return self.model.n_tokens

    def vocab_at(self, i: int) -> int:
        return self.model.vocab

    def first(self) -> torch.Tensor:
        m = self.model
        x = m.start.expand(len(self.memory), 1, -1) + m.pos[:1]
        if self.cached:
            self.caches = m.decoder.new_cache(len(self.memory), m.n_tokens, x, self.memory)
            return m.head(m.decoder.step(x, self.caches)[:, 0])
        return m.head(m.decoder(x, self.memory)[:, -1])

    def feed(self, tokens: torch.Tensor) -> torch.Tensor:
        m = self.model
        self.seq.append(tokens)
        t = len(self.seq)
        if self.cached:
            return m.head(m.decoder.step(m.embed(tokens)[:, None] + m.pos[t:t + 1], self.caches)[:, 0])
        return m.head(m.decoder(m._dec_inputs(torch.stack(self.seq, 1)), self.memory)[:, -1])

    def select(self, index: torch.Tensor) -> None:
        self.memory = self.memory.index_select(0, index)
        self.seq = [s.index_select(0, index) for s in self.seq]
        if self.caches is not None:
            _select_cache(self.caches, index)

    def tokens(self) -> torch.Tensor:
        return torch.stack(self.seq, 1)
