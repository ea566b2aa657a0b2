"""The diffusion family's noise process against the closed forms of the papers:
linear and scaled-linear ("quadratic") betas (Ho et al. 2020), the cosine
schedule (Nichol & Dhariwal 2021), zero-terminal-SNR rescaling (Lin et al.
2023), the v target (Salimans & Ho 2022) and min-SNR weights (Hang et al. 2023)."""
from __future__ import annotations

import math

import pytest
import torch
from pydantic import ValidationError

from raygen.models.diffusion.config import NoiseOptions
from raygen.models.diffusion.noise import SAMPLERS, NoiseProcess, make_sampler


def alphas_cumprod(betas: torch.Tensor) -> torch.Tensor:
    return torch.cumprod(1.0 - betas.double(), 0)


@pytest.mark.parametrize("steps", [1000, 500])
def test_linear_schedule_is_the_ddpm_closed_form(steps):
    proc = NoiseProcess(NoiseOptions(schedule="linear", train_timesteps=steps))
    scale = 1000 / steps  # the DDPM betas stretched to the step count (improved DDPM, section 3)
    betas = torch.linspace(1e-4 * scale, 0.02 * scale, steps, dtype=torch.float64)
    assert proc.scheduler.betas.shape == (steps,)
    assert torch.allclose(proc.scheduler.betas.double(), betas, atol=1e-7)
    assert torch.allclose(proc.alphas_cumprod.double(), alphas_cumprod(betas), rtol=1e-4, atol=1e-7)


def test_quadratic_schedule_is_linear_in_sqrt_beta():
    opts = NoiseOptions(schedule="quadratic", train_timesteps=1000)  # the seed's name is accepted
    assert opts.schedule == "scaled_linear"
    betas = torch.linspace(math.sqrt(8.5e-4), math.sqrt(0.012), 1000, dtype=torch.float64) ** 2
    proc = NoiseProcess(opts)
    assert torch.allclose(proc.scheduler.betas.double(), betas, atol=1e-7)
    explicit = NoiseProcess(NoiseOptions(schedule="scaled_linear", beta_start=1e-4, beta_end=0.01))
    assert torch.allclose(explicit.scheduler.betas.double(),
                          torch.linspace(1e-2, 0.1, 1000, dtype=torch.float64) ** 2, atol=1e-7)


@pytest.mark.parametrize("steps", [1000, 500])
def test_cosine_schedule_follows_alpha_bar(steps):
    s = 0.008

    def f(t):
        return math.cos((t / steps + s) / (1 + s) * math.pi / 2) ** 2

    # beta_t = 1 - abar(t+1)/abar(t), clipped at 0.999 (Nichol & Dhariwal eq. 17)
    betas = torch.tensor([min(1 - f(i + 1) / f(i), 0.999) for i in range(steps)], dtype=torch.float64)
    proc = NoiseProcess(NoiseOptions(schedule="cosine", train_timesteps=steps))
    assert torch.allclose(proc.scheduler.betas.double(), betas, atol=1e-6)
    ab = proc.alphas_cumprod.double()
    # abar(t) itself, away from the clipped last steps
    closed = torch.tensor([f(i + 1) / f(0) for i in range(steps)], dtype=torch.float64)
    assert torch.allclose(ab[: steps - 10], closed[: steps - 10], rtol=1e-3, atol=1e-6)
    assert ab[0] > 0.999 and ab[-1] < 1e-4


def test_zero_terminal_snr_rescales_sqrt_alpha_bar_linearly():
    base = NoiseProcess(NoiseOptions(schedule="linear", prediction="v")).alphas_cumprod.double()
    zero = NoiseProcess(NoiseOptions(schedule="linear", prediction="v", zero_terminal_snr=True)).alphas_cumprod.double()
    s = base.sqrt()
    # Lin et al. algorithm 1: shift so the last value is 0, scale so the first is unchanged
    expected = ((s - s[-1]) * s[0] / (s[0] - s[-1])) ** 2
    assert zero[-1] < 1e-12 and base[-1] > 1e-5
    assert torch.allclose(zero[:-1], expected[:-1], rtol=1e-3, atol=1e-6)
    with pytest.raises(ValidationError, match="zero_terminal_snr .* set prediction to v"):
        NoiseOptions(zero_terminal_snr=True, prediction="epsilon")


def test_noising_and_targets_are_the_closed_forms():
    proc = NoiseProcess(NoiseOptions(schedule="cosine", train_timesteps=200, prediction="v"))
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(5, 1, 4, 4, generator=g), torch.randn(5, 1, 4, 4, generator=g)
    t = torch.tensor([0, 10, 50, 120, 199])
    a = proc.alphas_cumprod[t].view(-1, 1, 1, 1)
    assert torch.allclose(proc.add_noise(x0, eps, t), a.sqrt() * x0 + (1 - a).sqrt() * eps, atol=1e-6)
    assert torch.allclose(proc.target(x0, eps, t), a.sqrt() * eps - (1 - a).sqrt() * x0, atol=1e-6)
    assert torch.equal(NoiseProcess(NoiseOptions(prediction="epsilon")).target(x0, eps, t), eps)
    assert torch.equal(NoiseProcess(NoiseOptions(prediction="sample")).target(x0, eps, t), x0)


@pytest.mark.parametrize("prediction", ["epsilon", "v", "sample"])
def test_min_snr_weights(prediction):
    proc = NoiseProcess(NoiseOptions(schedule="linear", prediction=prediction, min_snr_gamma=5.0))
    t = torch.tensor([0, 100, 300, 600, 999])
    a = proc.alphas_cumprod[t].double()
    snr = a / (1 - a)
    clipped = snr.clamp(max=5.0)
    expected = {"epsilon": clipped / snr, "v": clipped / (snr + 1), "sample": clipped}[prediction]
    assert torch.allclose(proc.loss_weights(t).double(), expected, rtol=1e-5)
    w = proc.loss_weights(t)
    assert w[0] < 0.01 if prediction != "sample" else w[0] == 5.0  # low-noise steps (SNR >> gamma) count little
    if prediction == "epsilon":
        assert w[-1] == 1.0  # noisy steps (SNR < gamma) keep their full weight
    assert NoiseProcess(NoiseOptions(prediction=prediction)).loss_weights(t) is None


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_every_sampler_uses_the_training_betas(name):
    opts = NoiseOptions(schedule="cosine", train_timesteps=300, prediction="v")
    sched = make_sampler(name, opts, clip_sample=True)
    assert torch.allclose(sched.alphas_cumprod, NoiseProcess(opts).alphas_cumprod)
    assert sched.config.prediction_type == "v_prediction"
    sched.set_timesteps(10)
    ts = sched.timesteps.tolist()
    assert len(ts) == 10 and ts[0] == 299 and ts == sorted(ts, reverse=True)  # trailing: starts at the last step
    with pytest.raises(ValueError, match="unknown sampler 'euler'; choose one of: ddpm, ddim, dpmsolver\\+\\+"):
        make_sampler("euler", opts)
