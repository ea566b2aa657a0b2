"""The vae family (diffusers AutoencoderKL) and latent diffusion on it: round
trip, the latent scale measured on the data, the seed's KL blow-up guarded,
the optional VGG/LPIPS perceptual loss from local weights, the diffusers
export, and a diffusion model that samples through its frozen VAE."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from raygen.exports import export_generator, load_exported
from raygen.jobs.cli import main
from raygen.models import Conditions, DataInfo, build_model, make_generators, parse_params
from raygen.models.diffusion import DiffusionConfig
from raygen.models.diffusion.vae import VAEConfig
from raygen.spec import parse_spec

INFO = DataInfo(channels=1, resolution=16, num_classes=3, class_names=["circle", "square", "triangle"])


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def shapes(n: int, seed: int) -> dict:
    """Grey 16 px shapes (the shapes dataset's renderer), labelled by kind."""
    from raygen.data.sources.shapes import draw_shapes, random_shapes
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for _ in range(n):
        params, _ = random_shapes(rng, 1)
        images.append(torch.from_numpy(draw_shapes(params, 16)).float().mean(-1) / 255)
        labels.append(int(params[0, 0]))
    return {"image": torch.stack(images)[:, None], "label": torch.tensor(labels)}


def fit(model, steps: int, lr: float = 3e-3, seed0: int = 0):
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    history = []
    for step in range(steps):
        out = model.training_step(shapes(16, seed0 + step))
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        history.append({k: float(v) for k, v in out.items()})
    return model.eval(), history


@pytest.fixture(scope="module")
def vae():
    torch.manual_seed(0)
    model = build_model("vae", VAEConfig(widths=[16, 32], latent_channels=2, norm_groups=8, kl_weight=1e-3), INFO)
    return fit(model, 120)


def test_vae_round_trip(vae):
    model, history = vae
    assert all(math.isfinite(h["loss"]) for h in history)
    assert np.mean([h["mse"] for h in history[-10:]]) < 0.3 * np.mean([h["mse"] for h in history[:5]])
    batch = shapes(8, 999)["image"]  # unseen images
    latents = model.encode(batch)
    assert latents.shape == (8, 2, 8, 8)
    recon = model.reconstruct(batch)
    assert recon.shape == batch.shape and recon.min() >= 0 and recon.max() <= 1
    assert torch.equal(recon, model.decode(latents))
    err = (recon - batch).pow(2).mean()
    assert err < 0.3 * (batch - batch.mean()).pow(2).mean()  # far better than the mean image


def test_the_latent_scale_is_measured_on_the_data(vae):
    model, _ = vae
    shift, scale = model.latent_factors()
    assert scale != 1.0 and shift != 0.0 and model.latent_stats[0] == 120
    raw = model.moments(shapes(64, 500)["image"])[0]
    # the running statistics describe fresh data: normalised latents are near zero mean, unit variance
    assert abs(float(raw.mean()) - shift) < 0.25 / scale
    assert 0.7 < float(raw.std()) * scale < 1.3
    z = model.encode(shapes(64, 500)["image"])
    assert abs(float(z.mean())) < 0.25 and 0.7 < float(z.std()) < 1.3
    untrained = build_model("vae", VAEConfig.debug(), INFO)
    assert untrained.latent_factors() == (0.0, 1.0)


def test_logvar_is_clamped_so_the_kl_cannot_blow_up():
    torch.manual_seed(0)
    model = build_model("vae", VAEConfig.debug(logvar_range=(-20.0, 10.0)), INFO).train()
    with torch.no_grad():  # an encoder that asks for an enormous variance (the seed's blow-up)
        conv = model.ae.quant_conv
        conv.bias[2:] = 1e4
    out = model.training_step(shapes(4, 0))
    assert torch.isfinite(out["loss"]) and float(out["logvar_mean"]) == 10.0
    wide = build_model("vae", VAEConfig.debug(logvar_range=(-1e5, 1e5)), INFO).train()
    wide.load_state_dict(model.state_dict())
    assert not torch.isfinite(wide.training_step(shapes(4, 0))["loss"])  # what the clamp prevents


def test_perceptual_loss_from_local_vgg_and_lpips_weights(tmp_path):
    import torchvision
    from safetensors.torch import save_file

    torch.manual_seed(0)
    vgg = torchvision.models.vgg16().features
    save_file({f"features.{k}": v for k, v in vgg.state_dict().items()}, str(tmp_path / "vgg16.safetensors"))
    lin = {f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1) for i, c in enumerate((64, 128, 256, 512, 512))}
    lin["lin0.model.1.weight"].zero_()  # LPIPS's first layer switched off
    torch.save(lin, tmp_path / "vgg.pth")
    options = {"vgg_weights": str(tmp_path / "vgg16.safetensors"), "weight": 0.5}
    model = build_model("vae", VAEConfig.debug(perceptual=options), INFO)
    lpips = build_model("vae", VAEConfig.debug(perceptual={**options, "lpips_weights": str(tmp_path / "vgg.pth")}),
                        INFO)
    a, b = shapes(2, 0)["image"], shapes(2, 1)["image"]
    dist = model.perceptual(a, b)
    assert dist.shape == (2,) and (dist > 0).all() and torch.allclose(model.perceptual(a, a), torch.zeros(2))

    # LPIPS by hand on torchvision's VGG16: ImageNet-normalised input (upsampled to 32 px), features after
    # relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 unit-normalised per position, squared differences
    # weighted per channel (uniformly without LPIPS's layers), averaged over positions, summed over layers
    def by_hand(x, y, weights):
        mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
        std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
        prep = lambda im: (torch.nn.functional.interpolate(im.expand(-1, 3, -1, -1), size=(32, 32),  # noqa: E731
                                                           mode="bilinear") - mean) / std
        fx, fy, total = prep(x), prep(y), 0
        unit = lambda f: f / (f.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)  # noqa: E731
        for i, layer in enumerate(vgg[:30]):
            fx, fy = layer(fx), layer(fy)
            if i in (3, 8, 15, 22, 29):
                w = weights[(3, 8, 15, 22, 29).index(i)]
                total = total + (w * (unit(fx) - unit(fy)).pow(2)).sum(1).mean((1, 2))
        return total

    with torch.no_grad():
        assert torch.allclose(dist, by_hand(a, b, [1.0] * 5), rtol=1e-4)
        weights = [lin[f"lin{i}.model.1.weight"] for i in range(5)]
        assert torch.allclose(lpips.perceptual(a, b), by_hand(a, b, weights), rtol=1e-4)
    # neither the VGG nor LPIPS's layers are part of the model's weights; the loss reaches the decoder
    assert not any("perceptual" in k or k.startswith("features") for k in model.state_dict())
    model.train()
    out = model.training_step(shapes(2, 0))
    assert "perceptual" in out and float(out["perceptual"]) > 0
    out["loss"].backward()
    assert model.ae.decoder.conv_out.weight.grad.abs().sum() > 0


def test_vae_exports_an_autoencoder_kl_with_its_measured_factors(vae, tmp_path):
    from diffusers import AutoencoderKL

    model, _ = vae
    spec = parse_spec({"name": "vae", "model": {"family": "vae", "options": model.config.model_dump(mode="json")}})
    export_generator(tmp_path / "raygen", model.state_dict(), spec, INFO)
    assert main(["export", str(tmp_path / "raygen"), "--format", "diffusers", "--out", str(tmp_path / "kl")]) == 0
    ae = AutoencoderKL.from_pretrained(tmp_path / "kl").eval()
    shift, scale = model.latent_factors()
    assert ae.config.scaling_factor == pytest.approx(scale) and ae.config.shift_factor == pytest.approx(shift)
    assert json.loads((tmp_path / "kl" / "raygen.json").read_text())["family"] == "vae"
    images = shapes(3, 77)["image"]
    with torch.no_grad():
        latents = (ae.encode(images * 2 - 1).latent_dist.mean - ae.config.shift_factor) * ae.config.scaling_factor
        decoded = ((ae.decode(latents / ae.config.scaling_factor + ae.config.shift_factor).sample + 1) / 2).clamp(0, 1)
    assert torch.allclose(latents, model.encode(images), atol=1e-5)
    assert torch.allclose(decoded, model.decode(model.encode(images)), atol=1e-5)


def test_latent_diffusion_trains_samples_and_exports_through_the_frozen_vae(vae, tmp_path):
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel

    ae_model, _ = vae
    before = {k: v.clone() for k, v in ae_model.state_dict().items()}
    config = DiffusionConfig.debug(conditioning="label", unet={"attention": "cross", "widths": [16, 32]},
                                   sampling={"num_inference_steps": 5, "guidance_scale": 2.0})
    torch.manual_seed(0)
    model = build_model("diffusion", config, INFO, {"vae": ae_model})
    assert model.latent and model.x_shape == (2, 8, 8) and model.denoiser.unet.config.in_channels == 2
    assert not any(p.requires_grad for p in model.components.parameters())
    model, history = fit(model, 30, lr=3e-3)
    assert all(math.isfinite(h["loss"]) for h in history)
    assert all(torch.equal(v, ae_model.state_dict()[k]) for k, v in before.items())  # the VAE stayed frozen

    conds = Conditions("label", (0, 1, 2))
    images = model.sample(conds, parse_params(model.sampling_params, {}), make_generators([1, 2, 3]))
    assert images.shape == (3, 1, 16, 16) and images.min() >= 0 and images.max() <= 1
    with pytest.raises(ValueError, match="clip_sample: latents have no fixed range"):
        model.sample(conds, parse_params(model.sampling_params, {"clip_sample": True}), make_generators([1, 2, 3]))

    # raygen's own export (the VAE copied in as a component) and the diffusers export
    vae_spec = parse_spec({"model": {"family": "vae", "options": ae_model.config.model_dump(mode="json")}})
    export_generator(tmp_path / "vae", ae_model.state_dict(), vae_spec, INFO)
    spec = parse_spec({"name": "latent", "model": {"family": "diffusion", "options": config.model_dump(mode="json"),
                                                   "components": {"vae": str(tmp_path / "vae")}}})
    export_generator(tmp_path / "model", model.state_dict(), spec, INFO)
    loaded = load_exported(tmp_path / "model").model
    assert torch.equal(loaded.sample(conds, parse_params(model.sampling_params, {}), make_generators([1, 2, 3])), images)
    assert main(["export", str(tmp_path / "model"), "--format", "diffusers", "--out", str(tmp_path / "d")]) == 0

    unet = UNet2DConditionModel.from_pretrained(tmp_path / "d" / "unet").eval()
    ae = AutoencoderKL.from_pretrained(tmp_path / "d" / "vae").eval()
    scheduler = DDIMScheduler.from_pretrained(tmp_path / "d" / "scheduler")
    scheduler.set_timesteps(5)
    gens = [torch.Generator().manual_seed(s) for s in (1, 2, 3)]
    x = torch.stack([torch.randn(2, 8, 8, generator=g) for g in gens])
    token = lambda labels: torch.nn.functional.one_hot(labels, 4).float()[:, None]  # noqa: E731
    with torch.no_grad():
        for t in scheduler.timesteps:
            c = unet(x, t, encoder_hidden_states=token(torch.tensor([0, 1, 2]))).sample
            u = unet(x, t, encoder_hidden_states=token(torch.full((3,), 3))).sample
            x = scheduler.step(u + 2.0 * (c - u), t, x, generator=gens).prev_sample
        theirs = ((ae.decode(x / ae.config.scaling_factor + ae.config.shift_factor).sample + 1) / 2).clamp(0, 1)
    assert torch.allclose(theirs, images, atol=1e-4), float((theirs - images).abs().max())
