"""seqimg backbones, one file each, registered by name in `BACKBONES`."""
from raygen.models.seqimg.backbones import (alibi, convnet, gnn, gpt2, gru, lstm, mamba, mingru, mlp,  # noqa: F401
                                            modern)
from raygen.models.seqimg.backbones.common import (BACKBONES, BackboneContext, Block, Mixer, Stack, build_backbone,
                                                   register_backbone)

__all__ = ["BACKBONES", "BackboneContext", "Block", "Mixer", "Stack", "build_backbone", "register_backbone"]
