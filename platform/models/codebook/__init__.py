"""codebook: a k-means codebook over an image's P×P pixel patches (seed 004's
codebook idea at its simplest), fitted without gradients.

It encodes an image to a grid of code indices and decodes them back; it does
not sample on its own. Options: `CodebookConfig`; docs: docs/models/codebook.md.
"""
from raygen.models.codebook.model import CodebookConfig, PatchCodebook, build_codebook
from raygen.models.registry import Family, register_family


def debug_flavors():
    from raygen.models.base import DataInfo
    return {
        "gray-2x2": (CodebookConfig.debug(), DataInfo(channels=1, resolution=8)),
        "rgb-4x4-nonsquare": (CodebookConfig.debug(patch=4, codes=8), DataInfo(channels=3, height=8, width=12)),
    }


FAMILY = register_family(Family(
    name="codebook",
    config_cls=CodebookConfig,
    build=build_codebook,
    capabilities={"fit", "encode", "reconstruct"},
    conditions=("none",),
    debug=debug_flavors,
    description="vector quantisation: a k-means codebook over P×P pixel patches, fitted without gradients "
                "(mini-batch EMA k-means, dead codes re-seeded by splitting the worst-fit clusters)",
))

__all__ = ["CodebookConfig", "FAMILY", "PatchCodebook", "build_codebook"]
