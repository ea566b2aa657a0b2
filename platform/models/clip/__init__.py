"""Model family `clip`: a small contrastive image-text model trained on the
dataset's captions, used as a scorer (best-of-n reranking), not a generator."""
from raygen.models.clip.model import ClipConfig, NotAGeneratorError, SmallClip, build
from raygen.models.registry import Family, register_family

FAMILY = register_family(Family(
    name="clip", config_cls=ClipConfig, build=build,
    description="small CLIP trained on (image, caption) pairs; a scorer for best-of-n reranking"))

__all__ = ["ClipConfig", "FAMILY", "NotAGeneratorError", "SmallClip", "build"]
