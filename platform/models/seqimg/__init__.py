"""seqimg: patch-autoregressive image generation (seed 000).

An image is cut into patches (rows, columns or squares) and a causal backbone
(LSTM, GRU, minGRU, MLP, GPT-2, ALiBi, modern transformer, GNN, Mamba, causal
convnet) predicts each patch from the ones before it, by regression or as 256
levels per sub-pixel. Options: `SeqImgConfig`; docs: docs/models/seqimg.md.
"""
from raygen.models.registry import Family, register_family
from raygen.models.seqimg.backbones import BACKBONES
from raygen.models.seqimg.config import SeqImgConfig
from raygen.models.seqimg.model import SeqImgModel, SeqImgSampling, build_seqimg
from raygen.models.seqimg.patching import PatchGeometry


def debug_flavors():
    from raygen.models.base import DataInfo
    classes = DataInfo(channels=1, resolution=8, num_classes=3, class_names=["circle", "square", "cross"])
    captions = DataInfo(channels=3, resolution=8, has_captions=True)
    return {
        "gpt2-rowwise": (SeqImgConfig.debug(backbone="gpt2"), DataInfo(channels=1, resolution=8)),
        "lstm-label": (SeqImgConfig.debug(backbone="lstm", conditioning="label", head="regression_l2"), classes),
        "mamba-square-caption": (SeqImgConfig.debug(backbone="mamba", conditioning="caption", patch_mode="square",
                                                    patch_size=2), captions),
    }


FAMILY = register_family(Family(
    name="seqimg",
    config_cls=SeqImgConfig,
    build=build_seqimg,
    capabilities=SeqImgModel.capabilities,
    sampling_params=SeqImgModel.sampling_params,
    conditions=("none", "label", "caption"),
    debug=debug_flavors,
    description="patch-autoregressive generation: rows, columns or square patches predicted one by one "
                f"by a causal backbone ({', '.join(sorted(BACKBONES))})",
))

__all__ = ["BACKBONES", "FAMILY", "PatchGeometry", "SeqImgConfig", "SeqImgModel", "SeqImgSampling", "build_seqimg"]
