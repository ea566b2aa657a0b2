"""The "manifold" decoder of seed 001: (code, encoded pixel position) -> colour.

    pos(x, y)  = x, y, sin(f·x), sin(f·y) [, cos(f·x), cos(f·y)]  for f in pos_freqs
    h          = act(W_in · [code, pos(x, y)] + b)
    block k    = x_k -> [batch norm] -> (linear -> act) × layers = y_k;   x_{k+1} = x_k + y_k  or  [x_k, y_k]
    colour     = sigmoid(W_out · x_last + b)

Every pixel is decoded on its own, so the same code renders on any grid: a
denser grid is a higher resolution (`forward(codes, height, width)`).
Positions are pixel centres in [-1, 1], (i + 0.5) / n · 2 - 1, so the 2×2
pixels of a 2× render sit symmetrically around the 1× pixel they refine.
"""
from __future__ import annotations

import torch
from torch import nn

from raygen.models.inr.config import DecoderOptions
from raygen.models.layers import init_linear, make_activation

# rows (pixels × images) decoded at once without gradients: bounds a large render's memory
_ROWS_PER_CHUNK = 1 << 18


def pixel_positions(height: int, width: int, device: torch.device | None = None) -> torch.Tensor:
    """[height·width, 2] (x, y) pixel centres in [-1, 1], row-major."""
    ys = (torch.arange(height, device=device, dtype=torch.float32) + 0.5) / height * 2 - 1
    xs = (torch.arange(width, device=device, dtype=torch.float32) + 0.5) / width * 2 - 1
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([grid_x.reshape(-1), grid_y.reshape(-1)], dim=1)


def encode_positions(pos: torch.Tensor, freqs: list[float], cos: bool) -> torch.Tensor:
    """[N, 2] positions -> [N, 2 · (1 + len(freqs) · (2 if cos else 1))] features."""
    parts = [pos] + [torch.sin(pos * f) for f in freqs] + ([torch.cos(pos * f) for f in freqs] if cos else [])
    return torch.cat(parts, dim=1)


class ResidualLinearBlock(nn.Module):
    """[batch norm] then `layers` × (linear, activation); the output is added to or concatenated with the input."""

    def __init__(self, width: int, layers: int, batch_norm: bool, concat: bool, activation: str):
        super().__init__()
        self.concat = concat
        self.norm = nn.BatchNorm1d(width) if batch_norm else nn.Identity()
        mods = []
        for _ in range(layers):
            linear = nn.Linear(width, width)
            init_linear(linear, activation)
            mods += [linear, make_activation(activation)]
        self.layers = nn.Sequential(*mods)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.layers(self.norm(x))
        return torch.cat([x, y], dim=-1) if self.concat else x + y


class ManifoldDecoder(nn.Module):
    def __init__(self, code_size: int, channels: int, options: DecoderOptions):
        super().__init__()
        self.options = options
        widths = options.widths()
        # one linear layer over [code, position] (the seed's layout and parameter count); forward splits
        # its weight so the code part is computed once per image, not once per pixel
        self.linear_in = nn.Linear(code_size + options.pos_size, widths[0])
        init_linear(self.linear_in, options.activation)
        self.act_in = make_activation(options.activation)
        self.blocks = nn.ModuleList(
            ResidualLinearBlock(w, options.layers, options.batch_norm, concat, options.activation)
            for w, concat in zip(widths[:-1], options.concat_per_block()))
        self.linear_out = nn.Linear(widths[-1], channels)
        self.code_size, self.channels = code_size, channels

    def features(self, height: int, width: int, device: torch.device) -> torch.Tensor:
        o = self.options
        return encode_positions(pixel_positions(height, width, device), o.pos_freqs, o.pos_cos)

    def _rows(self, codes: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """codes [B, code], pos [P, features] -> colours [B, P, channels]."""
        w_code, w_pos = self.linear_in.weight.split([self.code_size, pos.shape[1]], dim=1)
        h = (codes @ w_code.T + self.linear_in.bias)[:, None, :] + (pos @ w_pos.T)[None, :, :]
        x = self.act_in(h).reshape(-1, h.shape[-1])
        for block in self.blocks:
            x = block(x)
        x = self.linear_out(x)
        x = torch.sigmoid(x) if self.options.out_activation == "sigmoid" else x.clamp(0, 1)
        return x.reshape(codes.shape[0], pos.shape[0], self.channels)

    def forward(self, codes: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """codes [B, code_size] -> images [B, channels, height, width] in [0, 1]."""
        if codes.dim() != 2 or codes.shape[1] != self.code_size:
            raise ValueError(f"codes must be [B, {self.code_size}], got {tuple(codes.shape)}")
        if height < 1 or width < 1:
            raise ValueError(f"height and width must be at least 1, got {height}x{width}")
        pos = self.features(height, width, codes.device).to(codes.dtype)
        per_image = height * width
        if torch.is_grad_enabled() or self.training or codes.shape[0] * per_image <= _ROWS_PER_CHUNK:
            out = self._rows(codes, pos)
        else:  # eval rows are independent (batch norm uses running statistics): decode in chunks
            step = max(1, _ROWS_PER_CHUNK // per_image)
            out = torch.cat([self._rows(codes[i:i + step], pos) for i in range(0, codes.shape[0], step)])
        return out.permute(0, 2, 1).reshape(codes.shape[0], self.channels, height, width)
