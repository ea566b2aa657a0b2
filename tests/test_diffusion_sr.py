"""Super-resolution stages (cascaded diffusion): the UNet sees the base's
noise-augmented low-resolution image and the augmentation level; one request
runs the frozen base, then the upscaler; wrong combinations are clear errors."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from raygen.models import Conditions, DataInfo, build_model, make_generators, parse_params
from raygen.models.diffusion import DiffusionConfig

LOW = DataInfo(channels=1, resolution=8, num_classes=3, class_names=["a", "b", "c"])
HIGH = DataInfo(channels=1, resolution=16, num_classes=3, class_names=["a", "b", "c"])
SR = {"factor": 2, "noise_aug_max": 40, "sample_aug_level": 7}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def pair(attention="cross"):
    torch.manual_seed(0)
    base = build_model("diffusion", DiffusionConfig.debug(conditioning="label", sampling={"num_inference_steps": 3}),
                       LOW).eval()
    config = DiffusionConfig.debug(conditioning="label", unet={"attention": attention}, super_resolution=SR,
                                   noise={"prediction": "v"}, sampling={"num_inference_steps": 4})
    return base, build_model("diffusion", config, HIGH, {"base": base}).eval()


def test_the_unet_takes_the_low_resolution_image_and_its_noise_level():
    base, sr = pair()
    unet = sr.denoiser.unet
    assert unet.config.in_channels == 2 and unet.config.out_channels == 1  # x_t and the upsampled image
    assert unet.config.class_embed_type == "timestep" and unet.config.num_class_embeds is None

    seen = []
    hook = sr.denoiser.register_forward_pre_hook(lambda mod, args: seen.append(args[2]))
    try:
        batch = {"image": torch.rand(3, 1, 16, 16, generator=torch.Generator().manual_seed(0)),
                 "label": torch.tensor([0, 1, 2])}
        sr.train()
        torch.manual_seed(5)
        sr.training_step(batch)
        cond = seen[-1]
        assert cond.image.shape == (3, 1, 16, 16) and cond.class_labels.shape == (3,)
        assert int(cond.class_labels.max()) <= SR["noise_aug_max"]
        # at augmentation level 0 the conditioning image is the area-downsampled image, upsampled again
        low = F.interpolate(batch["image"], scale_factor=0.5, mode="area")
        clean = sr.low_resolution(low, torch.zeros_like(low), torch.zeros(3, dtype=torch.long))
        a0 = sr.noise.alphas_cumprod[0]
        assert torch.allclose(clean, F.interpolate((low * 2 - 1) * a0.sqrt(), size=(16, 16), mode="bilinear"),
                              atol=1e-6)

        # sampling: the base runs first with the same per-image generators, its images noised to the sampling level
        seen.clear()
        sr.eval()
        conds = Conditions("label", (2, 0))
        gens = make_generators([8, 9])
        out = sr.sample(conds, parse_params(sr.sampling_params, {}), gens)
        assert out.shape == (2, 1, 16, 16)
        gens = make_generators([8, 9])
        low = base.sample(conds, parse_params(base.sampling_params, {}), gens)
        from raygen.models.sampling import per_image_randn
        expected = sr.low_resolution(low, per_image_randn(gens, (1, 8, 8)), torch.full((2,), SR["sample_aug_level"]))
        assert all(torch.allclose(c.image, expected, atol=1e-6) for c in seen)
        assert all(c.class_labels.tolist() == [SR["sample_aug_level"]] * 2 for c in seen)
    finally:
        hook.remove()


def test_the_label_reaches_the_upscaler_through_cross_attention_only():
    _, sr = pair("cross")
    x, t = torch.randn(2, 1, 16, 16), torch.tensor(30)
    image, level = torch.zeros(2, 1, 16, 16), torch.tensor([5, 5])
    from dataclasses import replace
    with torch.no_grad():
        a = sr.denoiser(x, t, replace(sr.conditioner(2, torch.tensor([0, 0]), None, 0.0, x.device),
                                      image=image, class_labels=level))
        b = sr.denoiser(x, t, replace(sr.conditioner(2, torch.tensor([1, 1]), None, 0.0, x.device),
                                      image=image, class_labels=level))
    assert not torch.allclose(a, b)
    _, plain = pair("none")  # no cross-attention: only the base sees the label
    assert plain.conditioner(2, torch.tensor([0, 1]), None, 0.0, x.device).class_labels is None


def test_bad_stage_combinations_are_clear_errors():
    base, _ = pair()
    config = DiffusionConfig.debug(conditioning="label", super_resolution=SR)
    with pytest.raises(ValueError, match="super_resolution needs model.components.base"):
        build_model("diffusion", config, HIGH)
    with pytest.raises(ValueError, match="base makes 1x8x8 images; this stage's 1x32x32 data over factor 2 needs 1x16x16"):
        build_model("diffusion", config, DataInfo(channels=1, resolution=32, num_classes=3), {"base": base})
    with pytest.raises(ValueError, match="base is conditioned on 'label' but this stage on 'none'"):
        build_model("diffusion", DiffusionConfig.debug(super_resolution=SR), HIGH, {"base": base})
    with pytest.raises(ValueError, match="components.base is the low-resolution model of a super-resolution stage"):
        build_model("diffusion", DiffusionConfig.debug(conditioning="label"), HIGH, {"base": base})
    with pytest.raises(ValueError, match="noise_aug_max .* at most train_timesteps - 1 = 99"):
        DiffusionConfig.debug(super_resolution={"noise_aug_max": 100})
    from raygen.models.diffusion.export import export_diffusers
    from raygen.models.errors import ModelLoadError
    with pytest.raises(ModelLoadError, match="super-resolution stage has no diffusers form yet"):
        export_diffusers(pair()[1], "unused")
