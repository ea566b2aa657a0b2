"""codebook: a k-means codebook over an image's P×P pixel patches (seed 004's
codebook idea at its simplest), fitted without gradients.

It encodes an image to a grid of code indices and decodes them back; it does
not sample on its own. Options: `CodebookConfig`; docs: docs/models/codebook.md.
"""
from raygen.models.codebook.model import CodebookConfig, PatchCodebook, build_codebook
from raygen.models.registry import Family, register_family

FAMILY = register_family(Family(
    name="codebook",
    config_cls=CodebookConfig,
    build=build_codebook,
    capabilities={"fit", "encode", "reconstruct"},
    conditions=("none",),
    description="vector quantisation: a k-means codebook over P×P pixel patches, fitted without gradients "
                "(mini-batch EMA k-means, dead codes re-seeded by splitting the worst-fit clusters)",
))

__all__ = ["CodebookConfig", "FAMILY", "PatchCodebook", "build_codebook"]
