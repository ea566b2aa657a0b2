"""The denoiser: a diffusers UNet configured from `UNetOptions`, and the
inputs the condition gives it.

How a condition reaches the UNet (all of it inside the diffusers model, so an
export to diffusers holds everything but the text encoder):

| condition | cross-attention (attention self_cross / cross)      | timestep embedding (condition_in_timestep) |
| --------- | --------------------------------------------------- | ------------------------------------------ |
| label     | one token: one-hot(label) through `encoder_hid_proj` | `num_class_embeds` (an embedding table)    |
| caption   | the text encoder's tokens, padding masked            | `class_embed_type="projection"` of the pooled caption |

The null condition of classifier-free guidance is the extra class `num_classes`
(labels) or the empty caption "". With no cross-attention and no caption the
UNet is a `UNet2DModel` (diffusers' DDPM/DDIM pipelines run it as is);
otherwise a `UNet2DConditionModel`.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel, UNet2DModel
from torch import nn

from raygen.models.diffusion.config import UNetOptions

SPACE_TO_DEPTH = 2  # the efficient layout's factor


@dataclass(frozen=True)
class CondInputs:
    """What the UNet is conditioned on, for a batch (fields unused by the layout are None)."""
    tokens: torch.Tensor | None = None        # [B, T, D] cross-attention keys/values
    mask: torch.Tensor | None = None          # [B, T] bool, True on real tokens
    class_labels: torch.Tensor | None = None  # long [B] (labels, noise levels) or float [B, D] (pooled captions)
    image: torch.Tensor | None = None         # [B, C, H, W] concatenated to the input (super-resolution)

    @staticmethod
    def cat(a: "CondInputs", b: "CondInputs") -> "CondInputs":
        """Stack two batches (conditional then unconditional) into one forward pass."""
        tokens = mask = labels = None
        if a.tokens is not None:
            width = max(a.tokens.shape[1], b.tokens.shape[1])
            tokens = torch.cat([F.pad(x.tokens, (0, 0, 0, width - x.tokens.shape[1])) for x in (a, b)])
            if a.mask is not None:
                mask = torch.cat([F.pad(x.mask, (0, width - x.mask.shape[1]), value=False) for x in (a, b)])
        if a.class_labels is not None:
            labels = torch.cat([a.class_labels, b.class_labels])
        image = None if a.image is None else torch.cat([a.image, b.image])
        return CondInputs(tokens, mask, labels, image)

    def expand(self, n: int) -> "CondInputs":
        """A batch-1 condition repeated n times."""
        rep = lambda x: None if x is None else x.expand(n, *x.shape[1:])  # noqa: E731
        return replace(self, tokens=rep(self.tokens), mask=rep(self.mask), class_labels=rep(self.class_labels),
                       image=rep(self.image))


def block_types(opts: UNetOptions) -> tuple[tuple[str, ...], tuple[str, ...], str | None]:
    """(down, up, mid) diffusers block names for the options."""
    levels = opts.levels_with_attention()
    if opts.has_cross_attention:
        down_attn, up_attn = "CrossAttnDownBlock2D", "CrossAttnUpBlock2D"
        # cross only: diffusers' middle blocks with attention all hold self-attention (the SimpleCrossAttn one
        # can drop it, but it mis-pads a caption's padding mask), so the middle stays ResNets; the transformer
        # blocks of the down and up levels get only_cross_attention
        mid = "UNetMidBlock2D" if opts.attention == "cross" else "UNetMidBlock2DCrossAttn"
    elif opts.attention == "self":
        down_attn, up_attn, mid = "AttnDownBlock2D", "AttnUpBlock2D", "UNetMidBlock2D"
    else:
        down_attn, up_attn, mid = "DownBlock2D", "UpBlock2D", "UNetMidBlock2D"
    down = tuple(down_attn if on else "DownBlock2D" for on in levels)
    up = tuple(up_attn if on else "UpBlock2D" for on in reversed(levels))
    return down, up, mid


def build_unet(opts: UNetOptions, *, channels: int, size: tuple[int, int], condition: str,
               num_classes: int = 0, text_dim: int = 0, image_channels: int = 0) -> nn.Module:
    """A diffusers UNet for inputs [B, channels, *size] (before the efficient layout's space-to-depth).

    image_channels > 0 (super-resolution): that many channels of a conditioning image are concatenated to
    the input, and the timestep-embedding slot carries the image's noise-augmentation level
    (class_embed_type "timestep"), so the condition enters only through cross-attention."""
    factor = SPACE_TO_DEPTH if opts.efficient else 1
    h, w = size
    levels = len(opts.widths)
    need = factor * 2 ** (levels - 1)
    if h % need or w % need:
        raise ValueError(f"unet: {levels} levels{' and the efficient layout' if opts.efficient else ''} need a "
                         f"side divisible by {need}, got {h}x{w}; use fewer widths or another resolution")
    in_ch, out_ch = (channels + image_channels) * factor * factor, channels * factor * factor
    sample = (h // factor, w // factor) if h != w else h // factor
    down, up, mid = block_types(opts)
    heads = tuple(max(1, width // opts.head_dim) for width in opts.widths)
    upscaler = image_channels > 0
    in_time = opts.timestep_condition() and condition != "none" and not upscaler
    common = dict(sample_size=sample, in_channels=in_ch, out_channels=out_ch, block_out_channels=tuple(opts.widths),
                  layers_per_block=opts.layers_per_block, down_block_types=down, up_block_types=up,
                  norm_num_groups=opts.norm_groups, dropout=opts.dropout)
    if upscaler:
        common["class_embed_type"] = "timestep"
    if not opts.has_cross_attention and (condition != "caption" or upscaler):
        # UNet2DModel: its attention_head_dim is channels per head
        return UNet2DModel(**common, attention_head_dim=opts.head_dim, add_attention=opts.attention == "self",
                           num_class_embeds=(num_classes + 1) if condition == "label" and in_time else None)
    kwargs = dict(common, mid_block_type=mid, attention_head_dim=heads,  # (diffusers: heads per level)
                  transformer_layers_per_block=opts.transformer_layers,
                  only_cross_attention=opts.attention == "cross")
    if condition == "label":
        cross_dim = opts.cross_attention_dim or opts.widths[0]
        kwargs.update(cross_attention_dim=cross_dim, encoder_hid_dim=num_classes + 1, encoder_hid_dim_type="text_proj")
        if in_time:
            kwargs["num_class_embeds"] = num_classes + 1
    elif condition == "caption":
        kwargs["cross_attention_dim"] = text_dim
        if in_time:
            kwargs.update(class_embed_type="projection", projection_class_embeddings_input_dim=text_dim)
    return UNet2DConditionModel(**kwargs)


class Denoiser(nn.Module):
    """The UNet with the efficient layout's (un)shuffle around it: predicts the
    training target from (x_t, t, condition)."""

    def __init__(self, unet: nn.Module, efficient: bool):
        super().__init__()
        self.unet = unet
        self.factor = SPACE_TO_DEPTH if efficient else 1
        self.conditional_unet = isinstance(unet, UNet2DConditionModel)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: CondInputs) -> torch.Tensor:
        # everything the UNet reads in x's dtype (its weights' under DeepSpeed bf16), labels and levels stay long
        tokens = None if cond.tokens is None else cond.tokens.to(x.dtype)
        labels = cond.class_labels
        if labels is not None and labels.is_floating_point():
            labels = labels.to(x.dtype)
        if cond.image is not None:
            x = torch.cat([x, cond.image.to(x.dtype)], dim=1)
        if self.factor > 1:
            x = F.pixel_unshuffle(x, self.factor)
        if t.dim() == 0:
            t = t.expand(x.shape[0])
        if self.conditional_unet:
            mask = None if cond.mask is None else cond.mask.to(x.dtype)
            out = self.unet(x, t, encoder_hidden_states=tokens, class_labels=labels,
                            encoder_attention_mask=mask).sample
        else:
            out = self.unet(x, t, class_labels=labels).sample
        if self.factor > 1:
            out = F.pixel_shuffle(out, self.factor)
        return out
