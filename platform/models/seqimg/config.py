"""Typed options of the seqimg family (`model.options` in a job spec).

Checks that need only the options run here (a bad name fails with the field
and the accepted values); checks that need the data (does the patch size
divide the resolution? are there labels?) run when the model is built.
"""
from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator

from raygen.models.layers.activations import ACTIVATION_NUMBERS, ACTIVATIONS
from raygen.models.layers.norms import NORM_NUMBERS
from raygen.models.layers.residual import RESIDUAL_NUMBERS
from raygen.models.text import TextEncoderConfig

BackboneName = Literal["lstm", "gru", "mingru", "mlp", "gpt2", "alibi", "modern", "gnn", "mamba", "convnet"]


def _seed_number(numbers: dict[int, str], kind: str):
    """Accept the seed's number for an option and store its name instead."""
    def convert(value):
        if isinstance(value, int) and not isinstance(value, bool):
            if value not in numbers:
                raise ValueError(f"{kind} number {value} is not one of "
                                 + ", ".join(f"{n} ({name})" for n, name in sorted(numbers.items())))
            return numbers[value]
        if isinstance(value, str) and value not in numbers.values():
            raise ValueError(f"unknown {kind} '{value}'; choose one of: {', '.join(numbers.values())} "
                             f"(or the seed's number 0-{max(numbers)})")
        return value
    return BeforeValidator(convert)


ActivationName = Annotated[Literal[tuple(ACTIVATIONS)],  # type: ignore[valid-type]
                           _seed_number(ACTIVATION_NUMBERS, "activation")]
NormName = Annotated[Literal["none", "instance", "batch", "rms", "layer"], _seed_number(NORM_NUMBERS, "norm")]
ResidualName = Annotated[Literal["none", "highway", "standard", "rezero"],
                         _seed_number(RESIDUAL_NUMBERS, "residual")]

ATTENTION_BACKBONES = ("gpt2", "alibi", "modern")
ROTARY_BACKBONES = ("gpt2", "modern")

# The positional embedding a backbone gets when `pos_embedding` is left unset.
DEFAULT_POSITIONAL = {"alibi": "none", "modern": "rotary"}
# What the modern transformer adds by default (the seed's "modernized" GPT-2):
# layer scale, dropout and DropPath; other backbones have them off unless set.
DEFAULT_LAYER_SCALE = {"modern": 0.1}
DEFAULT_DROPOUT = {"modern": 0.1}
DEFAULT_DROP_PATH = {"modern": 0.1}


class SeqImgConfig(BaseModel):
    """Patch-autoregressive image generator: an image is cut into patches, and a
    causal backbone predicts each patch from the ones before it."""

    model_config = ConfigDict(extra="forbid")

    # ---- what is generated, and how it is cut into tokens
    backbone: BackboneName = Field("gpt2", description="sequence model over the patches")
    patch_mode: Literal["rowwise", "columnwise", "square"] = Field(
        "rowwise", description="rowwise: strips of rows; columnwise: strips of columns; square: p x p patches in raster order")
    patch_size: int | None = Field(
        None, ge=1, description="rows per token (rowwise), columns per token (columnwise), patch side (square); default 1, 1, 4")
    head: Literal["regression_l1", "regression_l2", "categorical"] = Field(
        "categorical", description="regression of the next patch (L1/L2) or 256 levels per sub-pixel (cross-entropy)")
    conditioning: Literal["none", "label", "caption"] = Field(
        "none", description="what the start token is made from: a learned vector, a class label, or a caption")
    cond_dropout: float = Field(0.0, ge=0.0, lt=1.0,
                                description="training: replace the label/caption by the null one with this probability")
    input_noise: float = Field(
        0.0, ge=0.0, description="training: std of Gaussian noise on teacher-forced input patches (in [-1, 1] units)")

    # ---- backbone size and shared options
    dim: int = Field(64, ge=4, description="token width")
    depth: int = Field(3, ge=1, le=64, description="blocks")
    heads: int = Field(4, ge=1, description="attention heads (transformers, GNN)")
    ff_mult: float = Field(4.0, ge=0.0, description="feed-forward hidden width / dim; 0 removes the feed-forward sublayer")
    dropout: float | None = Field(
        None, ge=0.0, lt=1.0,
        description="dropout on every sublayer output and on attention weights; default 0.1 for modern, else 0")
    drop_path: float | None = Field(
        None, ge=0.0, lt=1.0,
        description="stochastic depth rate of the last block (linear from 0); default 0.1 for modern, else 0")
    layer_scale: float | None = Field(
        None, gt=0.0, description="trainable per-channel branch scale, initial value; default 0.1 for modern, else off")
    pos_embedding: Literal["none", "sinusoidal", "learned", "rotary"] | None = Field(
        None, description="default: rotary for modern, none for alibi, learned for the rest")
    activation: ActivationName = Field(
        "gelu", description="feed-forward activation: a name or the seed's number 0-22 (stored as the name)")
    glu: bool = Field(False, description="use the activation as the gate of a GLU")
    residual: ResidualName = Field(
        "standard", description="how a sublayer joins its input: none, highway, standard, rezero (or 0-3)")
    norm: NormName = Field(
        "layer", description="pre-sublayer and final norm: none, instance, batch, rms, layer (or 0-4)")

    # ---- backbone-specific
    mingru_expand: float = Field(1.5, gt=0.0, description="minGRU inner width / dim")
    mlp_token_mixing: bool = Field(True, description="mlp: causal token-mixing layer; off = the seed's position-wise MLP")
    gnn_radius: int = Field(1, ge=1, description="gnn: a patch receives edges from earlier patches within this grid distance")
    mamba_state: int = Field(16, ge=1, description="mamba: SSM state size N")
    mamba_expand: int = Field(2, ge=1, description="mamba: inner width / dim")
    mamba_conv: int = Field(4, ge=1, description="mamba: causal depthwise conv width")
    mamba_dt_rank: int | None = Field(None, ge=1, description="mamba: rank of the step-size projection; default ceil(dim/16)")
    use_mamba_kernel: bool = Field(True, description="mamba: use mamba_ssm's CUDA selective scan when installed and on GPU")
    conv_kernel: int = Field(3, ge=2, description="convnet: kernel width")
    conv_dilation: Literal["exponential", "constant"] = Field(
        "exponential", description="convnet: dilation 2**layer (exponential) or 1 everywhere")

    text: TextEncoderConfig = Field(default_factory=TextEncoderConfig,
                                    description="caption encoder (conditioning: caption)")

    @model_validator(mode="after")
    def _cross_checks(self) -> "SeqImgConfig":
        pos = self.pos_embedding
        if pos == "rotary" and self.backbone not in ROTARY_BACKBONES:
            raise ValueError(f"pos_embedding 'rotary' works inside attention: backbone must be one of "
                             f"{', '.join(ROTARY_BACKBONES)} (got backbone '{self.backbone}')")
        if self.backbone == "alibi" and pos not in (None, "none"):
            raise ValueError(f"backbone 'alibi' takes position from its attention bias: pos_embedding must be 'none' (got '{pos}')")
        if self.backbone in ATTENTION_BACKBONES + ("gnn",) and self.dim % self.heads:
            raise ValueError(f"dim ({self.dim}) must be divisible by heads ({self.heads}) for backbone '{self.backbone}'")
        if self.positional == "rotary" and (self.dim // self.heads) % 2:
            raise ValueError(f"rotary embeddings need an even head size: dim/heads = {self.dim // self.heads}")
        if self.backbone == "mlp" and not self.mlp_token_mixing and self.ff_mult == 0:
            raise ValueError("backbone 'mlp' with mlp_token_mixing false needs ff_mult > 0 (else no layer is left)")
        return self

    # ---- resolved defaults
    @property
    def positional(self) -> str:
        return self.pos_embedding or DEFAULT_POSITIONAL.get(self.backbone, "learned")

    @property
    def layer_scale_init(self) -> float | None:
        return self.layer_scale if self.layer_scale is not None else DEFAULT_LAYER_SCALE.get(self.backbone)

    @property
    def dropout_rate(self) -> float:
        return self.dropout if self.dropout is not None else DEFAULT_DROPOUT.get(self.backbone, 0.0)

    @property
    def drop_path_rate(self) -> float:
        return self.drop_path if self.drop_path is not None else DEFAULT_DROP_PATH.get(self.backbone, 0.0)

    def resolved_patch_size(self) -> int:
        return self.patch_size or (4 if self.patch_mode == "square" else 1)

    @classmethod
    def debug(cls, **overrides) -> "SeqImgConfig":
        """The tiny flavor used by tests and smoke runs."""
        base = dict(dim=16, depth=2, heads=2, ff_mult=2.0, mamba_state=4, mamba_expand=2,
                    text=TextEncoderConfig(dim=16, depth=1, heads=2, max_len=32))
        return cls.model_validate({**base, **overrides})
