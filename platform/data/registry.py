"""The registry of dataset builders: one small module per dataset under
`raygen.data.sources`, each registering its builder class by name."""
from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Iterator

import numpy as np

from raygen.data.errors import DataError
from raygen.data.images import as_size
from raygen.data.manifest import ExtraColumn
from raygen.data.shards import Record

_BUILDERS: dict[str, type["DatasetBuilder"]] = {}


@dataclass(kw_only=True)
class PrepareRequest:
    """The user's prepare options, before a builder fills in its defaults.
    `resolution` is one int (a square) or [height, width]; `size` gives
    (height, width) once it is set."""
    resolution: int | list[int] | None = None
    channels: int | None = None
    count: int | None = None
    seed: int = 0
    val_fraction: float = 0.1
    source: str | None = None

    @property
    def size(self) -> tuple[int, int]:
        return as_size(self.resolution)


@dataclass(kw_only=True)
class SourcePlan:
    """What a builder will produce. `records(split)` yields the split's
    records in their final order; `splits` gives the expected row counts
    (progress bars; imports may skip undecodable records). `resolution` is
    one int (a square) or [height, width]; records are fitted to it."""
    resolution: int | list[int]
    channels: int
    splits: dict[str, int]
    records: Callable[[str], Iterator[Record]]
    class_names: list[str] = field(default_factory=list)
    has_captions: bool = False
    extra_columns: dict[str, ExtraColumn] = field(default_factory=dict)
    source: str = ""

    @property
    def size(self) -> tuple[int, int]:
        return as_size(self.resolution)


class DatasetBuilder:
    """Base of every dataset builder.

    Subclasses set the class attributes and implement `plan`. `Options` is a
    kw_only dataclass of builder-specific options (`prepare_dataset(...,
    **options)`, `raygen data prepare --opt key=value`).
    """
    name: ClassVar[str]
    summary: ClassVar[str]
    #: bump when generation changes, so cached prepared copies are rebuilt
    version: ClassVar[int] = 1
    default_resolution: ClassVar[int | None] = None
    default_channels: ClassVar[int | None] = None
    #: how many training images when --count is not given (None: the whole source)
    default_count: ClassVar[int | None] = None
    #: True when the builder reads `source` (a path) instead of generating
    takes_source: ClassVar[bool] = False

    @dataclass(kw_only=True)
    class Options:
        pass

    def parse_options(self, options: dict[str, Any]):
        names = [f.name for f in dataclasses.fields(self.Options)]
        unknown = sorted(set(options) - set(names))
        if unknown:
            valid = ", ".join(names) or "none"
            raise DataError(f"dataset '{self.name}' has no option {', '.join(unknown)}; its options are: {valid}")
        try:
            return self.Options(**options)
        except (TypeError, ValueError) as err:
            raise DataError(f"dataset '{self.name}' options: {err}") from None

    def plan(self, req: PrepareRequest, opts) -> SourcePlan:
        raise NotImplementedError


def register(cls: type[DatasetBuilder]) -> type[DatasetBuilder]:
    """Class decorator: add a builder to the registry under `cls.name`."""
    if cls.name in _BUILDERS and _BUILDERS[cls.name] is not cls:
        raise ValueError(f"dataset builder '{cls.name}' registered twice")
    _BUILDERS[cls.name] = cls
    return cls


def _load_sources() -> None:
    importlib.import_module("raygen.data.sources")


def builder_names() -> list[str]:
    _load_sources()
    return sorted(_BUILDERS)


def get_builder(name: str) -> DatasetBuilder:
    _load_sources()
    if name not in _BUILDERS:
        raise DataError(f"unknown dataset '{name}'; choose one of: {', '.join(sorted(_BUILDERS))}, "
                        "or give a path to a prepared folder, an image folder, or parquet/.tar shards")
    return _BUILDERS[name]()


def is_builtin(name: str) -> bool:
    _load_sources()
    return name in _BUILDERS


# ---------------------------------------------------------------- split helpers
def val_size_for(n_train: int, val_fraction: float) -> int:
    """Validation rows so that val is `val_fraction` of train+val (at least 1)."""
    return max(1, round(n_train * val_fraction / (1.0 - val_fraction)))


def pool_split(pool: int, *, count: int | None, val_fraction: float, seed: int) -> dict[str, np.ndarray]:
    """Split indices 0..pool-1 into train/val with a seeded permutation.

    Validation takes the first round(pool*val_fraction) permuted indices and
    training the rest, so `count` only shortens training, never moves
    images between splits.
    """
    if pool < 2:
        raise DataError(f"the source holds {pool} image(s); at least 2 are needed (one train, one val)")
    n_val_max = min(pool - 1, max(1, round(pool * val_fraction)))
    perm = np.random.default_rng([seed, 7]).permutation(pool)
    train, val = perm[n_val_max:], perm[:n_val_max]
    if count is not None and count < len(train):
        train = train[:count]
        val = val[:val_size_for(count, val_fraction)]
    return {"train": train, "val": val}


def split_counts(count: int, val_fraction: float) -> dict[str, int]:
    """For generated datasets: `count` training images plus a matching val split."""
    return {"train": count, "val": val_size_for(count, val_fraction)}


def record_rng(seed: int, split: str, i: int) -> np.random.Generator:
    """One generator per record: record i of a split does not depend on
    how many records come before or after it (count changes keep it)."""
    return np.random.default_rng([seed, {"train": 0, "val": 1}[split], i])
