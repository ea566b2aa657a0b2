"""renderer: a scene of spheres (position, radius, colour, material; light and
background) rendered to an image by a learned model (seed 002).

The scene's tokens go through a base transformer; a convolutional decoder
grows the image from a start block, and at every stage the image reads the
tokens (SeqToImage, gated) and the tokens read the image (ImageToSeq).
Options: `RendererConfig`; docs: docs/models/renderer.md.
"""
from raygen.models.registry import Family, register_family
from raygen.models.renderer.config import RendererConfig
from raygen.models.renderer.model import Renderer, RendererSampling, build_renderer


def spheres_info(resolution: int | tuple[int, int] = 8, max_spheres: int = 3, channels: int = 3):
    """The DataInfo of a spheres dataset (its scene columns, fields and ranges), for tests and debug flavors."""
    from dataclasses import asdict

    from raygen.data.sources.spheres import scene_columns
    from raygen.models.base import DataInfo
    size = {"resolution": resolution} if isinstance(resolution, int) else \
        {"height": resolution[0], "width": resolution[1]}
    return DataInfo(channels=channels, **size,
                    condition_columns={k: asdict(v) for k, v in scene_columns(max_spheres).items()})


def debug_flavors():
    return {
        "spheres-8": (RendererConfig.debug(), spheres_info(8)),
        "halve-seqblocks-subset": (RendererConfig.debug(channel_strategy="halve", seq_blocks=1, seq_dropout=0.1,
                                                        seq_to_image_fraction=0.5, output_activation="tanh",
                                                        loss="l2", start_size=2),
                                   spheres_info(8)),
        "nonsquare-constant-shared": (RendererConfig.debug(channel_strategy="constant_halve", base_layers=2,
                                                           share_base_params=True, image_to_seq=False,
                                                           output_activation="relu", loss="l1"),
                                      spheres_info((8, 16), max_spheres=2, channels=1)),
    }


FAMILY = register_family(Family(
    name="renderer",
    config_cls=RendererConfig,
    build=build_renderer,
    capabilities={"train", "sample"},
    sampling_params=RendererSampling,
    conditions=("scene",),
    debug=debug_flavors,
    description="scene-to-image renderer (seed 002): spheres and globals as tokens through a base transformer, "
                "a batch-norm conv decoder with ImageToSeq and gated SeqToImage cross-attention at every stage",
))

__all__ = ["FAMILY", "Renderer", "RendererConfig", "RendererSampling", "build_renderer", "spheres_info"]
