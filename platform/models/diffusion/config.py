"""Typed options of the diffusion family (`model.options` in a job spec).

Three groups: `unet` (the diffusers denoiser's shape and where attention
sits), `noise` (the forward process and the training target) and `sampling`
(the defaults a request, a sample grid and FID during training use when they
name no sampler, step count or guidance). Checks that need only the options
run here; checks that need the data (labels? captions? does the resolution
divide?) run when the model is built.
"""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from raygen.models.text import TextEncoderConfig

AttentionKind = Literal["self_cross", "cross", "self", "none"]
SamplerName = Literal["ddpm", "ddim", "dpmsolver++"]

#: the seed's names for its variants, accepted as values of `unet.attention`
ATTENTION_ALIASES = {"jxa": "cross", "xa": "self_cross", "sa": "self"}
#: `noise.schedule` names -> diffusers' beta_schedule names
BETA_SCHEDULES = {"linear": "linear", "cosine": "squaredcos_cap_v2", "scaled_linear": "scaled_linear"}
SCHEDULE_ALIASES = {"quadratic": "scaled_linear", "squaredcos_cap_v2": "cosine"}


class UNetOptions(BaseModel):
    """The denoiser: a diffusers UNet2DModel (no cross-attention) or UNet2DConditionModel."""
    model_config = ConfigDict(extra="forbid")

    widths: list[int] = Field([32, 64, 64], min_length=1, max_length=6,
                              description="channels of each resolution level (block_out_channels); "
                                          "each level but the last halves the resolution")
    layers_per_block: int = Field(2, ge=1, le=8, description="ResNet layers per down block (up blocks get one more)")
    attention: AttentionKind = Field(
        "self", description="default: cross when the model is conditioned, else self. self_cross: self- then cross-attention (the seed's run 2, alias 'xa'); "
                             "cross: cross-attention only (the seed's best run 'jxa'); self: self-attention only; "
                             "none: plain ResNet blocks, the condition added to the timestep embedding (run 1)")
    attention_levels: list[bool] | None = Field(
        None, description="per level: does it get attention? default: every level but the first "
                          "(the highest resolution), and the middle block whenever any level has it")
    head_dim: int = Field(16, ge=4, description="channels per attention head (heads = width / head_dim)")
    transformer_layers: int = Field(1, ge=1, le=8, description="transformer blocks per attention layer")
    condition_in_timestep: bool | None = Field(
        None, description="also add the condition (label embedding, pooled caption) to the timestep embedding; "
                          "default: yes for attention self_cross/self/none, no for cross (the jxa run injects "
                          "the condition at the cross-attention only)")
    cross_attention_dim: int | None = Field(
        None, ge=4, description="label conditioning with cross-attention: width of the label token "
                                "(default: the first level's width); captions use the text encoder's width")
    norm_groups: int = Field(8, ge=1, description="GroupNorm groups (must divide every width)")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout inside the ResNet blocks")
    efficient: bool = Field(
        False, description="the seed's 'efficient' layout: pixel-unshuffle by 2 at the input and pixel-shuffle "
                           "at the output, so the UNet runs at half the resolution on 4x the channels")

    @field_validator("attention", mode="before")
    @classmethod
    def _alias(cls, v):
        return ATTENTION_ALIASES.get(v, v) if isinstance(v, str) else v

    @model_validator(mode="after")
    def _checks(self) -> "UNetOptions":
        bad = [w for w in self.widths if w < 1 or w % self.norm_groups]
        if bad:
            raise ValueError(f"widths {self.widths}: every width must be a positive multiple of norm_groups "
                             f"({self.norm_groups}); {bad[0]} is not")
        if self.attention_levels is not None and len(self.attention_levels) != len(self.widths):
            raise ValueError(f"attention_levels has {len(self.attention_levels)} entries; widths has "
                             f"{len(self.widths)} levels: give one true/false per level")
        if self.attention != "none":
            for w, on in zip(self.widths, self.levels_with_attention()):
                if on and w % self.head_dim:
                    raise ValueError(f"width {w} is not a multiple of head_dim {self.head_dim}")
            if not any(self.levels_with_attention()):
                raise ValueError(f"attention '{self.attention}' but attention_levels turns it off everywhere; "
                                 "use attention: none")
        if self.attention in ("self", "none") and self.condition_in_timestep is False:
            raise ValueError(f"attention '{self.attention}' has no cross-attention, so the condition can only enter "
                             "through the timestep embedding: condition_in_timestep cannot be false")
        return self

    def levels_with_attention(self) -> list[bool]:
        if self.attention == "none":
            return [False] * len(self.widths)
        if self.attention_levels is not None:
            return list(self.attention_levels)
        return [len(self.widths) == 1 or i > 0 for i in range(len(self.widths))]

    @property
    def has_cross_attention(self) -> bool:
        return self.attention in ("self_cross", "cross")

    def timestep_condition(self) -> bool:
        if self.condition_in_timestep is not None:
            return self.condition_in_timestep
        return self.attention != "cross"


class NoiseOptions(BaseModel):
    """The forward (noising) process and what the denoiser predicts."""
    model_config = ConfigDict(extra="forbid")

    schedule: Literal["linear", "cosine", "scaled_linear"] = Field(
        "cosine", description="beta schedule: linear (DDPM), cosine (improved DDPM, squaredcos_cap_v2) or "
                              "scaled_linear (the 'quadratic' schedule: betas linear in sqrt, as in Stable Diffusion)")
    train_timesteps: int = Field(1000, ge=10, le=4000, description="diffusion steps of training (the seed used 1000 and 500)")
    beta_start: float | None = Field(None, gt=0.0, lt=1.0, description="linear/scaled_linear: first beta; default "
                                     "1e-4 (linear) or 8.5e-4 (scaled_linear), times 1000/train_timesteps")
    beta_end: float | None = Field(None, gt=0.0, lt=1.0, description="linear/scaled_linear: last beta; default "
                                   "0.02 (linear) or 0.012 (scaled_linear), times 1000/train_timesteps")
    prediction: Literal["epsilon", "v", "sample"] = Field(
        "epsilon", description="what the UNet predicts: the noise, the velocity v = sqrt(a)*eps - sqrt(1-a)*x0, or x0")
    zero_terminal_snr: bool = Field(False, description="rescale betas so the last step is pure noise "
                                                       "(Lin et al. 2023); needs prediction v or sample")
    min_snr_gamma: float | None = Field(None, gt=0.0, description="min-SNR loss weighting (Hang et al. 2023) "
                                                                  "with this gamma, e.g. 5; off when unset")

    @field_validator("schedule", mode="before")
    @classmethod
    def _alias(cls, v):
        return SCHEDULE_ALIASES.get(v, v) if isinstance(v, str) else v

    @model_validator(mode="after")
    def _checks(self) -> "NoiseOptions":
        if self.zero_terminal_snr and self.prediction == "epsilon":
            raise ValueError("zero_terminal_snr makes the last step pure noise, where predicting the noise "
                             "tells nothing about the image: set prediction to v (or sample)")
        if self.schedule == "cosine" and (self.beta_start is not None or self.beta_end is not None):
            raise ValueError("beta_start/beta_end apply to the linear and scaled_linear schedules, not cosine")
        start, end = self.betas()
        if self.schedule != "cosine" and not start < end:
            raise ValueError(f"beta_start ({start}) must be below beta_end ({end})")
        return self

    def betas(self) -> tuple[float, float]:
        """(beta_start, beta_end) with the defaults scaled to the number of steps (Nichol & Dhariwal)."""
        scale = 1000.0 / self.train_timesteps
        defaults = {"linear": (1e-4, 0.02), "scaled_linear": (8.5e-4, 0.012), "cosine": (1e-4, 0.02)}[self.schedule]
        start = self.beta_start if self.beta_start is not None else min(defaults[0] * scale, 0.5)
        end = self.beta_end if self.beta_end is not None else min(defaults[1] * scale, 0.999)
        return start, end


class SamplingDefaults(BaseModel):
    """What a request that names nothing gets: sample grids and FID during training use these."""
    model_config = ConfigDict(extra="forbid")

    sampler: SamplerName = Field("ddim", description="ddpm, ddim or dpmsolver++ (diffusers schedulers)")
    num_inference_steps: int = Field(25, ge=1, le=4000, description="denoising steps")
    guidance_scale: float = Field(1.0, ge=0.0, le=50.0, description="classifier-free guidance (1 = none)")


class SuperResolutionOptions(BaseModel):
    """A cascaded stage (Ho et al. 2021): the UNet sees the noise-augmented low-resolution image
    (upsampled, concatenated to its input) and the augmentation level (in its timestep-embedding slot).
    Sampling runs the frozen `base` component first, then this stage, in one request."""
    model_config = ConfigDict(extra="forbid")

    factor: int = Field(2, ge=2, le=8, description="output side / low-resolution side")
    noise_aug_max: int = Field(250, ge=0, description="training: the low-resolution image is noised to a level "
                                                      "drawn from 0..noise_aug_max (timesteps of this schedule)")
    sample_aug_level: int = Field(50, ge=0, description="sampling: the level the base's output is noised to")


class DiffusionConfig(BaseModel):
    """A conditioned denoising diffusion model on a diffusers UNet (seed 003)."""
    model_config = ConfigDict(extra="forbid")

    conditioning: Literal["none", "label", "caption"] = Field("none", description="what an image is generated from")
    cond_dropout: float = Field(0.1, ge=0.0, lt=1.0,
                                description="training: replace the label/caption by the null one with this "
                                            "probability, so classifier-free guidance has an unconditional branch")
    text: TextEncoderConfig = Field(default_factory=TextEncoderConfig,
                                    description="the built-in caption encoder, trained jointly (conditioning caption)")
    text_encoder: str | None = Field(
        None, description="a local folder holding a transformers text encoder and its tokenizer (CLIP text, T5, "
                          "DistilBERT/BERT); frozen; replaces the built-in encoder. No hub download.")
    text_max_length: int = Field(77, ge=4, le=512, description="tokens kept per caption by a transformers encoder")
    unet: UNetOptions = Field(default_factory=UNetOptions)
    noise: NoiseOptions = Field(default_factory=NoiseOptions)
    sampling: SamplingDefaults = Field(default_factory=SamplingDefaults)
    super_resolution: SuperResolutionOptions | None = Field(
        None, description="make this a super-resolution stage over a frozen `base` component (cascaded diffusion); "
                          "the condition then reaches this UNet only through cross-attention")

    @model_validator(mode="before")
    @classmethod
    def _default_attention(cls, data):
        """unet.attention defaults to cross-attention (the seed's best) when there is a condition to attend to."""
        if isinstance(data, dict):
            unet = data.get("unet")
            if isinstance(unet, BaseModel):  # an options object: only what was set explicitly counts
                unet = unet.model_dump(include=unet.model_fields_set)
            unet = dict(unet or {})
            if "attention" not in unet:
                unet["attention"] = "cross" if data.get("conditioning", "none") != "none" else "self"
                data = {**data, "unet": unet}
        return data

    @model_validator(mode="after")
    def _checks(self) -> "DiffusionConfig":
        if self.conditioning == "none" and self.unet.has_cross_attention:
            raise ValueError(f"unet.attention '{self.unet.attention}' attends to a condition, but conditioning is "
                             "'none': use attention 'self' or 'none', or condition on a label or caption")
        if self.text_encoder is not None and self.conditioning != "caption":
            raise ValueError("text_encoder is for conditioning 'caption'")
        sr = self.super_resolution
        if sr is not None:
            top = self.noise.train_timesteps - 1
            if sr.noise_aug_max > top or sr.sample_aug_level > top:
                raise ValueError(f"super_resolution: noise_aug_max ({sr.noise_aug_max}) and sample_aug_level "
                                 f"({sr.sample_aug_level}) are timesteps: at most train_timesteps - 1 = {top}")
        if self.conditioning == "none" and self.sampling.guidance_scale != 1.0:
            raise ValueError("sampling.guidance_scale needs a condition to guide towards (conditioning is 'none')")
        return self

    @classmethod
    def debug(cls, **overrides) -> "DiffusionConfig":
        """The tiny flavor used by tests and smoke runs (widths 8/16, 10 sampling steps)."""
        base = {"unet": {"widths": [8, 16], "layers_per_block": 1, "head_dim": 8, "norm_groups": 4},
                "noise": {"train_timesteps": 100},
                "sampling": {"num_inference_steps": 5},
                "text": TextEncoderConfig(dim=16, depth=1, heads=2, max_len=32).model_dump()}
        merged = dict(base)
        for key, value in overrides.items():
            if isinstance(value, dict) and isinstance(merged.get(key), dict):
                merged[key] = {**merged[key], **value}
            else:
                merged[key] = value
        return cls.model_validate(merged)
