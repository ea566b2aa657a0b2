"""Import parquet shards from elsewhere (ours, Hugging Face style, or any
table with an image-bytes column) into our shard format.

The shards are streamed, never held: a first pass reads only the label
column (and the lengths of sequence columns), a second reads the rows in
batches of about `BATCH_BYTES` and hands them to `PoolReorder`. Memory is
bounded by the source's largest row group, not by its size."""
from __future__ import annotations

import json
from itertools import islice
from pathlib import Path

from raygen.data.errors import DataError
from raygen.data.manifest import CORE_COLUMNS, MANIFEST_NAME, ExtraColumn
from raygen.data.registry import DatasetBuilder, PrepareRequest, SourcePlan, register
from raygen.data.shards import Record
from raygen.data.sources._common import LabelCoder, expand_paths, guess_geometry
from raygen.data.sources._reorder import PoolReorder

IMAGE_COLUMNS = ("png", "image", "img", "jpg", "jpeg", "webp", "image_bytes")
LABEL_COLUMNS = ("label", "labels", "class", "target", "cls")
CAPTION_COLUMNS = ("caption", "text", "prompt", "txt", "sentence")
#: rows read at once: about this many bytes of the image column
BATCH_BYTES = 16 * 2**20


def _pick(names: list[str], candidates: tuple[str, ...]) -> str | None:
    return next((c for c in candidates if c in names), None)


def _extra_spec(field) -> ExtraColumn | None:
    """An ExtraColumn for a column we can carry, else None (a sequence's
    max_len is filled in by the first pass over the rows)."""
    import pyarrow as pa
    t = field.type
    if pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t):
        return ExtraColumn(kind="scalar")
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return ExtraColumn(kind="string")
    if pa.types.is_fixed_size_list(t) and (pa.types.is_floating(t.value_type) or pa.types.is_integer(t.value_type)):
        return ExtraColumn(kind="vector", width=t.list_size)
    if (pa.types.is_list(t) or pa.types.is_large_list(t)) and pa.types.is_fixed_size_list(t.value_type):
        return ExtraColumn(kind="sequence", width=t.value_type.list_size, max_len=0)
    return None


def _open(path: Path):
    import pyarrow.parquet as pq
    # no pre-buffering: read a row group's pages as they are decoded, not the whole group at once
    return pq.ParquetFile(path, pre_buffer=False, buffer_size=2**20)


def _batches(files: list[Path], columns: list[str], batch_rows: int = 65536):
    """Record batches of `columns` over all files, in order, a row group at a time."""
    for f in files:
        yield from _open(f).iter_batches(batch_size=batch_rows, columns=columns, use_threads=False)


def _column_bytes(files: list[Path], column: str) -> int:
    """Uncompressed bytes of `column` (all its leaves) in the files' metadata."""
    total = 0
    for f in files:
        md = _open(f).metadata
        for r in range(md.num_row_groups):
            rg = md.row_group(r)
            for c in range(rg.num_columns):
                if rg.column(c).path_in_schema.split(".")[0] == column:
                    total += rg.column(c).total_uncompressed_size
    return total


def _image_bytes(value, base: Path) -> bytes | None:
    """Binary, or a {bytes, path} struct (Hugging Face `Image` feature)."""
    if value is None or isinstance(value, bytes):
        return value
    if isinstance(value, dict):
        if value.get("bytes"):
            return value["bytes"]
        if value.get("path"):
            p = Path(value["path"])
            p = p if p.is_absolute() else base / p
            return p.read_bytes() if p.is_file() else None
    return None


def _check_same_columns(files: list[Path]) -> None:
    """Shards of one import must share their columns: a column missing from
    some would be filled with nulls and read as records it does not hold."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    first = None
    for f in files:
        try:
            names = pq.read_schema(f).names
        except (pa.ArrowException, OSError) as err:
            raise DataError(f"parquet import: cannot read {f}: {err}") from None
        if first is None:
            first = (f, names)
            continue
        only_first = [n for n in first[1] if n not in names]
        only_this = [n for n in names if n not in first[1]]
        if only_first or only_this:
            diff = "; ".join(part for part in (
                f"only {first[0]} has {', '.join(only_first)}" if only_first else "",
                f"only {f} has {', '.join(only_this)}" if only_this else "") if part)
            raise DataError(f"parquet import: {first[0]} and {f} have different columns ({diff}); "
                            "import shards with the same columns together, or each set on its own")


@register
class ParquetImport(DatasetBuilder):
    name = "parquet"
    summary = "import parquet shards (a file, folder or glob) with an image-bytes column"
    takes_source = True

    def plan(self, req: PrepareRequest, opts) -> SourcePlan:
        import pyarrow as pa
        import pyarrow.compute as pc
        import pyarrow.parquet as pq

        files = expand_paths(req.source, ".parquet", "parquet")
        _check_same_columns(files)
        try:
            # the schema concat_tables(promote_options="default") would give the files read together
            schema = pa.unify_schemas([pq.read_schema(f) for f in files], promote_options="default")
            pool = sum(_open(f).metadata.num_rows for f in files)
        except (pa.ArrowException, OSError) as err:
            raise DataError(f"parquet import: cannot read {req.source}: {err}") from None
        names = schema.names
        image_col = _pick(names, IMAGE_COLUMNS)
        if image_col is None:
            raise DataError(f"parquet import: no image column in {files[0]} (columns: {', '.join(names)}); "
                            f"expected one of: {', '.join(IMAGE_COLUMNS)}")
        label_col, caption_col = _pick(names, LABEL_COLUMNS), _pick(names, CAPTION_COLUMNS)
        # Our own shards carry a manifest beside them: keep its class names and column docs.
        theirs = files[0].parent / MANIFEST_NAME
        meta = json.loads(theirs.read_text()) if theirs.is_file() else {}
        extras: dict[str, ExtraColumn] = {}
        for name in names:
            if name in (image_col, label_col, caption_col) or name in CORE_COLUMNS:
                continue
            spec = _extra_spec(schema.field(name))
            if spec is None:
                continue
            extras[name] = spec
        # pass 1: labels and sequence lengths only
        coder = LabelCoder()
        sequences = [n for n, e in extras.items() if e.kind == "sequence"]
        for batch in _batches(files, ([label_col] if label_col else []) + sequences) if label_col or sequences else ():
            if label_col:
                for v in batch.column(label_col).to_pylist():
                    coder.see(v)
            for n in sequences:
                lengths = batch.column(n).value_lengths()
                longest = pc.max(lengths).as_py() if len(lengths) else None
                extras[n].max_len = max(extras[n].max_len, int(longest or 0))
        for name, spec in extras.items():
            known = meta.get("extra_columns", {}).get(name)
            if known and known.get("kind") == spec.kind:
                extras[name] = ExtraColumn(**{**known, "max_len": max(spec.max_len, known.get("max_len", 0))})
        class_names = coder.finish(meta.get("class_names"))
        base = files[0].parent
        head = (v for batch in _batches(files, [image_col], 64) for v in batch.column(image_col).to_pylist())
        first = next((b for b in (_image_bytes(v, base) for v in islice(head, 64)) if b), None)
        if first is None:
            raise DataError(f"parquet import: column '{image_col}' of {files[0]} holds no image bytes")
        res, ch = guess_geometry(first, str(files[0]), req.resolution, req.channels)
        record_bytes = _column_bytes(files, image_col) / max(pool, 1)
        columns = [image_col] + [c for c in (label_col, caption_col) if c] + list(extras)

        def stream(wanted):  # pass 2: every row in order; None for those no split keeps
            i = 0
            for batch in _batches(files, columns, max(1, min(65536, int(BATCH_BYTES // max(record_bytes, 1))))):
                cols = {n: batch.column(n).to_pylist() for n in columns}
                for j in range(batch.num_rows):
                    if not wanted(i):
                        yield None
                    else:
                        yield Record(image=_image_bytes(cols[image_col][j], base),
                                     label=coder.code(cols[label_col][j]) if label_col else -1,
                                     caption=(cols[caption_col][j] if caption_col else "") or "",
                                     extras={n: cols[n][j] for n in extras}, origin=f"{req.source} row {i}")
                    i += 1
                del cols

        order = PoolReorder(pool, count=req.count, val_fraction=req.val_fraction, seed=req.seed,
                            record_bytes=record_bytes, stream=stream, what=f"parquet import of {req.source}")
        return SourcePlan(resolution=res, channels=ch, splits=order.splits, records=order.records,
                          class_names=class_names, has_captions=caption_col is not None, extra_columns=extras,
                          source=f"parquet import of {req.source} ({len(files)} file(s))")
