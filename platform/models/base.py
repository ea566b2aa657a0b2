"""The small protocol every model family offers the trainer and the server.

A family knows nothing of Ray, MLflow or DeepSpeed: it is an `nn.Module` with
`training_step` (loss and metrics for one batch) and `sample` (images in [0, 1]).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn


@dataclass(kw_only=True)
class DataInfo:
    """What a model needs to know about its data; stored beside its weights."""
    channels: int
    resolution: int
    num_classes: int = 0
    class_names: list[str] = field(default_factory=list)
    has_captions: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "DataInfo":
        return cls(**{k: d[k] for k in ("channels", "resolution", "num_classes", "class_names", "has_captions") if k in d})


class Generator(nn.Module):
    """Base class of every family's top-level module.

    Batches are dicts: "image" float [B, C, H, W] in [0, 1], "label" long [B]
    (may be absent), "caption" list[str] (may be absent).
    """

    #: keyword options `sample` accepts beyond n/labels/captions/generator,
    #: mapped to (type, default, help); used by the CLI and HTTP validation.
    sampling_options: dict[str, tuple[type, Any, str]] = {}

    #: what `sample` conditions on: "none", "label" or "caption"
    #: (families set it per instance from their config).
    conditioning: str = "none"

    def __init__(self, data_info: DataInfo):
        super().__init__()
        self.data_info = data_info

    def training_step(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Return {"loss": scalar tensor, **scalar metrics}."""
        raise NotImplementedError

    @torch.no_grad()
    def sample(self, n: int, *, labels: torch.Tensor | None = None, captions: list[str] | None = None,
               generator: torch.Generator | None = None, **options) -> torch.Tensor:
        """Return n images, float [n, C, H, W] in [0, 1]."""
        raise NotImplementedError

    def bits_per_dim(self, batch: dict[str, Any]) -> torch.Tensor | None:
        """Negative log-likelihood in bits per sub-pixel, where the family has one."""
        return None
