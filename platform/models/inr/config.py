"""Typed options of the `inr` family (`model.options`) and its sampling parameters.

Defaults follow seed 001: the simple CNN encoder, the "manifold" decoder of
8 blocks × 2 layers × 128 hidden with batch norm and added residuals, the
position encoded as (x, y, sin 7x, sin 7y, sin 17x, sin 17y), L1 loss and the
batch std/mean code constraint at factor 1e-4.
"""
from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator, model_validator

from raygen.models.layers import activation_name
from raygen.models.sampling import SamplingParams

ENCODERS = ("cnn", "dalle", "resnet18", "transformer")


class _Options(BaseModel):
    model_config = ConfigDict(extra="forbid")


#: an activation by name or by seed 000's number; an unknown name fails listing the valid ones
Activation = Annotated[str, BeforeValidator(activation_name)]


class CNNOptions(_Options):
    """The seed's "simple 3-layer CNN": unpadded convolutions, then a linear layer to the code."""
    channels: list[int] = Field([16, 24, 32], min_length=1, max_length=8, description="output channels per conv layer")
    kernel: int = Field(3, ge=1, le=9, description="kernel size of every conv layer (no padding)")
    activation: Activation = Field("relu", description="activation after each conv layer (raygen.models.layers names)")


class DalleOptions(_Options):
    """The small DALL-E-style encoder (OpenAI's dVAE encoder, shrunk): a 7×7 input conv, `groups`
    groups of bottleneck residual blocks with widths hid·(1, 2, 4, 8), downsampling 2× between groups."""
    hid: int = Field(64, ge=4, le=1024, description="n_hid: width of the first group (a multiple of 4)")
    blocks_per_group: int = Field(1, ge=1, le=8, description="n_blk_per_group: residual blocks per group")
    groups: int = Field(4, ge=1, le=6, description="groups; each but the last halves the resolution")
    space_to_depth: bool = Field(True, description="downsample by space-to-depth + 1×1 conv (4C -> C) instead of "
                                                   "2×2 max-pooling")
    activation: Activation = Field("gelu", description="activation in the residual blocks (raygen.models.layers names)")

    @field_validator("hid")
    @classmethod
    def _hid(cls, v: int) -> int:
        if v % 4:
            raise ValueError(f"{v} must be a multiple of 4 (the blocks' bottleneck is hid/4)")
        return v


class ResNetOptions(_Options):
    """torchvision's ResNet-18 without its average pool and classifier, then a linear layer to the code."""
    weights: str | None = Field(None, description="local ImageNet state dict for resnet18 (.pth loaded with "
                                                  "weights_only=True, or .safetensors); None: random init. "
                                                  "Nothing is downloaded")


class TransformerOptions(_Options):
    """Conv patches (kernel `patch`, stride `stride`) as tokens, a transformer encoder, then a linear
    layer from all tokens to the code (seed 001's mnist matrix)."""
    patch: int = Field(4, ge=1, le=64, description="conv patch size (kernel)")
    stride: int | None = Field(None, ge=1, le=64, description="conv stride, at most patch; None: = patch")
    layers: int = Field(2, ge=1, le=32, description="transformer layers")
    heads: int = Field(4, ge=1, le=32, description="attention heads (must divide hid)")
    hid: int = Field(64, ge=4, le=2048, description="token width")
    mlp: int | None = Field(None, ge=4, description="feed-forward width; None: = hid (the seed's)")
    dropout: float = Field(0.0, ge=0.0, lt=1.0)

    @model_validator(mode="after")
    def _checks(self) -> "TransformerOptions":
        if self.stride is not None and self.stride > self.patch:
            raise ValueError(f"stride {self.stride} must be at most patch ({self.patch}); lower stride or raise patch")
        if self.hid % self.heads:
            raise ValueError(f"hid {self.hid} must be a multiple of heads ({self.heads})")
        return self


class DecoderOptions(_Options):
    """The "manifold" decoder: (code, encoded pixel position) -> colour, one pixel at a time."""
    hid: int = Field(128, ge=1, le=8192, description="hidden width of the first block (decoder_n_hid)")
    blocks: int = Field(8, ge=1, le=64, description="residual blocks (decoder_n_blk)")
    layers: int = Field(2, ge=1, le=16, description="fully connected layers per block (decoder_n_layer)")
    concat: bool | list[bool] = Field(False, description="join a block's output to its input by concatenation "
                                                         "(doubles the width) instead of addition: one bool for "
                                                         "every block, or a list with one per block")
    batch_norm: bool = Field(True, description="batch norm at the start of each block")
    activation: Activation = Field("gelu", description="hidden activation (raygen.models.layers names)")
    out_activation: Literal["sigmoid", "clamp"] = Field("sigmoid", description="maps the last layer to [0, 1]")
    pos_freqs: list[float] = Field([7.0, 17.0], max_length=32,
                                   description="frequencies f of the position encoding: x, y, sin(f·x), sin(f·y) "
                                               "for x, y in [-1, 1]")
    pos_cos: bool = Field(False, description="also cos(f·x), cos(f·y) (the seed's later layout)")

    @model_validator(mode="after")
    def _checks(self) -> "DecoderOptions":
        if isinstance(self.concat, list) and len(self.concat) != self.blocks:
            raise ValueError(f"concat has {len(self.concat)} entries but there are {self.blocks} blocks; give one "
                             "per block or a single bool")
        return self

    def concat_per_block(self) -> list[bool]:
        return list(self.concat) if isinstance(self.concat, list) else [self.concat] * self.blocks

    def widths(self) -> list[int]:
        """Input width of every block, then the width the output layer sees."""
        out, w = [], self.hid
        for concat in self.concat_per_block():
            out.append(w)
            w = 2 * w if concat else w
        return out + [w]

    @property
    def pos_size(self) -> int:
        return 2 * (1 + len(self.pos_freqs) * (2 if self.pos_cos else 1))


class INRConfig(BaseModel):
    """Options of the `inr` family: an image encoder to a code, and the manifold decoder."""
    model_config = ConfigDict(extra="forbid")

    code_size: int = Field(128, ge=1, le=65536, description="width of the code between encoder and decoder")
    encoder: Literal["cnn", "dalle", "resnet18", "transformer"] = Field("cnn", description="which image encoder")
    cnn: CNNOptions = Field(default_factory=CNNOptions)
    dalle: DalleOptions = Field(default_factory=DalleOptions)
    resnet18: ResNetOptions = Field(default_factory=ResNetOptions)
    transformer: TransformerOptions = Field(default_factory=TransformerOptions)
    freeze: Literal["none", "backbone", "all"] = Field(
        "none", description="frozen encoder weights: backbone = all but the last linear layer to the code "
                            "(e.g. ImageNet ResNet-18 features), all = the whole encoder")
    decoder: DecoderOptions = Field(default_factory=DecoderOptions)
    loss: Literal["l1", "l2"] = Field("l1", description="reconstruction loss")
    constraint: float = Field(1e-4, ge=0.0, description="factor of the code constraint "
                                                        "|target_std - std_batch(code).mean()| + |mean(code)| "
                                                        "(0: off)")
    target_std: float = Field(0.5, gt=0.0, description="the per-dimension batch std the constraint pulls codes "
                                                       "towards; sampling draws codes from N(0, target_std²)")
    conditioning: Literal["image", "none"] = Field(
        "image", description="image: a sample takes an optional input image (reconstruct it, or draw a code when "
                             "none is given); none: unconditional sampling only")

    @classmethod
    def debug(cls, **overrides: Any) -> "INRConfig":
        """The tiny flavor used by tests and smoke runs."""
        base = {"code_size": 8, "cnn": {"channels": [4, 4]}, "decoder": {"hid": 8, "blocks": 2, "layers": 1}}
        for key, value in overrides.items():
            if isinstance(value, dict) and isinstance(base.get(key), dict):
                base[key] = {**base[key], **value}
            else:
                base[key] = value
        return cls.model_validate(base)


class INRSampling(SamplingParams):
    """How codes are chosen: drawn from N(0, code_std²) when a sample has no input image, else the
    image's code; optionally moved towards a second image's code (interpolation)."""
    code_std: float = Field(0.5, ge=0.0, le=5.0, description="std of drawn codes (the constraint's target std: 0.5)")
    toward: str | None = Field(None, min_length=1, description="a second image (base64 PNG/JPEG): interpolate "
                                                               "every code towards its code by `mix`")
    mix: float = Field(0.5, ge=0.0, le=1.0, description="interpolation weight of `toward`'s code (0: none, "
                                                        "1: toward's code only); ignored without `toward`")
