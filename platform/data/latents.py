"""Latent datasets: what a frozen encoder makes of an image dataset.

A latent dataset is a prepared folder like any other (parquet shards plus
`manifest.json`, written last), of kind "latents". Each row holds

    index     int64, the source record's index in its split (rows are in this order)
    latent    the encoder's output for the record, flattened into a fixed-size
              list of float32 or float16 (its shape is in the manifest)
    label, caption and the source's extra columns, carried over unchanged

and the manifest's `latents` entry gives the latent `shape` and `dtype`,
the `encoder` (the URI it was given as, the export folder, the family and a
content digest of its weights and config) and the `source` dataset (folder,
name and a content digest of its shards). The manifest's height, width and
channels are those of the encoded images.

`build_datasets` and `WorkerBatches` stream a latent dataset like an image
one, with "latent" float32 [B, *shape] in place of "image" (no image is
decoded: a model that needs the pixels decodes the latents with the encoder,
or reads the source dataset; augmentation is refused). `load_split_latents`
reads a split into memory without Ray.

The encode job itself (raygen.train.encode, `raygen data encode`) writes
through `EncodePlan` and the helpers below: a fixed plan of output shards,
each a range of source rows cut into batches, so the bytes do not depend on
how many workers share the work; every encoded batch is saved as a part
file, a shard file once all its parts exist, and progress lives in the
output folder's `.encode/` (removed once the manifest is written).
"""
from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from raygen.data.errors import DataError
from raygen.data.manifest import (LATENT_COLUMNS, MANIFEST_NAME, SCHEMA_VERSION, ExtraColumn, LatentInfo, Manifest,
                                  ShardInfo, SplitInfo, read_manifest)
from raygen.data.shards import (DEFAULT_SHARD_BYTES, ROW_GROUP_BYTES, ROW_GROUP_ROWS, TMP_PREFIX, _extra_array,
                                atomic_write_bytes, fsync_dir, write_manifest)

DTYPES = ("float32", "float16")
STATE_DIR = ".encode"          # the encode job's progress, inside the output folder
PLAN_FILE = "plan.json"
#: shards per split the default plan aims at, so several workers share even a small dataset
TARGET_SHARDS = 8


# ---------------------------------------------------------------- reading
@dataclass(frozen=True, kw_only=True)
class LatentParams:
    """How latent shard rows become numpy columns (the pipeline's and the
    local loader's counterpart of DecodeParams for images)."""
    shape: tuple[int, ...]
    extra_columns: dict[str, ExtraColumn] = field(default_factory=dict)

    @classmethod
    def for_manifest(cls, manifest: Manifest) -> "LatentParams":
        return cls(shape=tuple(manifest.latents.shape), extra_columns=dict(manifest.extra_columns))

    @property
    def read_columns(self) -> list[str]:
        return [*LATENT_COLUMNS, *self.extra_columns]

    def decode(self, table) -> dict[str, np.ndarray]:
        """latent float32 [B, *shape], label, caption, index and the extras."""
        from raygen.data.decode import _extra_to_numpy
        n = table.num_rows
        col = table.column("latent").combine_chunks()
        values = col.flatten().to_numpy(zero_copy_only=False)
        out = {
            "latent": values.astype(np.float32, copy=False).reshape(n, *self.shape),
            "label": table.column("label").to_numpy().astype(np.int64),
            "caption": np.array([c or "" for c in table.column("caption").to_pylist()], dtype=object),
            "index": table.column("index").to_numpy().astype(np.int64),
        }
        for name, spec in self.extra_columns.items():
            out.update(_extra_to_numpy(name, spec, table.column(name)))
        return out


def is_latents(manifest: Manifest) -> bool:
    return manifest.kind == "latents"


def check_latent_spec(manifest: Manifest, data_spec) -> None:
    """A latent dataset is streamed as stored: no image augmentation."""
    aug = data_spec.augment
    used = [k for k in ("hflip", "vflip", "shift", "crop") if getattr(aug, k)]
    if used:
        raise DataError(f"data.augment.{used[0]}: {manifest.path} is a latent dataset (no images to augment); "
                        "turn data.augment off for it")


def load_split_latents(dir: str | Path, split: str, limit: int | None = None) -> dict[str, Any]:
    """A latent split (or its first `limit` rows) as tensors, without Ray:
    "latent" float32 [N, *shape], "label" int64 [N], "caption" list[str],
    "index" int64 [N] and the extra columns, as the pipeline delivers them."""
    import pyarrow.parquet as pq
    import torch

    from raygen.data.worker import to_torch_batch
    m = read_manifest(dir)
    if not is_latents(m):
        raise DataError(f"{m.path} is an image dataset, not a latent one; read it with load_split_images")
    params = LatentParams.for_manifest(m)
    parts, seen = [], 0
    for path in m.shard_paths(split):
        cols = params.decode(pq.read_table(path, columns=params.read_columns))
        if limit is not None and seen + len(cols["index"]) > limit:
            cols = {k: v[:limit - seen] for k, v in cols.items()}
        parts.append(cols)
        seen += len(cols["index"])
        if limit is not None and seen >= limit:
            break
    if not parts:
        return {"latent": torch.zeros(0, *m.latents.shape), "label": torch.zeros(0, dtype=torch.int64),
                "caption": [], "index": torch.zeros(0, dtype=torch.int64)}
    cols = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    return to_torch_batch(cols, None, dict(m.extra_columns))


def dataset_digest(manifest: Manifest) -> str:
    """A content digest of a prepared dataset: every shard's sha256 and rows,
    split by split (names and paths aside)."""
    content = {split: [[s.rows, s.sha256] for s in info.shards] for split, info in manifest.splits.items()}
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()


# ---------------------------------------------------------------- the encode plan
@dataclass(kw_only=True)
class EncodePlan:
    """What an encode job writes, fixed before it starts. `splits` maps a
    split to its output shards, each a [lo, hi) range of source rows encoded
    in batches of `batch_size` with `threads` CPU threads; `image` is the
    (height, width, channels) the images are decoded to; `encoder` and
    `source` go to the manifest."""
    encoder: dict[str, Any]
    source: dict[str, Any]
    image: dict[str, int]
    shape: list[int]
    dtype: str
    batch_size: int
    splits: dict[str, list[list[int]]]
    #: CPU threads of every encoder call: on CPU a kernel may round differently with another
    #: thread count, so it is fixed by the plan, not by how many CPUs a worker has
    threads: int = 1

    def key(self) -> dict[str, Any]:
        """What determines the output bytes (not where the model or data lie)."""
        return {"encoder_digest": self.encoder["digest"], "source_digest": self.source["digest"],
                "image": self.image, "shape": list(self.shape), "dtype": self.dtype,
                "batch_size": self.batch_size, "splits": self.splits, "threads": self.threads}

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str) -> "EncodePlan":
        return cls(**json.loads(text))

    @staticmethod
    def shard_name(split: str, k: int) -> str:
        return f"{split}-{k:05d}.parquet"

    def batches(self, split: str, k: int) -> list[tuple[int, int, int]]:
        """(j, lo, hi) of every batch of shard k of `split`."""
        lo, hi = self.splits[split][k]
        return [(j, a, min(a + self.batch_size, hi)) for j, a in enumerate(range(lo, hi, self.batch_size))]

    @property
    def row_bytes(self) -> int:
        return int(np.prod(self.shape)) * np.dtype(self.dtype).itemsize

    @property
    def total_batches(self) -> int:
        return sum(len(self.batches(s, k)) for s, ranges in self.splits.items() for k in range(len(ranges)))


def plan_ranges(rows: int, batch_size: int, row_bytes: int, *, shard_rows: int | None = None,
                max_bytes: int = DEFAULT_SHARD_BYTES) -> list[list[int]]:
    """Output shards of a split of `rows` rows: [lo, hi) ranges of a whole
    number of batches, at most about `max_bytes` of latents each, and about
    TARGET_SHARDS of them for a small split. A function of these numbers
    alone, never of the worker count."""
    if shard_rows is None:
        shard_rows = min(max(1, max_bytes // max(1, row_bytes)), max(1, -(-rows // TARGET_SHARDS)))
    elif shard_rows < 1:
        raise DataError(f"shard_rows: {shard_rows} must be at least 1")
    shard_rows = -(-shard_rows // batch_size) * batch_size  # whole batches: only a split's last batch is short
    return [[lo, min(lo + shard_rows, rows)] for lo in range(0, rows, shard_rows)]


def state_dir(out: Path) -> Path:
    return Path(out) / STATE_DIR


def read_plan(out: Path) -> EncodePlan:
    return EncodePlan.from_json((state_dir(out) / PLAN_FILE).read_text())


def _ours(p: Path) -> bool:
    return (p.name in (MANIFEST_NAME, STATE_DIR) or p.name.startswith(TMP_PREFIX)
            or (p.suffix == ".parquet" and p.name.split("-")[0] in ("train", "val")))


def start_output(out: Path, plan: EncodePlan) -> str:
    """Get `out` ready for `plan`: "complete" when it already holds this very
    latent dataset, "resume" when an interrupted encode of the same plan left
    progress there, else "new" (old outputs removed, the plan written).
    Refuses a folder holding files that are not ours, to never delete user files."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {out} is a file; give a folder")
    out.mkdir(parents=True, exist_ok=True)
    if (out / MANIFEST_NAME).is_file():
        try:
            m = read_manifest(out)
            if is_latents(m) and m.prepare.get("encode") == plan.key():
                return "complete"
        except DataError:
            pass
    plan_file = state_dir(out) / PLAN_FILE
    if plan_file.is_file() and not (out / MANIFEST_NAME).exists():
        try:
            if read_plan(out).key() == plan.key():
                return "resume"
        except (ValueError, TypeError, KeyError):
            pass
    others = sorted(p.name for p in out.iterdir() if not _ours(p))
    if others:
        raise DataError(f"--out {out} holds files that are not a raygen dataset ({', '.join(others[:3])}...); "
                        "choose an empty or new folder")
    if (out / MANIFEST_NAME).exists():  # no longer a complete dataset, from now on
        (out / MANIFEST_NAME).unlink()
        fsync_dir(out)
    for p in out.iterdir():
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    state_dir(out).mkdir()
    atomic_write_bytes(plan_file, plan.to_json().encode())
    return "new"


# ---------------------------------------------------------------- parts and shards
def _part_dir(out: Path, split: str, k: int) -> Path:
    return state_dir(out) / "parts" / f"{split}-{k:05d}"


def _done_file(out: Path, split: str, k: int) -> Path:
    return state_dir(out) / "done" / f"{split}-{k:05d}.json"


def part_done(out: Path, split: str, k: int, j: int) -> bool:
    return (_part_dir(out, split, k) / f"{j:05d}.arrow").is_file()


def shard_done(out: Path, split: str, k: int) -> dict[str, Any] | None:
    f = _done_file(out, split, k)
    return json.loads(f.read_text()) if f.is_file() else None


def batch_table(cols: dict[str, np.ndarray], latents: np.ndarray, dtype: str,
                extra_columns: dict[str, ExtraColumn]):
    """One encoded batch as an arrow table in the shard schema: the source
    rows' index, label, caption and extras (padded sequences un-padded
    again), and the latents flattened into a fixed-size list."""
    import pyarrow as pa
    n = len(cols["index"])
    width = int(np.prod(latents.shape[1:])) if latents.ndim > 1 else 1
    flat = np.ascontiguousarray(latents, dtype=np.dtype(dtype)).reshape(-1)
    table = {
        "index": pa.array(np.asarray(cols["index"], np.int64)),
        "latent": pa.FixedSizeListArray.from_arrays(pa.array(flat), width),
        "label": pa.array(np.asarray(cols["label"], np.int64)),
        "caption": pa.array([str(c) for c in cols["caption"]], pa.string()),
    }
    for name, spec in extra_columns.items():
        if n == 0:
            table[name] = pa.array([], spec.arrow_type())
            continue
        values = cols[name]
        if spec.kind == "sequence":
            mask = cols[f"{name}_mask"]
            values = [values[i][mask[i]] for i in range(n)]
        table[name] = _extra_array(spec, list(values))
    return pa.table(table)


def write_part(out: Path, split: str, k: int, j: int, table) -> None:
    """Save one encoded batch (Arrow IPC), atomically: a part either exists whole or not at all."""
    import pyarrow as pa
    folder = _part_dir(out, split, k)
    folder.mkdir(parents=True, exist_ok=True)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    atomic_write_bytes(folder / f"{j:05d}.arrow", sink.getvalue().to_pybytes())


def _read_part(path: Path):
    import pyarrow as pa
    with pa.memory_map(str(path)) as source:
        return pa.ipc.open_file(source).read_all()


def complete_shard(out: Path, plan: EncodePlan, split: str, k: int) -> dict[str, Any]:
    """All parts of shard k exist: write the shard file (atomically), then
    its done record, then drop the parts. Returns the done record."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    out = Path(out)
    parts = [_read_part(_part_dir(out, split, k) / f"{j:05d}.arrow") for j, _, _ in plan.batches(split, k)]
    table = pa.concat_tables(parts).combine_chunks()
    sink = pa.BufferOutputStream()
    rg_rows = max(16, min(ROW_GROUP_ROWS, ROW_GROUP_BYTES // max(1, plan.row_bytes)))
    pq.write_table(table, sink, row_group_size=rg_rows, compression="ZSTD")
    data = sink.getvalue().to_pybytes()
    name = plan.shard_name(split, k)
    atomic_write_bytes(out / name, data)
    lo, hi = plan.splits[split][k]
    record = {"file": name, "rows": table.num_rows, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(),
              "source_rows": [lo, hi], "skipped": (hi - lo) - table.num_rows}
    done = _done_file(out, split, k)
    done.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(done, json.dumps(record, indent=2).encode())
    shutil.rmtree(_part_dir(out, split, k), ignore_errors=True)
    return record


def progress_counts(out: Path, plan: EncodePlan) -> dict[str, int]:
    """Shards and batches done so far, from the files in `out` (any worker count)."""
    shards = batches = 0
    for split, ranges in plan.splits.items():
        for k in range(len(ranges)):
            if shard_done(out, split, k):
                shards += 1
                batches += len(plan.batches(split, k))
            else:
                batches += sum(part_done(out, split, k, j) for j, _, _ in plan.batches(split, k))
    return {"shards_done": shards, "shards": sum(len(r) for r in plan.splits.values()),
            "batches_done": batches, "batches": plan.total_batches}


def finish_output(out: Path, plan: EncodePlan, source: Manifest, *, name: str | None = None,
                  note: str = "") -> Manifest:
    """Every shard is done: write the manifest (atomically, last) and remove
    the progress folder. Splits keep their shards in source order; a
    shard's first_index is its first row's position in the split."""
    out = Path(out)
    splits = {}
    for split in source.splits:
        shards, rows, skipped = [], 0, 0
        for k in range(len(plan.splits.get(split, []))):
            rec = shard_done(out, split, k)
            if rec is None:
                raise DataError(f"{out}: shard {plan.shard_name(split, k)} is not encoded yet")
            shards.append(ShardInfo(file=rec["file"], rows=rec["rows"], bytes=rec["bytes"], sha256=rec["sha256"],
                                    first_index=rows))
            rows += rec["rows"]
            skipped += rec["skipped"]
        splits[split] = SplitInfo(rows=rows, shards=shards, skipped=skipped)
    info = LatentInfo(shape=list(plan.shape), dtype=plan.dtype, encoder=dict(plan.encoder), source=dict(plan.source))
    manifest = Manifest(name=name or f"{source.name}-latents", height=plan.image["height"],
                        width=plan.image["width"], channels=plan.image["channels"], splits=splits,
                        num_classes=source.num_classes, class_names=list(source.class_names),
                        has_captions=source.has_captions, extra_columns=dict(source.extra_columns),
                        source=note or f"{source.name} encoded by {plan.encoder.get('family')}",
                        prepare={"encode": plan.key()}, schema_version=SCHEMA_VERSION, kind="latents", latents=info)
    for stray in out.glob(f"{TMP_PREFIX}*"):  # temp files of a write that was killed: never part of the dataset
        stray.unlink(missing_ok=True)
    write_manifest(manifest, out)
    shutil.rmtree(state_dir(out), ignore_errors=True)
    return read_manifest(out)


# ---------------------------------------------------------------- encoding a share
@dataclass
class ShareResult:
    batches: int = 0          # batches encoded by this call
    shards: int = 0           # shard files this call completed
    stopped: bool = False     # stopped early (stop_after)


def pending_batches(out: Path, plan: EncodePlan, split: str, rank: int,
                    world_size: int) -> list[tuple[int, int, int, int]]:
    """(k, j, lo, hi) of the batches rank `rank` of `world_size` still has to
    encode: shards are dealt round-robin (shard k to rank k % world_size)."""
    todo = []
    for k in range(rank, len(plan.splits.get(split, [])), world_size):
        if shard_done(out, split, k):
            continue
        todo += [(k, j, lo, hi) for j, lo, hi in plan.batches(split, k) if not part_done(out, split, k, j)]
    return todo


def merged_ranges(tasks) -> list[tuple[int, int]]:
    """Source-row ranges covering the tasks, adjacent ones merged."""
    out: list[list[int]] = []
    for _, _, lo, hi in tasks:
        if out and out[-1][1] == lo:
            out[-1][1] = hi
        else:
            out.append([lo, hi])
    return [(a, b) for a, b in out]


def encode_share(encode, plan: EncodePlan, out: Path, split: str, *, rank: int, world_size: int, read_rows,
                 extra_columns: dict[str, ExtraColumn], stop_after: int | None = None, done_before: int = 0,
                 on_batch=None) -> ShareResult:
    """Encode what rank `rank` still owes of `split` and save it.

    `encode(images uint8 [B, C, H, W]) -> latents [B, *shape]` (numpy);
    `read_rows(ranges)` yields decoded column dicts (decode_table's) of the
    source rows in those [lo, hi) ranges, in order, chunked any way.
    Undecodable rows are left out (and counted per shard). Stops after
    `stop_after` batches in all (`done_before` of them by earlier calls)."""
    from raygen.data.decode import MESSAGE, STATUS
    from raygen.data.images import CORRUPT, REJECTED_SIZE

    out = Path(out)
    result = ShareResult()
    # a shard whose parts are all there (an encode stopped just before assembling it): assemble it now
    for k in range(rank, len(plan.splits.get(split, [])), world_size):
        if not shard_done(out, split, k) and all(part_done(out, split, k, j) for j, _, _ in plan.batches(split, k)):
            complete_shard(out, plan, split, k)
            result.shards += 1
    tasks = pending_batches(out, plan, split, rank, world_size)
    if not tasks or (stop_after is not None and done_before >= stop_after):
        result.stopped = bool(tasks)
        return result
    buffer: list[dict[str, np.ndarray]] = []
    stream = read_rows(merged_ranges(tasks))
    t = 0
    last_task_of_shard = {task[0]: i for i, task in enumerate(tasks)}  # this call's last batch of each shard

    def flush_ready(final: bool) -> Iterator[tuple[tuple[int, int, int, int], dict[str, np.ndarray]]]:
        nonlocal buffer, t
        while t < len(tasks):
            k, j, lo, hi = tasks[t]
            cols = {key: np.concatenate([b[key] for b in buffer]) for key in buffer[0]} if buffer else None
            top = int(cols["index"].max()) if cols is not None and len(cols["index"]) else -1
            if top < hi - 1 and not final:
                return  # the batch's last rows have not arrived yet (unless they were bad)
            idx = cols["index"] if cols is not None else np.zeros(0, np.int64)
            sel = (idx >= lo) & (idx < hi)
            batch = {key: v[sel] for key, v in cols.items()} if cols is not None else None
            buffer = [{key: v[idx >= hi] for key, v in cols.items()}] if cols is not None else []
            t += 1
            yield tasks[t - 1], batch

    def handle(task, batch) -> None:
        k, j, lo, hi = task
        got = batch["index"] if batch is not None else np.zeros(0, np.int64)
        if len(got) != hi - lo or not np.array_equal(got, np.arange(lo, hi)):
            # the decoder flags bad rows but never drops them: every source row must be here, in order
            raise DataError(f"{split} rows [{lo}, {hi}) for {plan.shard_name(split, k)} batch {j}: the source "
                            f"stream gave {len(got)} row(s) with other indices; the source dataset changed "
                            "or is damaged (check it with `raygen data show --verify`)")
        status = batch.pop(STATUS, None)
        batch.pop(MESSAGE, None)
        if status is not None:  # undecodable images are left out (the shard's record counts them)
            good = (status != CORRUPT) & (status != REJECTED_SIZE)
            batch = {key: v[good] for key, v in batch.items()}
        n = len(batch["index"])
        latents = encode(batch["image"]) if n else np.zeros((0, *plan.shape), np.float32)
        if tuple(latents.shape[1:]) != tuple(plan.shape):
            raise DataError(f"the encoder gave latents of shape {list(latents.shape[1:])}, "
                            f"the plan expects {list(plan.shape)}")
        write_part(out, split, k, j, batch_table(batch, latents, plan.dtype, extra_columns))
        result.batches += 1
        if last_task_of_shard[k] == t - 1 and all(part_done(out, split, k, jj) for jj, _, _ in plan.batches(split, k)):
            complete_shard(out, plan, split, k)
            result.shards += 1
        if on_batch is not None:
            on_batch(result, len(tasks), n)

    for chunk in stream:
        buffer.append({key: v for key, v in dict(chunk).items()})
        for task, batch in flush_ready(final=False):
            handle(task, batch)
            if stop_after is not None and done_before + result.batches >= stop_after:
                result.stopped = t < len(tasks)
                _close(stream)
                return result
    for task, batch in flush_ready(final=True):
        handle(task, batch)
        if stop_after is not None and done_before + result.batches >= stop_after and t < len(tasks):
            result.stopped = True
            break
    return result


def _close(stream) -> None:
    close = getattr(stream, "close", None)
    if close is not None:
        close()
