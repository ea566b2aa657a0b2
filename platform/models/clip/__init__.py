"""Model family `clip`: a small contrastive image-text model trained on the
dataset's captions, used as a scorer (best-of-n reranking), not a generator."""
from raygen.models.clip.model import ClipConfig, SmallClip, build
from raygen.models.registry import Family, register_family


def debug_flavors():
    from raygen.models.base import DataInfo
    return {"tiny": (ClipConfig.debug(), DataInfo(channels=1, resolution=8, has_captions=True))}


FAMILY = register_family(Family(
    name="clip", config_cls=ClipConfig, build=build, capabilities=SmallClip.capabilities, debug=debug_flavors,
    description="small CLIP trained on (image, caption) pairs; a scorer for best-of-n reranking"))

__all__ = ["ClipConfig", "FAMILY", "SmallClip", "build"]
