"""`manifest.json`: what a prepared dataset folder holds.

The manifest is written last (see shards.py), so a folder with a readable
manifest is a complete dataset; a folder without one is not a dataset.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from raygen.data.errors import DataError
from raygen.data.images import as_size

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
#: in a local copy of a dataset on object storage (prepare.mirror_dataset): the s3:// URI it came from
SOURCE_NAME = ".raygen-source"
#: columns every shard has; anything else is an extra column described in the manifest
CORE_COLUMNS = ("index", "png", "label", "caption")
#: the core columns of a latent dataset's shards (kind "latents", see raygen.data.latents)
LATENT_COLUMNS = ("index", "latent", "label", "caption")
SPLITS = ("train", "val")
KINDS = ("images", "latents")


@dataclass(kw_only=True)
class ExtraColumn:
    """An extra per-record column.

    kind: "sequence" (a variable-length list of fixed-width float rows, e.g.
    one row per sphere; delivered padded to [B, max_len, width] with a
    `<name>_mask`), "vector" (fixed-width floats, [B, width]), "scalar"
    (one number, [B]) or "string" (list[str]).
    """
    kind: Literal["sequence", "vector", "scalar", "string"]
    width: int = 1
    max_len: int = 0
    fields: list[str] = field(default_factory=list)
    description: str = ""
    #: field -> [low, high]: the values the data was drawn from; scene conditions outside them are refused
    ranges: dict[str, list[float]] = field(default_factory=dict)

    def arrow_type(self):
        import pyarrow as pa
        return {
            "sequence": lambda: pa.list_(pa.list_(pa.float32(), self.width)),
            "vector": lambda: pa.list_(pa.float32(), self.width),
            "scalar": pa.float64,
            "string": pa.string,
        }[self.kind]()


@dataclass(kw_only=True)
class ShardInfo:
    file: str
    rows: int
    bytes: int
    sha256: str
    first_index: int


@dataclass(kw_only=True)
class SplitInfo:
    rows: int
    shards: list[ShardInfo]
    skipped: int = 0  # source records skipped at prepare time (undecodable)


@dataclass(kw_only=True)
class LatentInfo:
    """What a latent dataset (kind "latents") holds: per record a float
    tensor of `shape` stored as `dtype` (a fixed-size list column `latent`),
    made by `encoder` (uri, export, family, digest) from `source` (path,
    name, digest). See raygen.data.latents."""
    shape: list[int]
    dtype: str
    encoder: dict[str, Any] = field(default_factory=dict)
    source: dict[str, Any] = field(default_factory=dict)

    @property
    def map_shape(self) -> tuple[int, int, int]:
        """The latent as [C, H, W]: [C, H, W] as is, [H, W] as [1, H, W], [D] as [D, 1, 1]."""
        s = list(self.shape)
        if len(s) == 3:
            return s[0], s[1], s[2]
        if len(s) == 2:
            return 1, s[0], s[1]
        if len(s) == 1:
            return s[0], 1, 1
        raise DataError(f"latent shape {s} has no [C, H, W] view")


@dataclass(kw_only=True)
class Manifest:
    """`height` x `width`: the stored images' size (manifests before
    non-square support stored only `resolution`, read as a square). A latent
    dataset (`kind` "latents") keeps the encoded images' size there and
    describes its latents in `latents`."""
    name: str
    height: int
    width: int
    channels: int
    splits: dict[str, SplitInfo]
    num_classes: int = 0
    class_names: list[str] = field(default_factory=list)
    has_captions: bool = False
    extra_columns: dict[str, ExtraColumn] = field(default_factory=dict)
    source: str = ""
    prepare: dict[str, Any] = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION
    kind: str = "images"               # or "latents"
    latents: LatentInfo | None = None  # for kind "latents"
    path: Path | None = None  # where it was read from; not stored

    # ------------------------------------------------------------ views
    @property
    def size(self) -> tuple[int, int]:
        """(height, width) of the stored images."""
        return self.height, self.width

    @property
    def resolution(self) -> int | list[int]:
        """The stored size as `data.resolution` writes it: one int when
        square, else [height, width]."""
        return self.height if self.height == self.width else [self.height, self.width]

    @property
    def counts(self) -> dict[str, int]:
        return {k: s.rows for k, s in self.splits.items()}

    @property
    def remote(self) -> str | None:
        """The s3:// URI this local copy mirrors (prepare.mirror_dataset), or None."""
        marker = self.path / SOURCE_NAME if self.path is not None else None
        return marker.read_text().strip() if marker is not None and marker.is_file() else None

    def shard_paths(self, split: str) -> list[Path]:
        if self.path is None:
            raise DataError("manifest has no folder; read it with read_manifest(dir)")
        return [self.path / s.file for s in self.split(split).shards]

    def split(self, split: str) -> SplitInfo:
        if split not in self.splits:
            raise DataError(f"dataset '{self.name}' has no split '{split}'; it has: {', '.join(self.splits)}")
        return self.splits[split]

    def data_info(self, data_spec):
        """What the pipeline delivers for `data_spec`: its channels, height
        and width (the crop's when training crops), the labels, and the
        per-record condition columns (the extra columns, as plain dicts:
        kind, width, max_len, fields, description)."""
        from raygen.models.base import DataInfo
        if self.kind == "latents":  # the model sees the latent map: its [C, H, W] (raygen.data.latents)
            c, h, w = self.latents.map_shape
            return DataInfo(channels=c, height=h, width=w, num_classes=self.num_classes,
                            class_names=list(self.class_names), has_captions=self.has_captions,
                            condition_columns={k: asdict(v) for k, v in self.extra_columns.items()})
        h, w = delivered_size(data_spec)
        return DataInfo(channels=data_spec.channels, height=h, width=w,
                        num_classes=self.num_classes, class_names=list(self.class_names),
                        has_captions=self.has_captions,
                        condition_columns={k: asdict(v) for k, v in self.extra_columns.items()})

    # ------------------------------------------------------------ (de)serialise
    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("path")
        d["counts"] = self.counts
        # `resolution` is kept beside height and width for readers of square datasets that predate them
        d["resolution"] = self.resolution
        # key order fixed so the same dataset always gives the same bytes
        order = ["schema_version", "name", "source", "resolution", "height", "width", "channels", "counts",
                 "num_classes", "class_names", "has_captions", "extra_columns", "splits", "prepare"]
        if self.kind != "images":  # image manifests keep their bytes: the keys only appear on latent datasets
            order[1:1] = ["kind", "latents"]
        return {k: d[k] for k in order}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False) + "\n"

    @classmethod
    def from_dict(cls, d: dict[str, Any], path: Path | None = None) -> "Manifest":
        splits = {k: SplitInfo(rows=v["rows"], skipped=v.get("skipped", 0),
                               shards=[ShardInfo(**s) for s in v["shards"]])
                  for k, v in d["splits"].items()}
        extras = {k: ExtraColumn(**v) for k, v in d.get("extra_columns", {}).items()}
        kind = d.get("kind", "images")
        if kind not in KINDS:
            raise ValueError(f"unknown dataset kind {kind!r} (this raygen reads {', '.join(KINDS)})")
        if "height" in d and "width" in d:
            height, width = int(d["height"]), int(d["width"])
        else:  # written before non-square images: one side
            height = width = int(d["resolution"])
        return cls(name=d["name"], height=height, width=width, channels=int(d["channels"]), splits=splits,
                   num_classes=int(d.get("num_classes", 0)), class_names=list(d.get("class_names", [])),
                   has_captions=bool(d.get("has_captions", False)), extra_columns=extras,
                   source=d.get("source", ""), prepare=d.get("prepare", {}),
                   schema_version=int(d["schema_version"]), kind=kind,
                   latents=LatentInfo(**d["latents"]) if kind == "latents" else None, path=path)

    # ------------------------------------------------------------ checks
    def verify(self) -> None:
        """Check every shard's size and sha256 against the manifest."""
        for split, info in self.splits.items():
            for shard in info.shards:
                p = self.path / shard.file
                if not p.is_file():
                    raise DataError(f"{p}: shard listed in {MANIFEST_NAME} is missing; prepare the dataset again")
                if p.stat().st_size != shard.bytes or sha256_file(p) != shard.sha256:
                    raise DataError(f"{p}: checksum does not match {MANIFEST_NAME} (file changed or damaged); "
                                    "prepare the dataset again")


def delivered_size(data_spec) -> tuple[int, int]:
    """(height, width) of the images a batch holds for `data_spec`: the
    crop's when training crops, else data.resolution's."""
    return as_size(data_spec.augment.crop or data_spec.resolution)


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def read_manifest(dir: str | Path, *, verify: bool = False) -> Manifest:
    """Read `dir/manifest.json`; raise DataError (one line) if the folder is
    missing, has no manifest (never prepared, or a prepare was interrupted),
    or holds a corrupt or empty dataset."""
    root = Path(dir).expanduser()
    if not root.exists():
        raise DataError(f"dataset folder {root} does not exist; create it with `raygen data prepare NAME --out {root}`")
    mpath = root / MANIFEST_NAME
    if not mpath.is_file():
        raise DataError(f"{root} has no {MANIFEST_NAME} (not a prepared dataset, or its prepare was interrupted); "
                        f"run `raygen data prepare NAME --out {root}`")
    try:
        d = json.loads(mpath.read_text())
        m = Manifest.from_dict(d, path=root.resolve())
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise DataError(f"{mpath}: unreadable manifest ({type(err).__name__}: {err}); "
                        "prepare the dataset again") from None
    if m.schema_version > SCHEMA_VERSION:
        raise DataError(f"{mpath}: schema version {m.schema_version} is newer than this raygen reads "
                        f"({SCHEMA_VERSION}); upgrade raygen or prepare the dataset again")
    if "train" not in m.splits or m.splits["train"].rows == 0:
        raise DataError(f"{root}: dataset '{m.name}' has no training images; prepare it with a larger --count "
                        "or check the source")
    for info in m.splits.values():
        for shard in info.shards:
            if not (root / shard.file).is_file():
                raise DataError(f"{root / shard.file}: shard listed in {MANIFEST_NAME} is missing; "
                                "prepare the dataset again")
    if verify:
        m.verify()
    return m
