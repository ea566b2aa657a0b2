"""inr: implicit-neural-representation autoencoders (seed 001) that render at any resolution.

An image encoder (simple CNN, small DALL-E-style, ResNet-18 or patch
transformer) maps an image to a code; the "manifold" decoder maps (code,
encoded pixel position) to a colour, so one code renders on any pixel grid.
A batch std/mean constraint keeps codes near N(0, 0.5²), so drawn codes decode
to new images. Options: `INRConfig`; docs: docs/models/inr.md.
"""
from raygen.models.inr.config import INRConfig, INRSampling
from raygen.models.inr.model import INRAutoencoder, build_inr
from raygen.models.registry import Family, register_family


def debug_flavors():
    from raygen.models.base import DataInfo
    return {
        "cnn-gray": (INRConfig.debug(), DataInfo(channels=1, resolution=8)),
        "dalle-rgb-concat": (INRConfig.debug(encoder="dalle", dalle={"hid": 8, "groups": 2},
                                             decoder={"concat": [True, False]}),
                             DataInfo(channels=3, resolution=8)),
        "transformer-nonsquare-uncond": (INRConfig.debug(encoder="transformer", conditioning="none",
                                                         transformer={"patch": 4, "stride": 2, "hid": 8,
                                                                      "heads": 2, "layers": 1}),
                                         DataInfo(channels=3, height=8, width=12)),
        "resnet18-frozen-l2": (INRConfig.debug(encoder="resnet18", freeze="backbone", loss="l2",
                                               decoder={"pos_cos": True}),
                               DataInfo(channels=1, resolution=8)),
    }


FAMILY = register_family(Family(
    name="inr",
    config_cls=INRConfig,
    build=build_inr,
    capabilities={"train", "encode", "reconstruct", "render", "sample"},
    sampling_params=INRSampling,
    conditions=("image", "none"),
    debug=debug_flavors,
    description="implicit neural representation autoencoder: CNN / DALL-E / ResNet-18 / transformer encoder to a "
                "code, a 'manifold' decoder (code, pixel position) -> colour that renders at any size; samples "
                "from N(0, 0.5²) codes, reconstructs and interpolates images",
))

__all__ = ["FAMILY", "INRAutoencoder", "INRConfig", "INRSampling", "build_inr"]
