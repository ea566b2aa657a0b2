"""diffusion: conditioned denoising diffusion on a diffusers UNet (seed 003).

A diffusers `UNet2DModel` / `UNet2DConditionModel` configured from typed
options (widths, layers, where attention sits: self+cross, cross only "jxa",
self only, none with the condition in the timestep embedding; the
"efficient" layout), conditioned on nothing, a class label or a caption
(built-in text encoder trained jointly, or a frozen transformers encoder from
a local folder), trained on a linear/cosine/scaled-linear schedule with an
epsilon/v/x0 target, and sampled with a diffusers scheduler chosen per
request (DDPM, DDIM, DPM-Solver++) with classifier-free guidance. Given a
frozen `vae` component it runs in that autoencoder's latent space.
Options: `DiffusionConfig`; docs: docs/models/diffusion.md.
"""
from raygen.models.capabilities import Capability
from raygen.models.diffusion.config import DiffusionConfig, NoiseOptions, SamplingDefaults, UNetOptions
from raygen.models.diffusion.model import DiffusionModel, DiffusionSampling, build_diffusion
from raygen.models.diffusion.noise import SAMPLERS
from raygen.models.registry import Family, register_family


def debug_flavors():
    from raygen.models.base import DataInfo
    classes = DataInfo(channels=1, resolution=8, num_classes=3, class_names=["circle", "square", "cross"])
    captions = DataInfo(channels=3, resolution=8, has_captions=True)
    import torch

    from raygen.models.registry import build_model
    torch.manual_seed(0)
    # the conformance suite re-exports a component with its default options, so the VAE keeps them
    vae = build_model("vae", {}, classes)
    base = build_model("diffusion", {}, DataInfo(channels=1, resolution=8))  # default options, as for the vae
    return {
        "sr-8to16": (DiffusionConfig.debug(super_resolution={"factor": 2, "noise_aug_max": 30, "sample_aug_level": 10},
                                           noise={"prediction": "v"}),
                     DataInfo(channels=1, resolution=16), {"base": base}),
        "latent-label-vae": (DiffusionConfig.debug(conditioning="label", unet={"attention": "cross", "widths": [8, 8]}),
                             classes, {"vae": vae}),
        "uncond-self": (DiffusionConfig.debug(unet={"attention": "self"}), DataInfo(channels=1, resolution=8)),
        "label-none-ddpm": (DiffusionConfig.debug(conditioning="label", unet={"attention": "none"},
                                                  noise={"schedule": "linear"}, sampling={"sampler": "ddpm"}),
                            classes),
        "label-jxa-guided": (DiffusionConfig.debug(conditioning="label", unet={"attention": "cross"},
                                                   noise={"prediction": "v", "zero_terminal_snr": True},
                                                   sampling={"guidance_scale": 2.0}), classes),
        "caption-xa-efficient-dpm": (DiffusionConfig.debug(
            conditioning="caption", unet={"attention": "self_cross", "efficient": True, "widths": [8, 8]},
            noise={"schedule": "scaled_linear", "min_snr_gamma": 5.0},
            sampling={"sampler": "dpmsolver++", "guidance_scale": 3.0}), captions),
    }


FAMILY = register_family(Family(
    name="diffusion",
    config_cls=DiffusionConfig,
    build=build_diffusion,
    capabilities=DiffusionModel.capabilities,
    sampling_params=DiffusionSampling,
    conditions=("none", "label", "caption"),
    components={"vae": Capability.ENCODE, "base": Capability.SAMPLE},
    debug=debug_flavors,
    description="denoising diffusion on a diffusers UNet: self/cross/no attention, label or caption conditioning, "
                f"classifier-free guidance, samplers {', '.join(SAMPLERS)} chosen per request, latent diffusion "
                "on a frozen VAE, super-resolution stages over a frozen base",
))

__all__ = ["DiffusionConfig", "DiffusionModel", "DiffusionSampling", "FAMILY", "NoiseOptions", "SamplingDefaults",
           "UNetOptions", "build_diffusion"]
