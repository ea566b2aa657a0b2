"""Typed options of the renderer family (`model.options` in a job spec).

Checks that need only the options run here; checks that need the data (does
the start block divide the resolution? does the dataset carry scenes?) run
when the model is built.
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from raygen.models.layers.activations import ACTIVATIONS

ChannelStrategy = Literal["expand_halve", "constant_halve", "halve"]
OutputActivation = Literal["none", "tanh", "relu", "celu", "exp"]
LossName = Literal["l1", "l2", "value_smooth_l1"]


class RendererConfig(BaseModel):
    """Scene (a set of spheres plus globals) -> image: a transformer over the
    scene's tokens and a convolutional decoder that exchanges information with
    the sequence at every stage (seed 002)."""

    model_config = ConfigDict(extra="forbid")

    # ---- the scene encoder
    dim: int = Field(64, ge=8, le=1024, description="width of the scene tokens (one per sphere, one for the globals)")
    heads: int = Field(4, ge=1, le=32, description="attention heads of every attention layer (must divide dim)")
    ff_mult: int = Field(2, ge=1, le=8, description="feed-forward hidden width = ff_mult * dim")
    activation: str = Field("gelu", description="activation of the transformer feed-forward layers "
                                                "(any name of raygen.models.layers.ACTIVATIONS)")
    base_layers: int = Field(1, ge=0, le=12, description="layers of the base transformer over the scene tokens "
                                                         "(0: none; seed 002: one layer beats none)")
    share_base_params: bool = Field(False, description="reuse one layer's parameters for every base layer "
                                                       "(seed 002: 'parameter sharing is a bust')")

    # ---- the image decoder
    start_size: int = Field(4, ge=1, le=64, description="shorter side of the start block; the decoder doubles it "
                                                        "up to the image size (must be size / 2^k)")
    channel_strategy: ChannelStrategy = Field(
        "expand_halve", description="channels per stage: expand_halve doubles them up to the turn stage, then "
                                    "halves them each upsample; constant_halve keeps them until the turn, then "
                                    "halves; halve halves them from the start")
    start_channels: int = Field(32, ge=4, le=2048, description="channels of the start block")
    turn_stage: int | None = Field(None, ge=0, description="stage where halving begins for expand_halve and "
                                                           "constant_halve (default: half the stages)")
    min_channels: int = Field(8, ge=1, description="channels never fall below this")
    blocks_per_stage: int = Field(1, ge=0, le=8, description="residual conv blocks (conv, batch norm, act) per stage")

    # ---- exchange between sequence and image
    image_to_seq: bool = Field(True, description="ImageToSeq at every stage: the sequence attends to pooled image "
                                                 "features (seed 002: critical for test loss)")
    image_to_seq_pool: int = Field(4, ge=1, le=16, description="ImageToSeq pools the feature map to at most "
                                                               "this many cells per side")
    seq_to_image: bool = Field(True, description="SeqToImage at every stage: image features cross-attend to "
                                                 "the sequence through the gate sigmoid(mix_bias)")
    attn_channels: int = Field(16, ge=1, le=1024, description="SeqToImage attention width at the start block; it "
                                                              "follows the channels' halving, at least heads")
    seq_to_image_fraction: float = Field(1.0, gt=0.0, le=1.0, description="fraction of each stage's channels "
                                                                          "that SeqToImage is added to (1: all)")
    mix_bias_init: float = Field(0.0, ge=-20.0, le=20.0, description="initial SeqToImage mix bias; gate = "
                                                                     "sigmoid(bias): 0 -> 0.5 (seed 002: -10 "
                                                                     "left the attention without effect)")
    seq_blocks: int = Field(0, ge=0, le=8, description="transformer layers on the sequence after each decoder "
                                                       "stage but the last")
    seq_dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout inside the seq blocks")

    # ---- output and loss
    output_activation: OutputActivation = Field(
        "none", description="none, tanh (as (tanh+1)/2, in [0, 1]), relu, celu or exp; samples are clamped "
                            "to [0, 1]")
    loss: LossName = Field("value_smooth_l1", description="l1, l2, or value_smooth_l1: smooth L1 scaled by the "
                                                          "true image's value + 1 (seed 002)")
    smooth_l1_beta: float = Field(0.1, gt=0.0, le=1.0, description="value_smooth_l1: where smooth L1 turns linear")

    @model_validator(mode="after")
    def _checks(self) -> "RendererConfig":
        if self.dim % self.heads:
            raise ValueError(f"dim {self.dim} must be a multiple of heads {self.heads}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {self.activation!r}; choose one of: {', '.join(ACTIVATIONS)}")
        if self.share_base_params and self.base_layers < 2:
            raise ValueError("share_base_params needs base_layers >= 2 (one layer has nothing to share)")
        if self.seq_dropout and not self.seq_blocks:
            raise ValueError("seq_dropout applies to seq blocks; set seq_blocks >= 1 or leave seq_dropout 0")
        return self

    @classmethod
    def debug(cls, **overrides: Any) -> "RendererConfig":
        """The tiny flavor tests and smoke runs use."""
        return cls.model_validate({"dim": 16, "heads": 2, "start_channels": 8, "attn_channels": 4,
                                   "min_channels": 4, **overrides})
