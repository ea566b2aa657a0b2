"""seqimg: patch-autoregressive image generation (seed 000).

An image is cut into patches (rows, columns or squares) and a causal backbone
(LSTM, GRU, minGRU, MLP, GPT-2, ALiBi, modern transformer, GNN, Mamba, causal
convnet) predicts each patch from the ones before it, by regression or as 256
levels per sub-pixel. Options: `SeqImgConfig`; docs: docs/models/seqimg.md.
"""
from raygen.models.registry import Family, register_family
from raygen.models.seqimg.backbones import BACKBONES
from raygen.models.seqimg.config import SeqImgConfig
from raygen.models.seqimg.model import SeqImgModel, build_seqimg
from raygen.models.seqimg.patching import PatchGeometry

FAMILY = register_family(Family(
    name="seqimg",
    config_cls=SeqImgConfig,
    build=build_seqimg,
    description="patch-autoregressive generation: rows, columns or square patches predicted one by one "
                f"by a causal backbone ({', '.join(sorted(BACKBONES))})",
))

__all__ = ["BACKBONES", "FAMILY", "PatchGeometry", "SeqImgConfig", "SeqImgModel", "build_seqimg"]
