"""What every Ray Train worker of an encode job runs (`raygen data encode`,
an `encode:` pipeline stage): encode its share of a dataset with the frozen
model and write it, resumably. The driver side is raygen.train.encode.

Shards of the output are dealt round-robin (shard k to rank k % workers);
a worker reads its shards' source rows through Ray Data (the split's
recipe: the same read and decode tasks training uses) and encodes them in
the plan's batches. Progress is the files in the output folder (a part per
encoded batch, a shard file and its done record once complete; see
raygen.data.latents), so a restarted or resumed job, with any number of
workers, skips what is done.
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

from raygen.data.latents import EncodePlan, ShareResult, encode_share, pending_batches, read_plan, state_dir


@dataclass(frozen=True, kw_only=True)
class EncodeWorkerConfig:
    """What `encode_worker` needs; Ray hands it over as a plain dict (`to_dict`)."""
    out: Path                       # the output folder (its .encode/ holds the plan)
    export: Path                    # the encoder's local export folder
    use_gpu: bool = False
    stop_after_batches: int | None = None   # debug: each worker stops after this many batches
    progress: bool = True
    family_sources: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out.update(out=str(self.out), export=str(self.export), family_sources=list(self.family_sources))
        return out

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "EncodeWorkerConfig":
        known = {f.name for f in fields(cls)}
        unknown, missing = sorted(set(raw) - known), sorted({"out", "export"} - set(raw))
        if unknown or missing:
            raise ValueError(f"encode_worker config: unknown keys {unknown}, missing keys {missing}; "
                             f"it takes {sorted(known)}")
        values = dict(raw)
        values.update(out=Path(raw["out"]), export=Path(raw["export"]),
                      family_sources=tuple(raw.get("family_sources") or ()))
        return cls(**values)


def make_encoder(model, device: torch.device) -> Callable[[np.ndarray], np.ndarray]:
    """uint8 images [B, C, H, W] -> float32 latents (numpy), converted to
    [0, 1] exactly as the training pipeline does (raygen.data.worker)."""
    def encode(images_u8: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(images_u8.astype(np.float32) * np.float32(1.0 / 255.0)).to(device)
        with torch.inference_mode():
            z = model.encode(x)
        return z.detach().to("cpu", torch.float32).numpy()
    return encode


def local_rows(recipe) -> Callable[[list[tuple[int, int]]], Iterator[dict[str, np.ndarray]]]:
    """Source rows read in this process (tests, no Ray): the very read and
    decode function the Ray Data tasks run."""
    from raygen.data.pipeline import _read_units

    def read(ranges):
        for lo, hi in ranges:
            for u in recipe.range_units(lo, hi):
                yield _read_units({"file": [u.file], "row_group": [u.row_group], "lo": [u.lo], "hi": [u.hi]},
                                  recipe.params)
    return read


def ray_rows(recipe, options=None) -> Callable[[list[tuple[int, int]]], Iterator[dict[str, np.ndarray]]]:
    """Source rows streamed through Ray Data: one read-and-decode task per
    parquet row group (sliced to the ranges), in order."""
    def read(ranges):
        units = [u for lo, hi in ranges for u in recipe.range_units(lo, hi)]
        if not units:
            return
        ds = recipe.units_dataset(units)
        if options is not None:
            ds.context.execution_options = copy.deepcopy(options)
        ds.context.execution_options.preserve_order = True  # rows in source order
        for chunk in ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=2):
            yield dict(chunk)
    return read


def encode_rank(encode, plan: EncodePlan, out: Path, rows_for: Callable[[str], Callable], extra_columns: dict, *,
                rank: int, world_size: int, stop_after: int | None = None, report=None) -> ShareResult:
    """Encode everything rank `rank` of `world_size` owes, split by split.
    `rows_for(split)` gives the split's `read_rows`; `report(done, total,
    images_per_s)` is called after each batch."""
    total = sum(len(pending_batches(out, plan, s, rank, world_size)) for s in plan.splits)
    overall = ShareResult()
    started = time.perf_counter()
    images = 0

    def on_batch(share: ShareResult, _tasks: int, n: int) -> None:
        nonlocal images
        images += n
        if report is not None:
            rate = images / max(time.perf_counter() - started, 1e-9)
            report(overall.batches + share.batches, total, rate)

    for split, ranges in plan.splits.items():
        if not ranges:
            continue
        share = encode_share(encode, plan, out, split, rank=rank, world_size=world_size, read_rows=rows_for(split),
                             extra_columns=extra_columns, stop_after=stop_after, done_before=overall.batches,
                             on_batch=on_batch)
        overall.batches += share.batches
        overall.shards += share.shards
        if share.stopped:
            overall.stopped = True
            break
    return overall


def encode_worker(raw_config: dict[str, Any]) -> None:
    """Ray Train's per-worker function; `raw_config` is `EncodeWorkerConfig.to_dict()`."""
    import ray.train

    from raygen.models.registry import import_family_sources
    from raygen.train.console import worker_console

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    config = EncodeWorkerConfig.from_dict(raw_config)
    with worker_console(state_dir(config.out), rank, progress=config.progress):
        import_family_sources(list(config.family_sources))
        _encode(config, ctx, rank, world)


def _encode(config: EncodeWorkerConfig, ctx, rank: int, world: int) -> None:
    import ray.train

    from raygen.data.manifest import read_manifest
    from raygen.exports import load_exported
    from raygen.models import Capability, require
    from raygen.train.console import progress, say

    use_cuda = config.use_gpu and torch.cuda.is_available()
    device = torch.device(f"cuda:{ctx.get_local_rank()}") if use_cuda else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    plan = read_plan(config.out)
    torch.set_num_threads(plan.threads)  # the plan's, whatever this worker's CPUs: the same bytes for any worker count
    model = load_exported(config.export).model.to(device).eval()
    require(model, Capability.ENCODE)
    source = read_manifest(plan.source["path"])
    shards = {split: ray.train.get_dataset_shard(split) for split, ranges in plan.splits.items() if ranges}

    def rows_for(split: str):
        shard = shards[split]
        options = shard.get_context().execution_options if hasattr(shard, "get_context") else None
        return ray_rows(shard.meta.recipe, options)

    def report(done: int, total: int, rate: float) -> None:
        if rank == 0:
            progress(done, total, {"images_per_s": rate})

    result = encode_rank(make_encoder(model, device), plan, config.out, rows_for, dict(source.extra_columns),
                         rank=rank, world_size=world, stop_after=config.stop_after_batches, report=report)
    if rank == 0:
        say(f"rank 0 encoded {result.batches} batch(es), completed {result.shards} shard(s)"
            + (" and stopped early (--stop-after-batches)" if result.stopped else ""))
