"""Prepare a dataset (generate or import, then write shards + manifest),
and `ensure_dataset`, which prepares a job's data once and reuses it."""
from __future__ import annotations

import glob as globlib
import hashlib
import json
import logging
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from raygen import storage
from raygen.data.errors import DataError
from raygen.data.images import as_size, decode_image, encode_png, fit_image, mode_for, size_text, spec_size, to_pil
from raygen.data.manifest import MANIFEST_NAME, SCHEMA_VERSION, SOURCE_NAME, Manifest, read_manifest
from raygen.data.registry import PrepareRequest, get_builder, is_builtin
from raygen.data.shards import DEFAULT_SHARD_BYTES, TMP_PREFIX, Record, ShardWriter, clear_dataset_dir, write_manifest
from raygen.locks import file_lock

log = logging.getLogger("raygen.data")


def progress_enabled() -> bool:
    return os.environ.get("RAYGEN_NO_PROGRESS", "") not in ("1", "true", "yes")


def _progress(iterable, total: int, desc: str):
    if not progress_enabled():
        return iterable
    from tqdm import tqdm
    # disable=None: a bar on a terminal only; piped output gets no carriage-return frames
    return tqdm(iterable, total=total, desc=desc, unit="img", leave=False, dynamic_ncols=True, disable=None)


def detect_import(path: str) -> str | None:
    """Which import builder reads `path` (a folder, a file or a glob), or None."""
    p = Path(path).expanduser()
    if p.is_dir():
        if (p / MANIFEST_NAME).is_file() or any(p.glob("*.parquet")):
            return "parquet"
        if any(p.glob("*.tar")):
            return "webdataset"
        return "folder"
    matches = [Path(m) for m in globlib.glob(str(p), recursive=True)] if not p.exists() else [p]
    suffixes = {m.suffix for m in matches if m.is_file()}
    if suffixes == {".parquet"}:
        return "parquet"
    if suffixes == {".tar"}:
        return "webdataset"
    return None


def _check_request(req: PrepareRequest) -> None:
    if req.resolution is not None:
        res = req.resolution
        pair = isinstance(res, (list, tuple))
        sides = list(res) if pair else [res]
        if (pair and len(sides) != 2) or any(isinstance(v, bool) or not isinstance(v, (int, np.integer))
                                             for v in sides):
            raise DataError(f"resolution: {res!r} must be one whole number (a square) or [height, width]")
        if not all(4 <= v <= 1024 for v in sides):
            raise DataError(f"resolution: {res} must be between 4 and 1024 on each side")
        req.resolution = spec_size(sides[0] if not pair else sides)
    if req.channels is not None and req.channels not in (1, 3):
        raise DataError(f"channels: {req.channels} must be 1 or 3")
    if req.count is not None and req.count < 1:
        raise DataError(f"count: {req.count} must be at least 1")
    if not 0.0 < req.val_fraction < 1.0:
        raise DataError(f"val_fraction: {req.val_fraction} must be strictly between 0 and 1")


class _Undecodable(Exception):
    pass


def _png_for(rec: Record, size: tuple[int, int], channels: int) -> bytes:
    """The record's image as PNG bytes at the dataset's (height, width) and
    mode. Raises _Undecodable only for source bytes that cannot be decoded;
    any other failure is a bug and propagates."""
    image = rec.image
    if isinstance(image, (bytes, bytearray, memoryview)) or image is None:
        try:
            if image is None:
                raise ValueError("no image bytes")
            data = bytes(image)
            img = decode_image(data)
        except Exception as err:  # PIL raises many types for bad bytes
            raise _Undecodable(f"{type(err).__name__}: {err}") from None
        if img.format == "PNG" and img.size[::-1] == size and img.mode == mode_for(channels):
            return data  # already right: keep the original bytes
        return encode_png(fit_image(img, size, channels))
    if isinstance(image, Image.Image):
        return encode_png(fit_image(image, size, channels))
    arr = np.asarray(image)
    if arr.shape[:2] == size and (arr.ndim == 2 and channels == 1 or arr.ndim == 3 and arr.shape[2] == channels):
        return encode_png(arr)
    return encode_png(fit_image(to_pil(arr), size, channels))


def prepare_dataset(name_or_path: str, out: str | Path, *, resolution: int | list[int] | None = None,
                    channels: int | None = None, count: int | None = None, seed: int = 0,
                    val_fraction: float = 0.1, source: str | None = None,
                    shard_bytes: int = DEFAULT_SHARD_BYTES, **options: Any) -> Manifest:
    """Generate or import a dataset and write it to `out` as shards plus a
    manifest (written last). `name_or_path` is a built-in name
    (`raygen data list`) or a path/glob to import; `resolution` is one int
    (a square) or [height, width] (non-square: each image is centre-cropped
    to that aspect ratio, then resized); builder-specific `options` (e.g.
    max_spheres=3) are checked by the builder. An `s3://` `out` is written
    locally first, then uploaded (see `_prepare_to_uri`)."""
    if storage.is_uri(str(out)):
        return _prepare_to_uri(name_or_path, str(out), resolution=resolution, channels=channels, count=count,
                               seed=seed, val_fraction=val_fraction, source=source, shard_bytes=shard_bytes,
                               **options)
    if is_builtin(name_or_path):
        name = name_or_path
    else:
        name = detect_import(name_or_path)
        if name is None:
            raise DataError(f"'{name_or_path}' is neither a built-in dataset nor an image folder, parquet or .tar "
                            "path; run `raygen data list` for the built-in names")
        if source is not None:
            raise DataError(f"give either a path ({name_or_path}) or --source, not both")
        source = name_or_path
    builder = get_builder(name)
    if source is not None and not builder.takes_source:
        raise DataError(f"dataset '{name}' is generated and takes no source; drop --source/data.source")
    req = PrepareRequest(resolution=resolution, channels=channels, count=count, seed=seed,
                         val_fraction=val_fraction, source=str(source) if source is not None else None)
    _check_request(req)
    opts = builder.parse_options(options)
    req.resolution = req.resolution or builder.default_resolution
    req.channels = req.channels or builder.default_channels
    req.count = req.count or builder.default_count
    plan = builder.plan(req, opts)
    size = as_size(plan.resolution)

    out = Path(out).expanduser()
    if req.source and Path(req.source).expanduser().exists():
        src = Path(req.source).expanduser().resolve()
        if src == out.resolve() or out.resolve() in src.parents:
            raise DataError(f"--out {out} is the source being imported; write the dataset to another folder")
    clear_dataset_dir(out)
    splits, skipped_total = {}, 0
    for split in ("train", "val"):
        writer = ShardWriter(out, split, plan.extra_columns, max_bytes=shard_bytes,
                             decoded_row_bytes=size[0] * size[1] * plan.channels)
        skipped = 0
        for rec in _progress(plan.records(split), plan.splits[split], f"{name} {split}"):
            try:
                png = _png_for(rec, size, plan.channels)
            except _Undecodable as err:  # a damaged source image: skip it, say so
                skipped += 1
                if skipped <= 20:
                    log.warning("skipped undecodable image %s: %s", rec.origin or "?", err)
                continue
            writer.add(png, rec.label, rec.caption, rec.extras)
        splits[split] = writer.close(skipped=skipped)
        skipped_total += skipped
    if splits["train"].rows == 0:
        raise DataError(f"{name}: no usable training images (skipped {skipped_total} undecodable); check the source")
    prepare_info = {"dataset": name, "resolution": spec_size(size), "channels": plan.channels, "count": req.count,
                    "seed": seed, "val_fraction": val_fraction, "source": req.source,
                    "options": {k: v for k, v in vars(opts).items()}, "builder_version": builder.version}
    manifest = Manifest(name=name, height=size[0], width=size[1], channels=plan.channels, splits=splits,
                        num_classes=len(plan.class_names), class_names=plan.class_names,
                        has_captions=plan.has_captions, extra_columns=plan.extra_columns,
                        source=plan.source, prepare=prepare_info, schema_version=SCHEMA_VERSION)
    write_manifest(manifest, out)
    if skipped_total:
        log.warning("%s: skipped %d undecodable source image(s)", name, skipped_total)
    return read_manifest(out)


def _prepare_to_uri(name_or_path: str, uri: str, **kwargs: Any) -> Manifest:
    """Prepare into a temporary local folder, then upload: the old manifest
    goes first and the new one last, so a reader never sees a manifest
    whose shards are not all there."""
    import tempfile
    storage.check(uri)
    manifest_uri = storage.join(uri, MANIFEST_NAME)
    with tempfile.TemporaryDirectory(prefix="raygen-prepare-") as tmp:
        manifest = prepare_dataset(name_or_path, Path(tmp) / "dataset", **kwargs)
        if storage.exists(manifest_uri):
            fs, path = storage.filesystem(manifest_uri)
            fs.delete_file(path)
        storage.upload_dir(Path(tmp) / "dataset", uri, last=(MANIFEST_NAME,))
    manifest.path = None  # the local copy is gone; the dataset lives at `uri`
    return manifest


def mirror_dataset(uri: str, root: str | Path) -> Path:
    """A local copy of the prepared dataset at `uri` (s3://), under
    `root/s3-<hash of uri>`: the manifest and the shards it lists, checked
    against their sha256. Shards already there with the right digest are
    kept, so a second call only re-reads the manifest; the local manifest
    is written last, like a prepare's."""
    from raygen.data.manifest import sha256_file
    from raygen.data.shards import atomic_write_bytes
    try:
        raw = storage.read_bytes(storage.join(uri, MANIFEST_NAME))
    except FileNotFoundError:
        raise DataError(f"data.dataset: {uri} has no {MANIFEST_NAME} (not a prepared dataset); "
                        f"run `raygen data prepare NAME --out {uri}`") from None
    try:
        manifest = Manifest.from_dict(json.loads(raw))
    except (ValueError, KeyError, TypeError) as err:
        raise DataError(f"{storage.join(uri, MANIFEST_NAME)}: unreadable manifest ({type(err).__name__}: {err}); "
                        "prepare the dataset again") from None
    target = Path(root).expanduser() / f"s3-{_key(uri)}"
    target.mkdir(parents=True, exist_ok=True)
    with file_lock(Path(root).expanduser() / f".{target.name}.lock"):
        local_manifest = target / MANIFEST_NAME
        if local_manifest.is_file() and local_manifest.read_bytes() == raw:
            return target
        if local_manifest.exists():
            local_manifest.unlink()  # the copy stops looking complete while it is refreshed
        for info in manifest.splits.values():
            for shard in info.shards:
                local = target / shard.file
                if local.is_file() and local.stat().st_size == shard.bytes and sha256_file(local) == shard.sha256:
                    continue
                try:
                    data = storage.read_bytes(storage.join(uri, shard.file))
                except FileNotFoundError:
                    raise DataError(f"{storage.join(uri, shard.file)}: shard listed in {MANIFEST_NAME} is missing; "
                                    "prepare the dataset again") from None
                if hashlib.sha256(data).hexdigest() != shard.sha256:
                    raise DataError(f"{storage.join(uri, shard.file)}: checksum does not match {MANIFEST_NAME}; "
                                    "prepare the dataset again")
                atomic_write_bytes(local, data)
        (target / SOURCE_NAME).write_text(uri + "\n")  # where the shards live, for read tasks on other nodes
        atomic_write_bytes(local_manifest, raw)
    return target


# ---------------------------------------------------------------- ensure_dataset
def _key(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:10]


def _import_fingerprint(path: str) -> list:
    """Paths, sizes and mtimes of an import source, so edits re-import."""
    p = Path(path).expanduser()
    files = [f for f in p.rglob("*") if f.is_file()] if p.is_dir() else \
        [Path(m) for m in globlib.glob(str(p), recursive=True)] if not p.exists() else [p]
    return sorted((str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files)


def _usable(target: Path) -> bool:
    try:
        read_manifest(target)
        return True
    except DataError:
        return False


def ensure_dataset(data_spec) -> Path:
    """The prepared folder for `data_spec.dataset`, preparing it first if needed.

    A built-in name is prepared once under `data_spec.root/<name>-<hash of the
    prepare options>` and reused after; a prepared folder (with manifest.json)
    is used as is; an image folder or parquet/.tar path or glob is imported
    under `data_spec.root`. Raises DataError when nothing usable is there.
    """
    ds = data_spec.dataset
    root = Path(data_spec.root).expanduser()
    if storage.is_uri(ds):  # a dataset prepared to object storage: a checked local copy
        storage.check(ds)
        return mirror_dataset(ds, root)
    source = str(Path(data_spec.source).expanduser().resolve()) if data_spec.source else None
    if is_builtin(ds) and not Path(ds).exists():
        builder = get_builder(ds)
        opts = {"dataset": ds, "resolution": data_spec.resolution, "channels": data_spec.channels,
                "count": data_spec.count, "seed": data_spec.seed, "val_fraction": data_spec.val_fraction,
                "source": source, "builder_version": builder.version, "schema": SCHEMA_VERSION}
        if source and ds in ("folder", "parquet", "webdataset"):
            opts["source_files"] = _import_fingerprint(source)  # edits to the source re-import
        target = root / f"{ds}-{_key(opts)}"
        prepare_args = dict(name_or_path=ds, source=source)
    else:
        p = Path(ds).expanduser()
        if p.is_dir() and (p / MANIFEST_NAME).is_file():
            read_manifest(p)
            return p.resolve()
        kind = detect_import(ds)
        if kind is None:
            raise DataError(f"data.dataset: '{ds}' is neither a built-in dataset ({', '.join(_names())}) "
                            "nor an existing prepared folder, image folder, or parquet/.tar path or glob")
        if kind == "parquet" and p.is_dir() and not any(p.glob("*.parquet")):
            raise DataError(f"data.dataset: {p} has a manifest but no shards; prepare it again")
        fingerprint = _import_fingerprint(ds)
        if not fingerprint:
            raise DataError(f"data.dataset: {ds} matches no files (an empty folder or a glob that matches nothing); "
                            "give a prepared dataset, an image folder, or parquet/.tar files")
        opts = {"import": kind, "files": fingerprint, "resolution": data_spec.resolution,
                "channels": data_spec.channels, "count": data_spec.count, "seed": data_spec.seed,
                "val_fraction": data_spec.val_fraction, "schema": SCHEMA_VERSION}
        named = Path(ds.rstrip("/"))
        named = named.parent if any(c in named.name for c in "*?[") else named  # a glob: name it by its folder
        stem = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in named.stem)[:40]
        target = root / f"import-{stem}-{_key(opts)}"
        prepare_args = dict(name_or_path=str(p.resolve()) if p.exists() else ds, source=None)
    if _usable(target):
        return target
    with file_lock(root / f".{target.name}.lock"):
        if _usable(target):  # another process prepared it while we waited
            return target
        print(f"raygen data: preparing {ds} ({size_text(data_spec.resolution)} px, {data_spec.channels} channel(s), "
              f"seed {data_spec.seed}) into {target}", file=sys.stderr, flush=True)
        # Build in a private temp folder and rename it into place: the
        # target either does not exist or is complete.
        tmp = root / f"{TMP_PREFIX}{target.name}-{os.getpid()}"
        if tmp.exists():
            shutil.rmtree(tmp)
        try:
            prepare_dataset(out=tmp, resolution=data_spec.resolution, channels=data_spec.channels,
                            count=data_spec.count, seed=data_spec.seed, val_fraction=data_spec.val_fraction,
                            **prepare_args)
            if target.exists():
                shutil.rmtree(target)  # an old, incomplete attempt (no manifest)
            os.replace(tmp, target)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return target


def _names() -> list[str]:
    from raygen.data.registry import builder_names
    return builder_names()
