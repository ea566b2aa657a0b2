"""The protocol every model family offers the trainer, the CLI and the server.

A family is an `nn.Module` subclass of `Generator` plus a registry entry
(`raygen.models.registry.Family`) that declares its config class, its
capabilities, its sampling parameters and the condition kinds it accepts.
A model knows nothing of Ray, MLflow or DeepSpeed. What each capability
promises is in `raygen.models.capabilities`; docs/families.md walks through
a whole family.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import torch
from torch import nn

from raygen.models.capabilities import Capability, require
from raygen.models.conditions import Conditions
from raygen.models.sampling import SamplingParams, image_seeds, make_generators, parse_params


@dataclass(kw_only=True)
class DataInfo:
    """What a model needs to know about its data; stored beside its weights.

    `resolution` is a shorthand for square images (height = width); non-square
    data gives `height` and `width` and leaves `resolution` None.
    `condition_columns` are the dataset's per-record condition columns (the
    manifest's extra columns: kind, width, max_len, fields), e.g. spheres scenes.
    """
    channels: int
    resolution: int | None = None
    height: int | None = None
    width: int | None = None
    num_classes: int = 0
    class_names: list[str] = field(default_factory=list)
    has_captions: bool = False
    condition_columns: dict[str, dict[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.resolution is not None:
            if (self.height or self.resolution) != self.resolution or (self.width or self.resolution) != self.resolution:
                raise ValueError(f"resolution {self.resolution} contradicts height {self.height} / width {self.width}")
            self.height = self.width = self.resolution
        elif self.height is None or self.width is None:
            raise ValueError("DataInfo needs resolution (square images) or both height and width")
        elif self.height == self.width:
            self.resolution = self.height

    @property
    def shape(self) -> tuple[int, int, int]:
        """[C, H, W] of one image."""
        return (self.channels, self.height, self.width)

    def square_resolution(self, family: str) -> int:
        """The side of square images, or a clear error for families that need squares."""
        if self.resolution is None:
            raise ValueError(f"model family {family!r} needs square images; the data is {self.height}x{self.width} "
                             "(set data.resolution to one number)")
        return self.resolution

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "DataInfo":
        keys = ("channels", "resolution", "height", "width", "num_classes", "class_names", "has_captions",
                "condition_columns")
        return cls(**{k: d[k] for k in keys if k in d and d[k] is not None})


class Generator(nn.Module):
    """Base class of every family's top-level module.

    Batches are dicts: "image" float [B, C, H, W] in [0, 1], "label" long [B]
    (may be absent), "caption" list[str] (may be absent), and any condition
    columns of the dataset (e.g. "scene", "scene_mask", "scene_globals").

    Set by the registry when the model is built: `family`, `capabilities`,
    `sampling_params`. Set by the family (per instance, from its config):
    `condition_kind`, one of the kinds its registry entry accepts.
    """

    family: str = ""
    capabilities: frozenset[Capability] = frozenset()
    sampling_params: type[SamplingParams] = SamplingParams
    condition_kind: str = "none"

    def __init__(self, data_info: DataInfo):
        super().__init__()
        self.data_info = data_info

    # ------------------------------------------------------------ frozen components
    def attach_components(self, components: dict[str, nn.Module]) -> None:
        """Hold models trained by earlier runs (a VAE, codebooks): frozen, kept
        out of the optimizer, exported in their own folders."""
        self.components = nn.ModuleDict(components)
        for module in self.components.values():
            module.requires_grad_(False)
            module.eval()

    def train(self, mode: bool = True) -> "Generator":
        super().train(mode)
        if isinstance(getattr(self, "components", None), nn.ModuleDict):
            self.components.eval()  # frozen components never switch to training behaviour
        return self

    # ------------------------------------------------------------ optional extras
    def bits_per_dim(self, batch: dict[str, Any]) -> torch.Tensor | None:
        """Negative log-likelihood in bits per sub-pixel, where the family has one."""
        return None

    # ------------------------------------------------------------ a friendly front to `sample`
    @torch.no_grad()
    def generate(self, n: int | None = None, *, condition: Any = None, conditions: Conditions | None = None,
                 seed: int = 0, seeds: Sequence[int] | None = None, params: SamplingParams | None = None,
                 **param_values: Any) -> torch.Tensor:
        """n images, float [n, C, H, W] in [0, 1].

        condition: one raw value for every image (a label index or name, a
        caption, a scene, an image), or a list with one per image; image i
        uses seed `seed + i` unless `seeds` are given. Keyword arguments are
        sampling parameters (`temperature=0.8`), checked by the family's model.
        """
        require(self, Capability.SAMPLE)
        if conditions is None:
            if isinstance(condition, (list, tuple)):
                values = list(condition)
            else:
                values = [condition] * (n if n is not None else len(seeds or [None]))
            conditions = Conditions.parse(self.condition_kind, values, self.data_info)
        count = conditions.n
        if n is not None and n != count:
            raise ValueError(f"n={n} but {count} conditions were given")
        if params is None:
            params = parse_params(self.sampling_params, param_values, strict=False)
        elif param_values:
            raise TypeError("give sampling parameters either as params= or as keywords, not both")
        seeds = list(seeds) if seeds is not None else image_seeds(seed, count)
        device = next((p.device for p in self.parameters()), torch.device("cpu"))
        return self.sample(conditions, params, make_generators(seeds, device))
