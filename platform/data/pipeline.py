"""The Ray Data pipeline: lazy shard reads, vectorized PNG decode and
resize, and a deterministic split of each split across Train workers.

Exact resume needs every worker to see the same rows in the same order on
every run. Ray Train's default `streaming_split` hands blocks to whichever
worker asks first, so `DeterministicDataConfig` instead gives rank r the
contiguous row-index range [r*n, (r+1)*n) with n = rows // world_size
(equal for all ranks; rows are already in random order: prepare permutes
pooled sources and generated records are independent draws). The val split
instead gives every row to one rank (shards differ by at most a row), so
validation covers the whole split whatever the worker count. The unit of work
is one parquet row group: a Ray task reads it, keeps the rank's rows and
decodes them, so each image is read and decoded by one worker only, and
with `preserve_order` the output order is the unit order. WorkerBatches
builds each epoch's stream from the same recipe with the unit order
permuted by (seed, epoch, rank, world size).
"""
from __future__ import annotations

import copy
from bisect import bisect_right
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import ray
import ray.data
import ray.train
from ray.data import DataIterator, Dataset

from raygen.data.decode import DecodeParams, check_spec, decode_table
from raygen.data.manifest import ExtraColumn, read_manifest


@dataclass(frozen=True)
class ReadUnit:
    """Rows [lo, hi) (row-group relative) of one row group of one shard file."""
    file: str
    row_group: int
    first_index: int   # split-wide index of the row group's first row
    lo: int
    hi: int


def _read_units(batch: dict, params: DecodeParams) -> dict:
    """map_batches UDF: read and decode the read units named in `batch`."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from raygen import storage
    tables = []
    for file, rg, lo, hi in zip(batch["file"], batch["row_group"], batch["lo"], batch["hi"]):
        # an s3:// shard is read straight from object storage, on whichever node the task runs
        source = storage.open_input_file(str(file)) if storage.is_uri(str(file)) else str(file)
        t = pq.ParquetFile(source).read_row_group(int(rg), columns=params.read_columns)
        tables.append(t.slice(int(lo), int(hi) - int(lo)))
    table = pa.concat_tables(tables) if len(tables) > 1 else tables[0]
    if isinstance(params, DecodeParams):
        return decode_table(table, params)
    return params.decode(table)  # a latent dataset (raygen.data.latents.LatentParams)


@dataclass(kw_only=True)
class Recipe:
    """How a decoded split is built: its read units and decode parameters.
    Picklable; rebuilt per rank (and per epoch) without the manifest."""
    split: str
    rows: int
    units: list[ReadUnit]             # every row group of the split, in index order
    shards: list[tuple[int, str]]     # (first_index, file name) for log lines
    params: DecodeParams

    def rank_range(self, rank: int, world_size: int) -> tuple[int, int]:
        if world_size > 1 and self.split == "val":
            # every val row counts once (shards may differ by a row): validation sums are weighted by
            # counts, so 2 workers report the single-process loss (seed 002's wrong test loss)
            return rank * self.rows // world_size, (rank + 1) * self.rows // world_size
        n = self.rows // world_size if world_size > 1 else self.rows
        return rank * n, (rank + 1) * n

    def rank_units(self, rank: int, world_size: int) -> list[ReadUnit]:
        return self.range_units(*self.rank_range(rank, world_size))

    def range_units(self, lo: int, hi: int) -> list[ReadUnit]:
        """The read units of the rows [lo, hi) of the split, in order."""
        out = []
        for u in self.units:
            a, b = max(lo, u.first_index + u.lo), min(hi, u.first_index + u.hi)
            if a < b:
                out.append(ReadUnit(file=u.file, row_group=u.row_group, first_index=u.first_index,
                                    lo=a - u.first_index, hi=b - u.first_index))
        return out

    def dataset(self, rank: int = 0, world_size: int = 1, *, order_seed: tuple[int, ...] | None = None) -> Dataset:
        """The rank's decoded rows; unit order permuted by `order_seed` if given."""
        units = self.rank_units(rank, world_size)
        if order_seed is not None:
            units = [units[i] for i in np.random.default_rng(list(order_seed)).permutation(len(units))]
        return self.units_dataset(units)

    def units_dataset(self, units: list[ReadUnit]) -> Dataset:
        """The decoded rows of `units`, in that order."""
        items = [{"file": u.file, "row_group": u.row_group, "lo": u.lo, "hi": u.hi} for u in units]
        ds = ray.data.from_items(items, override_num_blocks=max(1, len(items)))
        ds = ds.map_batches(_read_units, fn_kwargs={"params": self.params}, batch_size=1, batch_format="numpy")
        ds.context.execution_options.preserve_order = True  # the order is the point
        return ds

    def meta(self, rank: int, world_size: int) -> "ShardMeta":
        lo, hi = self.rank_range(rank, world_size)
        return ShardMeta(split=self.split, rank=rank, world_size=world_size, rows=hi - lo,
                         shards=self.shards, extra_columns=dict(self.params.extra_columns), recipe=self)


@dataclass(kw_only=True)
class ShardMeta:
    """What a worker knows about its shard without reading the manifest."""
    split: str
    rank: int
    world_size: int
    rows: int | None                  # rows this rank gets (before dropping bad ones); None if unknown
    shards: list[tuple[int, str]] = field(default_factory=list)
    extra_columns: dict[str, ExtraColumn] = field(default_factory=dict)
    recipe: Recipe | None = None      # lets WorkerBatches re-order read units per epoch

    def where(self, index: int) -> str:
        """`file row N` of a split-wide row index, for log lines."""
        if not self.shards:
            return f"row index {index}"
        k = bisect_right([s[0] for s in self.shards], index) - 1
        first, file = self.shards[max(k, 0)]
        return f"{file} row {index - first}"


def make_recipe(manifest, split: str, params: DecodeParams) -> Recipe:
    import pyarrow.parquet as pq
    info = manifest.split(split)
    remote = manifest.remote  # a local copy of an s3:// dataset: read tasks read the shards from there
    units = []
    for shard, path in zip(info.shards, manifest.shard_paths(split)):
        md = pq.ParquetFile(path).metadata
        start = shard.first_index
        file = f"{remote.rstrip('/')}/{shard.file}" if remote else str(path)
        for k in range(md.num_row_groups):
            n = md.row_group(k).num_rows
            units.append(ReadUnit(file=file, row_group=k, first_index=start, lo=0, hi=n))
            start += n
    return Recipe(split=split, rows=info.rows, units=units, params=params,
                  shards=[(s.first_index, s.file) for s in info.shards])


class ImageDataset(Dataset):
    """A decoded split that remembers its `Recipe` (kept across pickling).

    Datasets derived from it (`.map_batches`, `.limit`, ...) lose the recipe
    on purpose: the split config then falls back to a generic split that
    keeps the user's transformations.
    """
    _raygen_recipe: Recipe | None = None

    @classmethod
    def from_recipe(cls, recipe: Recipe) -> "ImageDataset":
        ds = Dataset.copy(recipe.dataset(), _as=cls)
        ds._raygen_recipe = recipe
        return ds

    def __getstate__(self):
        state = super().__getstate__()
        state["raygen_recipe"] = self._raygen_recipe
        return state

    def __setstate__(self, state):
        recipe = state.pop("raygen_recipe", None)
        super().__setstate__(state)
        self._raygen_recipe = recipe


def build_datasets(dir: str | Path, data_spec) -> dict[str, Dataset]:
    """{"train", "val"}: lazy Ray datasets of the prepared folder `dir`,
    decoded, resized to `data_spec.resolution` (one int, or [height, width])
    and converted to `data_spec.channels` (no augmentation). Columns: image uint8 [C,H,W],
    label, caption, index, extras, and `status`/`message`: undecodable or
    rejected rows are zero-image placeholders that WorkerBatches drops and
    counts. A latent dataset gives "latent" float32 [*shape] instead of
    "image" (and no status)."""
    manifest = read_manifest(dir)
    if manifest.kind == "latents":  # "latent" [*shape] instead of "image" (raygen.data.latents)
        from raygen.data.latents import LatentParams, check_latent_spec
        check_latent_spec(manifest, data_spec)
        params = LatentParams.for_manifest(manifest)
    else:
        check_spec(manifest, data_spec)
        params = DecodeParams.for_spec(manifest, data_spec)
    return {split: ImageDataset.from_recipe(make_recipe(manifest, split, params))
            for split, info in manifest.splits.items() if info.rows > 0}


# ---------------------------------------------------------------- per-worker shards
class RankShard(DataIterator):
    """The DataIterator one Train worker gets (its rows, in a fixed order),
    plus `meta` (ShardMeta) that WorkerBatches uses for per-epoch order,
    exact epoch lengths and log lines."""

    def __init__(self, dataset: Dataset, meta: ShardMeta):
        self._dataset = dataset
        self._inner = dataset.iterator()
        self.meta = meta

    def _to_ref_bundle_iterator(self):
        return self._inner._to_ref_bundle_iterator()

    def _get_dataset_tag(self):
        tag = dict(self._inner._get_dataset_tag())
        tag["split_index"] = str(self.meta.rank)
        return tag

    def stats(self) -> str:
        return self._inner.stats()

    def schema(self):
        return self._inner.schema()

    def get_context(self):
        return self._inner.get_context()

    def __repr__(self) -> str:
        m = self.meta
        return f"RankShard({m.split}, rank {m.rank}/{m.world_size}, {m.rows} rows)"


class DeterministicDataConfig(ray.train.DataConfig):
    """Splits every dataset the same way on every run: rank r's rows and
    their order depend only on (dataset, rank, world size)."""

    def __init__(self, data_spec=None, datasets_to_split: Any = "all", execution_options=None):
        # no locality hints: they would make the split depend on node placement
        super().__init__(datasets_to_split=datasets_to_split, execution_options=execution_options,
                         enable_shard_locality=False)
        self.data_spec = data_spec

    def _options(self, name: str):
        resolve = getattr(self, "_resolve_execution_options", None)
        opts = resolve(name) if resolve else copy.deepcopy(self.default_ingest_options())
        opts.preserve_order = True
        return opts

    def configure(self, datasets: dict[str, Dataset], world_size: int, worker_handles=None,
                  worker_node_ids=None, **kwargs) -> list[dict[str, DataIterator]]:
        to_split = set(datasets) if self._datasets_to_split == "all" else set(self._datasets_to_split)
        output: list[dict[str, DataIterator]] = [{} for _ in range(world_size)]
        for name, ds in datasets.items():
            for rank, shard in enumerate(rank_shards(ds, world_size, split=name in to_split,
                                                     options=self._options(name))):
                output[rank][name] = shard
        return output


def rank_shards(ds: Dataset, world_size: int, *, split: bool = True, options=None) -> list[RankShard]:
    """One RankShard per rank (what `configure` hands out; usable without
    Ray Train, e.g. in benchmarks and tests)."""
    recipe: Recipe | None = getattr(ds, "_raygen_recipe", None)
    if options is None:
        options = copy.deepcopy(ds.context.execution_options)
    options.preserve_order = True
    shards = []
    if recipe is not None:
        for rank in range(world_size):
            r, ws = (rank, world_size) if split else (0, 1)
            part = recipe.dataset(r, ws)
            part.context.execution_options = copy.deepcopy(options)
            meta = recipe.meta(r, ws)
            meta.rank = rank
            shards.append(RankShard(part, meta))
        return shards
    ds = ds.copy(ds)
    ds.context.execution_options = options
    if not split:
        return [RankShard(ds, ShardMeta(split="?", rank=rank, world_size=1, rows=None)) for rank in range(world_size)]
    # A dataset we did not build: Dataset.split(equal=True) is deterministic
    # with preserve_order, at the price of materializing it once.
    return [RankShard(part, ShardMeta(split="?", rank=rank, world_size=world_size, rows=part.count()))
            for rank, part in enumerate(ds.split(world_size, equal=True))]


def make_data_config(data_spec=None) -> DeterministicDataConfig:
    """The dataset_config for TorchTrainer: a deterministic split across workers."""
    return DeterministicDataConfig(data_spec)
