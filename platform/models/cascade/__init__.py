"""cascade: seed 004's quantized autoregression, as three families used by one pipeline.

    cascade_ae  the fully convolutional autoencoder          train, encode, reconstruct
    som         self-organizing-map codebooks of the latents  fit, encode
    cascade     base transformer + encoder-decoder refiners   train, sample

docs: docs/models/cascade.md; pipeline: jobs/specs/cascade_fashion.yaml.
"""
from raygen.models.capabilities import Capability
from raygen.models.cascade.autoencoder import ConvAutoencoder, build_autoencoder
from raygen.models.cascade.config import (AutoencoderConfig, CascadeConfig, CascadeSampling, SOMConfig,
                                          TransformerOptions)
from raygen.models.cascade.model import CascadeGenerator, build_cascade
from raygen.models.cascade.som import SOMCodebooks, build_codebooks
from raygen.models.registry import Family, register_family


def _ae_flavors():
    from raygen.models.base import DataInfo
    return {"gray-8": (AutoencoderConfig.debug(), DataInfo(channels=1, resolution=8)),
            "rgb-8x16-sigmoid": (AutoencoderConfig.debug(decoder_activation_type="sigmoid", num_layers=2),
                                 DataInfo(channels=3, height=8, width=16))}


def _defaults(image):
    """An autoencoder and codebooks with default options (the conformance suite re-exports components with
    their family's default options), on `image`."""
    import torch

    from raygen.models.base import DataInfo
    from raygen.models.registry import build_model
    torch.manual_seed(0)
    ae = build_model("cascade_ae", {}, image)
    c, h, w = ae.latent_shape
    return ae, build_model("som", {}, DataInfo(channels=c, height=h, width=w))


def _som_flavors():
    from raygen.models.base import DataInfo
    ae, _ = _defaults(DataInfo(channels=1, resolution=8))
    return {"map-2x4x4": (SOMConfig.debug(), DataInfo(channels=2, resolution=4)),
            "with-autoencoder": (SOMConfig.debug(), DataInfo(channels=4, resolution=2), {"autoencoder": ae})}


def _cascade_flavors():
    from raygen.models.base import DataInfo
    plain = DataInfo(channels=1, resolution=16)
    classes = DataInfo(channels=1, resolution=16, num_classes=3, class_names=["circle", "square", "cross"])
    ae, books = _defaults(plain)
    return {"uncond": (CascadeConfig.debug(), plain, {"autoencoder": ae, "codebooks": books}),
            "label-window-ckpt": (CascadeConfig.debug(conditioning="label", activation_checkpoint=True,
                                                      base={**CascadeConfig.debug().base.model_dump(),
                                                            "use_sliding_window": True, "sliding_window": 3}),
                                  classes, {"autoencoder": ae, "codebooks": books})}


AE_FAMILY = register_family(Family(
    name="cascade_ae", config_cls=AutoencoderConfig, build=build_autoencoder,
    capabilities={"train", "encode", "reconstruct"}, conditions=("none",), debug=_ae_flavors,
    description="seed 004's fully convolutional autoencoder: images <-> a latent map (the cascade's stage 1)"))

SOM_FAMILY = register_family(Family(
    name="som", config_cls=SOMConfig, build=build_codebooks, capabilities={"fit", "encode"}, conditions=("none",),
    components={"autoencoder": Capability.ENCODE}, debug=_som_flavors,
    description="self-organizing-map codebooks over latent-map patches, one per cascade level plus a whole-map "
                "one; batch SOM fitted without gradients, with pruning"))

FAMILY = register_family(Family(
    name="cascade", config_cls=CascadeConfig, build=build_cascade, capabilities={"train", "sample"},
    sampling_params=CascadeSampling, conditions=("none", "label"),
    components={"autoencoder": Capability.ENCODE, "codebooks": Capability.ENCODE}, debug=_cascade_flavors,
    description="quantized autoregression (seed 004): a base transformer over coarse SOM tokens and "
                "encoder-decoder refiners for finer ones, decoded with temperature, top-k/p and beam search"))

__all__ = ["AE_FAMILY", "AutoencoderConfig", "CascadeConfig", "CascadeGenerator", "CascadeSampling",
           "ConvAutoencoder", "FAMILY", "SOMCodebooks", "SOMConfig", "SOM_FAMILY", "TransformerOptions",
           "build_autoencoder", "build_cascade", "build_codebooks"]
