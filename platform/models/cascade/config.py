"""Typed options of the cascade families (seed 004's config.json keys, one model each).

    cascade_ae   AutoencoderConfig   the fully convolutional autoencoder
    som          SOMConfig           the self-organizing-map codebooks (one per level + the whole-map one)
    cascade      CascadeConfig       the base transformer and the encoder-decoder refiners
                 CascadeSampling     per-level decoding: temperature, top-k/top-p, beam search
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from raygen.models.layers.activations import activation_name
from raygen.models.sampling import SamplingParams


def _activation(value: str) -> str:
    return activation_name(value)  # one-line error listing the accepted names


# ---------------------------------------------------------------- stage 1: autoencoder
class AutoencoderConfig(BaseModel):
    """The seed's autoencoder config.json, key for key (`model_lr` is `train.optimizer.lr`)."""
    model_config = ConfigDict(extra="forbid")

    image_channel: int | None = Field(None, ge=1, le=16, description="channels of the images (default: the data's; "
                                                                     "a different number is an error)")
    min_channel: int = Field(32, ge=1, le=2048, description="channels of the first (full-resolution) conv layers")
    max_channel: int = Field(64, ge=1, le=2048, description="channels are doubled at each downsampling, up to this")
    num_layers: int = Field(2, ge=0, le=6, description="stride-2 downsamplings: the latent map is H/2^n x W/2^n")
    latent_channel: int = Field(4, ge=1, le=256, description="channels C of the latent map")
    hidden_activation_type: str = Field("silu", description="activation between conv layers (a layers name, e.g. "
                                                            "silu, relu, gelu, tanh)")
    use_final_enc_activation: bool = Field(True, description="apply encoder_activation_type to the latent map")
    encoder_activation_type: str = Field("tanh", description="final activation of the encoder (tanh bounds the "
                                                             "latent map to [-1, 1])")
    use_final_dec_activation: bool = Field(True, description="apply decoder_activation_type to the decoder output")
    decoder_activation_type: str = Field("tanh", description="final activation of the decoder; its [-1, 1] (tanh) "
                                                             "or [0, 1] (sigmoid) range is mapped to image values")

    @field_validator("hidden_activation_type", "encoder_activation_type", "decoder_activation_type")
    @classmethod
    def _act(cls, v: str) -> str:
        return _activation(v)

    @model_validator(mode="after")
    def _channels(self) -> "AutoencoderConfig":
        if self.max_channel < self.min_channel:
            raise ValueError(f"max_channel {self.max_channel} is below min_channel {self.min_channel}; "
                             "give max_channel >= min_channel")
        return self

    @classmethod
    def debug(cls, **overrides: Any) -> "AutoencoderConfig":
        return cls.model_validate({"min_channel": 4, "max_channel": 8, "num_layers": 1, "latent_channel": 2,
                                   **overrides})


# ---------------------------------------------------------------- stage 3: SOM codebooks
class SOMLevel(BaseModel):
    """One self-organizing map over the P_H x P_W patches of the latent map (the seed's codebook config.json)."""
    model_config = ConfigDict(extra="forbid")

    patch_H: int = Field(2, ge=1, le=256, description="patch height P_H (must divide the latent map's height)")
    patch_W: int = Field(2, ge=1, le=256, description="patch width P_W (must divide the latent map's width)")
    num_embeddings: int = Field(64, ge=2, le=65536, description="units of the map (laid out on a near-square 2-D grid)")
    neighbourhood_step: int = Field(200, ge=1, description="steps over which the neighbourhood radius halves")
    lr: float = Field(0.5, gt=0.0, le=1.0, description="the seed's model_lr: how far each unit moves towards its "
                                                       "neighbourhood-weighted batch mean at step 0 (1 = batch SOM)")


class SOMCondition(BaseModel):
    """The whole-map codebook: one unit per latent map, the base model's conditional token."""
    model_config = ConfigDict(extra="forbid")

    num_embeddings: int = Field(16, ge=2, le=65536, description="units of the whole-map SOM")
    neighbourhood_step: int = Field(200, ge=1, description="steps over which the neighbourhood radius halves")
    lr: float = Field(0.5, gt=0.0, le=1.0, description="step towards the neighbourhood-weighted batch mean at step 0")


class SOMConfig(BaseModel):
    """Options of the `som` family: the codebooks of every cascade level, fitted together."""
    model_config = ConfigDict(extra="forbid")

    levels: list[SOMLevel] = Field(
        default_factory=lambda: [SOMLevel(patch_H=2, patch_W=2, num_embeddings=32), SOMLevel(patch_H=1, patch_W=1,
                                                                                             num_embeddings=32)],
        min_length=1, max_length=8, description="one codebook per cascade level, coarse (large patches) to fine")
    condition: SOMCondition | None = Field(default_factory=SOMCondition,
                                           description="the whole-map codebook for the base model's conditional "
                                                       "token (null: none)")
    lr_half_life: int = Field(500, ge=1, description="steps over which every map's learning rate halves")
    min_lr: float = Field(0.01, ge=0.0, le=1.0, description="the learning rate never decays below this")
    neighbourhood_end: float = Field(0.0, ge=0.0, description="the radius (grid units) never shrinks below this; "
                                                              "0 ends as plain k-means (each unit its own mean)")
    init_scale: float = Field(0.1, gt=0.0, description="units start at seeded N(0, init_scale²) points")
    prune_threshold: int = Field(0, ge=0, description="after fitting, units used fewer than this many times in the "
                                                      "counting steps are pruned (0 = never)")
    count_from: int | None = Field(None, ge=1, description="from this step on the units are frozen and their use is "
                                                          "counted for pruning (None = never)")
    seed: int = Field(0, ge=0, description="seed of the units' starting points")

    @model_validator(mode="after")
    def _prune(self) -> "SOMConfig":
        if self.prune_threshold and self.count_from is None:
            raise ValueError("prune_threshold needs count_from: the step from which unit use is counted "
                             "(set it below train.steps)")
        return self

    @classmethod
    def debug(cls, **overrides: Any) -> "SOMConfig":
        return cls.model_validate({"levels": [{"patch_H": 2, "patch_W": 2, "num_embeddings": 6},
                                              {"patch_H": 1, "patch_W": 1, "num_embeddings": 8}],
                                   "condition": {"num_embeddings": 4}, "lr_half_life": 50, **overrides})


# ---------------------------------------------------------------- stages 4+: transformers
class TransformerOptions(BaseModel):
    """The seed's transformer config.json keys (`model_lr` is `train.optimizer.lr`)."""
    model_config = ConfigDict(extra="forbid")

    in_dim: int = Field(64, ge=4, le=8192, description="width of the token embeddings and the residual stream")
    hidden_dim: int = Field(128, ge=4, le=32768, description="width of the feed-forward sublayer")
    hidden_activation: str = Field("silu", description="activation of the feed-forward sublayer")
    num_enc_layers: int = Field(2, ge=1, le=48, description="encoder layers (refiners only; the base has none)")
    num_dec_layers: int = Field(2, ge=1, le=48, description="decoder layers")
    self_attn_heads: int = Field(4, ge=1, le=256, description="heads of self-attention (must divide in_dim)")
    cross_attn_heads: int = Field(4, ge=1, le=256, description="heads of the decoder's cross-attention "
                                                               "(refiners only; must divide in_dim)")
    use_sliding_window: bool = Field(False, description="decoder self-attention sees only the last "
                                                        "`sliding_window` tokens")
    sliding_window: int = Field(256, ge=1, description="tokens a query attends to when use_sliding_window is on "
                                                       "(itself included)")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout on attention and residual branches")

    @field_validator("hidden_activation")
    @classmethod
    def _act(cls, v: str) -> str:
        return _activation(v)

    @model_validator(mode="after")
    def _heads(self) -> "TransformerOptions":
        for key in ("self_attn_heads", "cross_attn_heads"):
            if self.in_dim % getattr(self, key):
                raise ValueError(f"{key}: {getattr(self, key)} must divide in_dim {self.in_dim}")
        return self


class CascadeConfig(BaseModel):
    """Options of the `cascade` family; the levels come from the `codebooks` component."""
    model_config = ConfigDict(extra="forbid")

    conditioning: Literal["none", "label"] = Field("none", description="label: the base sequence starts with the "
                                                                       "class token instead of a start token")
    base: TransformerOptions = Field(default_factory=TransformerOptions,
                                     description="the decoder-only base model over the coarsest level")
    refiner: TransformerOptions = Field(default_factory=TransformerOptions,
                                        description="every encoder-decoder refiner (one per finer level)")
    activation_checkpoint: bool = Field(False, description="recompute each layer's activations in the backward "
                                                           "pass (the seed's --use-activation-checkpoint)")
    train_levels: list[int] | None = Field(None, description="levels whose loss is trained (None = all); 0 is the "
                                                              "base")

    @classmethod
    def debug(cls, **overrides: Any) -> "CascadeConfig":
        tiny = {"in_dim": 16, "hidden_dim": 32, "num_enc_layers": 1, "num_dec_layers": 1, "self_attn_heads": 2,
                "cross_attn_heads": 2}
        return cls.model_validate({"base": tiny, "refiner": tiny, **overrides})


# ---------------------------------------------------------------- decoding
LEVEL_KEYS = ("temperature", "top_k", "top_p", "beam_width", "num_beam")


class LevelDecoding(BaseModel):
    """How one level is decoded (the seed's generate config, per level)."""
    model_config = ConfigDict(extra="forbid", frozen=True)

    temperature: float = Field(1.0, ge=0.0, le=10.0)
    top_k: int = Field(0, ge=0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    beam_width: int = Field(1, ge=1, le=256)
    num_beam: int = Field(1, ge=1, le=256)


class CascadeSampling(SamplingParams):
    """Decoding of every level. beam_width 1 with temperature 0 is greedy; with temperature > 0 and num_beam 1 it
    is plain sampling; otherwise beam search keeps `beam_width` hypotheses, each proposing `num_beam` candidates
    (the most likely ones at temperature 0, else drawn from the tempered distribution) ranked by length-normalised
    log-likelihood."""
    temperature: float = Field(1.0, ge=0.0, le=10.0, description="softmax temperature of every level (0 = most "
                                                                 "likely tokens)")
    top_k: int = Field(0, ge=0, le=65536, description="keep only the k most likely tokens (0 = all)")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="nucleus: keep the most likely tokens whose mass "
                                                          "reaches p (1 = all)")
    beam_width: int = Field(1, ge=1, le=256, description="hypotheses kept per image at each step (1: no beam)")
    num_beam: int = Field(1, ge=1, le=256, description="candidates each hypothesis proposes per step")
    level_settings: str = Field("", max_length=2000,
                                description="per-level overrides, e.g. '0:beam_width=16,num_beam=32,temperature=1.5;"
                                            "1:beam_width=8,num_beam=4' (keys: " + ", ".join(LEVEL_KEYS) + ")")
    levels: int = Field(-1, ge=-1, le=15, description="decode up to this level (0 = the base alone; -1 = all)")
    cond_token: int = Field(-1, ge=-1, le=65535, description="the whole-map codebook unit to start from (-1 = "
                                                             "predicted by the base model)")
    cache: bool = Field(True, description="KV cache while decoding (off: every step recomputes the prefix)")

    @field_validator("level_settings")
    @classmethod
    def _settings(cls, v: str) -> str:
        parse_level_settings(v)
        return v

    def for_level(self, level: int) -> LevelDecoding:
        values = {k: getattr(self, k) for k in LEVEL_KEYS}
        values.update(parse_level_settings(self.level_settings).get(level, {}))
        return LevelDecoding(**values)


def parse_level_settings(text: str) -> dict[int, dict[str, Any]]:
    """'0:beam_width=16,temperature=1.5;1:num_beam=4' -> {0: {...}, 1: {...}}, checked like the fields."""
    out: dict[int, dict[str, Any]] = {}
    for part in filter(None, (p.strip() for p in text.split(";"))):
        level, colon, rest = part.partition(":")
        if not colon or not level.strip().isdigit():
            raise ValueError(f"{part!r}: expected LEVEL:key=value,... e.g. '0:beam_width=4,temperature=0.8'")
        values: dict[str, Any] = {}
        for item in filter(None, (i.strip() for i in rest.split(","))):
            key, eq, value = item.partition("=")
            key = key.strip()
            if not eq or key not in LEVEL_KEYS:
                raise ValueError(f"{item!r} in level {level.strip()}: keys are {', '.join(LEVEL_KEYS)}")
            values[key] = value.strip()
        try:
            out[int(level)] = LevelDecoding(**values).model_dump(include=set(values))
        except ValueError as err:
            first = err.errors()[0] if hasattr(err, "errors") else {"loc": ("?",), "msg": str(err)}
            raise ValueError(f"level {level.strip()} {first['loc'][0]}: {first['msg']}") from None
    return out
