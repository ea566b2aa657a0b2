"""The image decoder: a start block up to full resolution, talking with the scene tokens.

    tokens -> masked mean -> linear -> start block [c0, h0, w0] (batch norm)
    per stage i: (upsample x2, conv, BN) -> residual conv blocks (BN)
                 -> SeqToImage (image reads tokens) -> ImageToSeq (tokens read image)
                 -> seq blocks (ImageToSeq and seq blocks between stages only)
    -> 1x1 conv -> output activation

Channels per stage follow one of three strategies (seed 002): expand then
halve, constant then halve, or halve from the start.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from raygen.models.layers import make_activation
from raygen.models.renderer.blocks import ImageToSeq, SeqToImage, TransformerLayer
from raygen.models.renderer.config import RendererConfig


def stage_channels(strategy: str, start: int, stages: int, turn: int | None = None, floor: int = 1) -> list[int]:
    """Channels of each of `stages` stages (the start block is stage 0)."""
    turn = (stages - 1) // 2 if turn is None else min(turn, stages - 1)
    out = []
    for i in range(stages):
        if strategy == "halve":
            c = start / 2 ** i
        elif strategy == "constant_halve":
            c = start / 2 ** max(0, i - turn)
        elif strategy == "expand_halve":
            c = start * 2 ** min(i, turn) / 2 ** max(0, i - turn)
        else:
            raise ValueError(f"unknown channel_strategy {strategy!r}; use expand_halve, constant_halve or halve")
        out.append(max(floor, int(c)))
    return out


def start_block_size(height: int, width: int, start: int) -> tuple[int, int, int]:
    """(upsamples, h0, w0): the start block whose side doubles up to the image."""
    side = min(height, width)
    ups = round(math.log2(side / start)) if side >= start else -1
    if ups < 0 or start * 2 ** ups != side or height % 2 ** ups or width % 2 ** ups:
        raise ValueError(f"model.options.start_size {start} does not double up to the {height}x{width} images; "
                         f"choose a size with start_size * 2^k = {side} (e.g. 4 or {side})")
    return ups, height // 2 ** ups, width // 2 ** ups


class ConvBlock(nn.Module):
    """x -> act(x + BN(conv(act(BN(conv(x))))))."""

    def __init__(self, channels: int, activation: str):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels)
        self.conv2, self.bn2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels)
        self.act = make_activation(activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(x + self.bn2(self.conv2(self.act(self.bn1(self.conv1(x))))))


class Stage(nn.Module):
    def __init__(self, c_in: int, c: int, upsample: bool, cfg: RendererConfig, attn: int, last: bool):
        super().__init__()
        self.upsample = upsample
        self.enter = nn.Sequential(nn.Conv2d(c_in, c, 3, padding=1, bias=False), nn.BatchNorm2d(c),
                                   make_activation(cfg.activation)) if upsample else nn.Identity()
        self.blocks = nn.Sequential(*(ConvBlock(c, cfg.activation) for _ in range(cfg.blocks_per_stage)))
        self.seq_to_image = SeqToImage(c, cfg.dim, attn, cfg.heads, cfg.seq_to_image_fraction,
                                       cfg.mix_bias_init) if cfg.seq_to_image else None
        # after the last stage nothing reads the sequence: no ImageToSeq or seq blocks there (unused
        # parameters would also stall DDP, which waits for every parameter's gradient)
        self.image_to_seq = ImageToSeq(cfg.dim, c, cfg.heads, cfg.image_to_seq_pool) \
            if cfg.image_to_seq and not last else None
        self.seq_blocks = nn.ModuleList(TransformerLayer(cfg.dim, cfg.heads, cfg.ff_mult, cfg.activation,
                                                         cfg.seq_dropout) for _ in range(0 if last else cfg.seq_blocks))

    def forward(self, x, seq, mask):
        if self.upsample:
            x = self.enter(F.interpolate(x, scale_factor=2, mode="nearest"))
        x = self.blocks(x)
        if self.seq_to_image is not None:
            x = self.seq_to_image(x, seq, mask)
        if self.image_to_seq is not None:
            seq = self.image_to_seq(seq, mask, x)
        for layer in self.seq_blocks:
            seq = layer(seq, mask)
        return x, seq


class ImageDecoder(nn.Module):
    def __init__(self, cfg: RendererConfig, channels: int, height: int, width: int):
        super().__init__()
        ups, self.h0, self.w0 = start_block_size(height, width, cfg.start_size)
        self.channels = stage_channels(cfg.channel_strategy, cfg.start_channels, ups + 1, cfg.turn_stage,
                                       cfg.min_channels)
        c0 = self.channels[0]
        self.start = nn.Linear(cfg.dim, c0 * self.h0 * self.w0)
        self.start_norm = nn.Sequential(nn.BatchNorm2d(c0), make_activation(cfg.activation))
        stages, c_prev = [], c0
        for i, c in enumerate(self.channels):
            attn = max(cfg.heads, round(cfg.attn_channels * c / c0 / cfg.heads) * cfg.heads)
            stages.append(Stage(c_prev, c, i > 0, cfg, attn, last=i == len(self.channels) - 1))
            c_prev = c
        self.stages = nn.ModuleList(stages)
        self.to_image = nn.Conv2d(c_prev, channels, 1)

    def forward(self, seq: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        m = mask[..., None].to(seq.dtype)
        pooled = (seq * m).sum(1) / m.sum(1).clamp(min=1)
        x = self.start_norm(self.start(pooled).reshape(-1, self.channels[0], self.h0, self.w0))
        for stage in self.stages:
            x, seq = stage(x, seq, mask)
        return self.to_image(x)
