"""The diffusion generator: a diffusers UNet, a noise process, a condition and a sampler.

    training  x0 (pixels in [-1, 1], or a frozen VAE's latents), t ~ U{0..T-1}, eps ~ N(0, I)
              x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps;  loss = w(t) * |UNet(x_t, t, c) - target|^2
              (target eps, v or x0; w = min-SNR weights or 1; c dropped to null with cond_dropout)
    sampling  a diffusers scheduler (ddpm, ddim, dpmsolver++) chosen per request; classifier-free
              guidance out = u + s (c - u) with the null condition's prediction u

Every random number an image uses comes from that image's generator: its
starting noise (`per_image_randn`), a drawn label, and the scheduler's step
noise (diffusers draws per-image noise from a list of generators).
"""
from __future__ import annotations

from dataclasses import replace
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from raygen.models.base import DataInfo, Generator
from raygen.models.capabilities import Capability
from raygen.models.conditions import Conditions
from raygen.models.diffusion.config import DiffusionConfig, SamplerName
from raygen.models.diffusion.noise import SAMPLERS, NoiseProcess, make_sampler
from raygen.models.diffusion.text_encoders import build_text_encoder
from raygen.models.diffusion.unet import CondInputs, Denoiser, build_unet
from raygen.models.sampling import (SamplingParams, check_generators, parse_params, per_image_randint,
                                    per_image_randn, preview, progress_only)
from raygen.models.text import TextEncoder

#: seed of the fixed noise and timesteps that make the validation loss comparable from eval to eval
VALIDATION_SEED = 1234


# ---------------------------------------------------------------- condition -> UNet inputs
class Conditioner(nn.Module):
    """Turns labels / captions into `CondInputs`; knows the null condition."""

    def __init__(self, config: DiffusionConfig, info: DataInfo):
        super().__init__()
        self.kind = config.conditioning
        self.cross = config.unet.has_cross_attention
        # a super-resolution stage's timestep-embedding slot carries the noise-augmentation level instead
        self.in_time = config.unet.timestep_condition() and config.super_resolution is None
        self.num_classes = info.num_classes
        self.text: nn.Module | None = None
        if self.kind == "label" and info.num_classes < 1:
            raise ValueError("conditioning 'label' needs a dataset with class labels (data_info.num_classes is 0); "
                             "use conditioning 'none' or 'caption'")
        if self.kind == "caption":
            if not info.has_captions:
                raise ValueError("conditioning 'caption' needs a dataset with captions (data_info.has_captions is "
                                 "False); use conditioning 'none' or 'label'")
            self.text = build_text_encoder(config.text, config.text_encoder, config.text_max_length)

    @property
    def text_dim(self) -> int:
        return self.text.dim if self.text is not None else 0

    def forward(self, n: int, labels: Any, captions: Any, drop: float, device: torch.device) -> CondInputs:
        if self.kind == "label":
            labels = torch.as_tensor(labels, dtype=torch.long).to(device).reshape(-1)
            if labels.numel() != n:
                raise ValueError(f"got {labels.numel()} labels for {n} images")
            if ((labels < 0) | (labels > self.num_classes)).any():
                raise ValueError(f"labels must be in 0..{self.num_classes - 1} (or {self.num_classes}: none), "
                                 f"got {labels.tolist()}")
            if drop > 0:
                labels = torch.where(torch.rand(n, device=device) < drop, torch.full_like(labels, self.num_classes),
                                     labels)
            tokens = F.one_hot(labels, self.num_classes + 1).float().unsqueeze(1) if self.cross else None
            return CondInputs(tokens=tokens, class_labels=labels if self.in_time else None)
        if self.kind == "caption":
            captions = [""] * n if captions is None else ["" if c is None else str(c) for c in captions]
            if len(captions) != n:
                raise ValueError(f"got {len(captions)} captions for {n} images")
            if drop > 0:
                keep = (torch.rand(n) >= drop).tolist()
                captions = [c if k else "" for c, k in zip(captions, keep)]
            tokens, mask = self.text.encode(captions)
            pooled = TextEncoder.pool(tokens, mask) if self.in_time else None
            return CondInputs(tokens=tokens, mask=mask, class_labels=pooled)
        return CondInputs()

    def null(self, n: int, device: torch.device) -> CondInputs:
        """The unconditional branch of classifier-free guidance: class `num_classes`, caption ""."""
        if self.kind == "label":
            return self(n, torch.full((n,), self.num_classes, dtype=torch.long), None, 0.0, device)
        return self(n, None, [""] * n, 0.0, device)


# ---------------------------------------------------------------- sampling parameters
class DiffusionSampling(SamplingParams):
    """How a diffusion model samples; unset fields take the model's `sampling` options."""
    sampler: SamplerName | None = Field(None, description="ddpm, ddim or dpmsolver++ (diffusers schedulers); "
                                                          "default: the model's")
    num_inference_steps: int | None = Field(None, ge=1, le=4000, description="denoising steps; default: the model's")
    guidance_scale: float | None = Field(None, ge=0.0, le=50.0,
                                         description="classifier-free guidance; 1 = none (the conditional "
                                                     "prediction alone); default: the model's")
    eta: float = Field(0.0, ge=0.0, le=1.0, description="DDIM only: 0 deterministic, 1 DDPM-like noise")
    guidance_rescale: float = Field(0.0, ge=0.0, le=1.0,
                                    description="rescale the guided prediction's std towards the conditional one "
                                                "(Lin et al. 2023); 0 = off")
    clip_sample: bool = Field(False, description="clip each step's predicted x0 to [-1, 1] (pixel models only)")


# ---------------------------------------------------------------- the model
class DiffusionModel(Generator):
    family = "diffusion"
    capabilities = frozenset({Capability.TRAIN, Capability.SAMPLE})
    sampling_params = DiffusionSampling

    def __init__(self, config: DiffusionConfig, data_info: DataInfo, components: dict[str, Generator] | None = None):
        super().__init__(data_info)
        components = dict(components or {})
        self.attach_components(components)
        self.config = config
        self.condition_kind = config.conditioning
        self.latent = "vae" in components
        self.upscaler = config.super_resolution is not None
        if self.upscaler:
            self._check_base(components.get("base"), data_info)
        elif "base" in components:
            raise ValueError("model.components.base is the low-resolution model of a super-resolution stage: "
                             "set model.options.super_resolution (or leave the component out)")
        if self.latent:
            with torch.no_grad():
                probe = components["vae"].encode(torch.zeros(1, *data_info.shape))
            self.x_shape = tuple(probe.shape[1:])
        else:
            self.x_shape = data_info.shape
        self.conditioner = Conditioner(config, data_info)
        unet = build_unet(config.unet, channels=self.x_shape[0], size=tuple(self.x_shape[1:]),
                          condition=config.conditioning, num_classes=data_info.num_classes,
                          text_dim=self.conditioner.text_dim, image_channels=data_info.channels if self.upscaler else 0)
        self.denoiser = Denoiser(unet, config.unet.efficient)
        self.noise = NoiseProcess(config.noise)

    def _check_base(self, base: Generator | None, info: DataInfo) -> None:
        sr = self.config.super_resolution
        if base is None:
            raise ValueError("super_resolution needs model.components.base: the low-resolution model trained by an "
                             "earlier stage (e.g. {base: ${stages.base.model}} in a pipeline spec)")
        if "vae" in self.components:
            raise ValueError("super_resolution runs in pixel space: give it no vae component")
        low = (info.channels, info.height // sr.factor, info.width // sr.factor)
        if info.height % sr.factor or info.width % sr.factor or tuple(base.data_info.shape) != low:
            raise ValueError(f"super_resolution: the base makes {'x'.join(map(str, base.data_info.shape))} images; "
                             f"this stage's {'x'.join(map(str, info.shape))} data over factor {sr.factor} needs "
                             f"{'x'.join(map(str, low))}")
        if base.condition_kind != self.config.conditioning:
            raise ValueError(f"super_resolution: the base is conditioned on {base.condition_kind!r} but this stage on "
                             f"{self.config.conditioning!r}; one request feeds both, so they must match")

    def low_resolution(self, images: torch.Tensor, noise: torch.Tensor, level: torch.Tensor) -> torch.Tensor:
        """[0, 1] low-resolution images -> noised to `level`, upsampled to this stage's size, in [-1, 1] units."""
        noised = self.noise.add_noise(images.float() * 2 - 1, noise, level)
        return F.interpolate(noised, size=tuple(self.x_shape[1:]), mode="bilinear", align_corners=False)

    @property
    def _param(self) -> torch.Tensor:
        return self.denoiser.unet.conv_in.weight

    # ---------------------------------------------------------------- pixels <-> the space diffusion runs in
    @torch.no_grad()
    def to_x(self, images: torch.Tensor) -> torch.Tensor:
        images = images.to(self._param.device, torch.float32)
        if self.latent:
            return self.components["vae"].encode(images).float()
        return images * 2 - 1

    @torch.no_grad()
    def from_x(self, x: torch.Tensor) -> torch.Tensor:
        if self.latent:
            return self.components["vae"].decode(x).float().clamp(0, 1)
        return ((x.float() + 1) / 2).clamp(0, 1)

    # ---------------------------------------------------------------- training
    def training_step(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        x0 = self.to_x(batch["image"])
        n, device = x0.shape[0], x0.device
        if self.training:
            noise = torch.randn_like(x0)
            t = torch.randint(0, self.noise.num_train_timesteps, (n,), device=device)
        else:  # validation: the same noise and timesteps every eval, so val_loss moves only with the model
            g = torch.Generator().manual_seed(VALIDATION_SEED)
            t = torch.randint(0, self.noise.num_train_timesteps, (n,), generator=g).to(device)
            noise = torch.randn(x0.shape, generator=g).to(device)
        cond = self.conditioner(n, batch.get("label"), batch.get("caption"),
                                self.config.cond_dropout if self.training else 0.0, device)
        if self.upscaler:  # the low-resolution view of the same images, noise-augmented to a random level
            sr = self.config.super_resolution
            low = F.interpolate(batch["image"].to(device, torch.float32), scale_factor=1 / sr.factor, mode="area")
            if self.training:
                level, aug = torch.randint(0, sr.noise_aug_max + 1, (n,), device=device), torch.randn_like(low)
            else:
                level = torch.randint(0, sr.noise_aug_max + 1, (n,), generator=g).to(device)
                aug = torch.randn(low.shape, generator=g).to(device)
            cond = replace(cond, image=self.low_resolution(low, aug, level), class_labels=level)
        x_t = self.noise.add_noise(x0, noise, t)
        out = self.denoiser(x_t.to(self._param.dtype), t, cond).float()
        per_sample = (out - self.noise.target(x0, noise, t)).pow(2).flatten(1).mean(1)
        weights = self.noise.loss_weights(t)
        loss = per_sample.mean() if weights is None else (weights * per_sample).mean()
        return {"loss": loss, "mse": per_sample.mean().detach()}

    # calling the module is a training step, so DDP's hooks see the forward pass
    forward = training_step

    # ---------------------------------------------------------------- sampling
    def resolve(self, params: DiffusionSampling) -> tuple[str, int, float]:
        d = self.config.sampling
        return (params.sampler or d.sampler, params.num_inference_steps or d.num_inference_steps,
                d.guidance_scale if params.guidance_scale is None else params.guidance_scale)

    def condition_inputs(self, conditions: Conditions, generators: Sequence[torch.Generator]) -> CondInputs:
        device = self._param.device
        columns = conditions.columns(self.data_info, device)
        labels = columns.get("label")
        if labels is not None and (labels < 0).any():
            # no label asked for: the null class when it was trained, else a class drawn from the image's generator
            if self.config.cond_dropout > 0:
                fill = torch.full_like(labels, self.data_info.num_classes)
            else:
                fill = per_image_randint(generators, self.data_info.num_classes).to(device)
            labels = torch.where(labels < 0, fill, labels)
        return self.conditioner(conditions.n, labels, columns.get("caption"), 0.0, device)

    def guided_prediction(self, x: torch.Tensor, t: torch.Tensor, cond: CondInputs, null: CondInputs | None,
                          scale: float, rescale: float) -> torch.Tensor:
        """The UNet's prediction with classifier-free guidance (scale 1 or no condition: the conditional one)."""
        if null is None:
            return self.denoiser(x, t, cond)
        both = self.denoiser(torch.cat([x, x]), t, CondInputs.cat(cond, null))
        c, u = both.chunk(2)
        out = u + scale * (c - u)
        if rescale > 0:
            from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg
            out = rescale_noise_cfg(out, c, guidance_rescale=rescale)
        return out

    @torch.no_grad()
    def sample(self, conditions: Conditions, params: DiffusionSampling,
               generators: Sequence[torch.Generator]) -> torch.Tensor:
        n = conditions.n
        check_generators(n, generators)
        sampler, steps, scale = self.resolve(params)
        if scale != 1.0 and self.condition_kind == "none":
            raise ValueError("guidance_scale: an unconditional model has nothing to guide towards; leave it at 1")
        was_training = self.training
        self.eval()
        try:
            device, dtype = self._param.device, self._param.dtype
            cond = self.condition_inputs(conditions, generators)
            null = self.conditioner.null(n, device) if scale != 1.0 else None
            if self.upscaler:  # the base's images first (same generators), noised to the sampling level
                base = self.components["base"]
                with progress_only():  # the base's steps tick, its smaller images are not previews
                    low = base.sample(conditions, parse_params(base.sampling_params, {}), generators).to(device)
                level = torch.full((n,), self.config.super_resolution.sample_aug_level, device=device)
                image = self.low_resolution(low, per_image_randn(generators, low.shape[1:]).to(device), level)
                cond = replace(cond, image=image, class_labels=level)
                null = None if null is None else replace(null, image=image, class_labels=level)
            if params.clip_sample and self.latent:
                raise ValueError("clip_sample: latents have no fixed range; it applies to pixel models only")
            scheduler = make_sampler(sampler, self.config.noise, clip_sample=params.clip_sample)
            scheduler.set_timesteps(steps, device=device)
            step_kwargs = SAMPLERS[sampler].step_kwargs(params)
            x = per_image_randn(generators, self.x_shape).to(device) * scheduler.init_noise_sigma
            gens = list(generators)
            total = len(scheduler.timesteps)
            for i, t in enumerate(scheduler.timesteps):
                inp = scheduler.scale_model_input(x, t).to(dtype)
                out = self.guided_prediction(inp, t, cond, null, scale, params.guidance_rescale).float()
                x_t, stepped = x, scheduler.step(out, t, x, generator=gens, **step_kwargs)
                x = stepped.prev_sample
                # a preview is the scheduler's x0 estimate (DPM-Solver++ keeps its own: estimated from out)
                x0 = getattr(stepped, "pred_original_sample", None)
                preview(i + 1, total, lambda: self.from_x(x0 if x0 is not None else self.noise.x0(x_t, out, t)))
            return self.from_x(x)
        finally:
            self.train(was_training)


def build_diffusion(config: DiffusionConfig, data_info: DataInfo, components=None) -> DiffusionModel:
    return DiffusionModel(config, data_info, components)
