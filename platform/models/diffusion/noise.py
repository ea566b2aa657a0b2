"""The noise process and the samplers, all diffusers schedulers.

Training noises with a `DDPMScheduler` built from `NoiseOptions` (its
`add_noise` and `get_velocity`); sampling builds a fresh scheduler of the
requested kind from the same betas, so a sampler is chosen per request with
no retraining. The sampler registry is the one place a new sampler is added.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, SchedulerMixin

from raygen.models.diffusion.config import BETA_SCHEDULES, NoiseOptions

#: our prediction names -> diffusers' prediction_type
PREDICTION_TYPES = {"epsilon": "epsilon", "v": "v_prediction", "sample": "sample"}


def schedule_kwargs(noise: NoiseOptions) -> dict[str, Any]:
    """The scheduler arguments every sampler shares: the betas and the prediction target."""
    start, end = noise.betas()
    return {"num_train_timesteps": noise.train_timesteps, "beta_schedule": BETA_SCHEDULES[noise.schedule],
            "beta_start": start, "beta_end": end, "prediction_type": PREDICTION_TYPES[noise.prediction],
            "rescale_betas_zero_snr": noise.zero_terminal_snr}


@dataclass(frozen=True)
class SamplerEntry:
    cls: type[SchedulerMixin]
    description: str
    #: extra scheduler arguments, given whether to clip the predicted x0 to [-1, 1] at every step
    extra: Callable[[bool], dict[str, Any]]
    #: step() keyword arguments taken from the request (eta for DDIM)
    step_kwargs: Callable[[Any], dict[str, Any]] = lambda params: {}


# "trailing" spacing starts sampling at the last training step, which zero-terminal-SNR needs and which
# makes few-step sampling better in general (Lin et al. 2023, table 2).
SAMPLERS: dict[str, SamplerEntry] = {
    "ddpm": SamplerEntry(DDPMScheduler, "ancestral DDPM (Ho et al. 2020); stochastic",
                         lambda clip: {"clip_sample": clip, "timestep_spacing": "trailing",
                                       "variance_type": "fixed_small"}),
    "ddim": SamplerEntry(DDIMScheduler, "DDIM (Song et al. 2021); eta 0 is deterministic, eta 1 is DDPM-like",
                         lambda clip: {"clip_sample": clip, "timestep_spacing": "trailing",
                                       "set_alpha_to_one": True},
                         lambda params: {"eta": params.eta}),
    "dpmsolver++": SamplerEntry(DPMSolverMultistepScheduler,
                                "DPM-Solver++ (Lu et al. 2022), 2nd-order multistep; deterministic",
                                # dynamic thresholding capped at 1 is clipping x0 to [-1, 1], as DDPM/DDIM do
                                lambda clip: {"algorithm_type": "dpmsolver++", "solver_order": 2,
                                              "timestep_spacing": "trailing", "thresholding": clip,
                                              "sample_max_value": 1.0}),
}


def training_scheduler(noise: NoiseOptions) -> DDPMScheduler:
    return DDPMScheduler(**schedule_kwargs(noise), clip_sample=False)


def make_sampler(name: str, noise: NoiseOptions, *, clip_sample: bool = False) -> SchedulerMixin:
    """A fresh scheduler (they hold per-run state) of the named kind, with the model's betas.

    clip_sample clips each step's predicted x0 to [-1, 1] (pixel models). Off by default: it is not part
    of the probability-flow ODE, so with it DDIM and DPM-Solver++ no longer solve the same equation
    (DDIM keeps the unclipped noise), and on a young model it dominates the result."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose one of: {', '.join(SAMPLERS)}")
    entry = SAMPLERS[name]
    return entry.cls(**schedule_kwargs(noise), **entry.extra(clip_sample))


class NoiseProcess:
    """q(x_t | x_0) and the training target, on the training scheduler's alphas."""

    def __init__(self, noise: NoiseOptions):
        self.options = noise
        self.scheduler = training_scheduler(noise)
        self.alphas_cumprod = self.scheduler.alphas_cumprod.clone().float()  # [T]
        self.num_train_timesteps = noise.train_timesteps

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.scheduler.add_noise(x0, noise, t)

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        pred = self.options.prediction
        if pred == "epsilon":
            return noise
        if pred == "v":
            return self.scheduler.get_velocity(x0, noise, t)
        return x0

    def x0(self, x_t: torch.Tensor, out: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The x0 a prediction `out` at x_t implies (for samplers whose step does not return it)."""
        a = self.alphas_cumprod.to(x_t.device)[t].clamp(min=1e-8)
        pred = self.options.prediction
        if pred == "epsilon":
            return (x_t - (1 - a).sqrt() * out) / a.sqrt()
        if pred == "v":
            return a.sqrt() * x_t - (1 - a).sqrt() * out
        return out

    def snr(self, t: torch.Tensor) -> torch.Tensor:
        a = self.alphas_cumprod.to(t.device)[t]
        return a / (1 - a).clamp(min=1e-12)

    def loss_weights(self, t: torch.Tensor) -> torch.Tensor | None:
        """min-SNR-gamma weights per sample (Hang et al. 2023), expressed for each prediction target:
        epsilon min(snr, g)/snr, v min(snr, g)/(snr + 1), sample min(snr, g). None when off."""
        gamma = self.options.min_snr_gamma
        if gamma is None:
            return None
        snr = self.snr(t)
        clipped = torch.clamp(snr, max=gamma)
        pred = self.options.prediction
        if pred == "epsilon":
            return clipped / snr.clamp(min=1e-8)
        if pred == "v":
            return clipped / (snr + 1)
        return clipped
