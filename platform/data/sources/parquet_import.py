"""Import parquet shards from elsewhere (ours, Hugging Face style, or any
table with an image-bytes column) into our shard format."""
from __future__ import annotations

import json
from pathlib import Path

from raygen.data.errors import DataError
from raygen.data.manifest import CORE_COLUMNS, MANIFEST_NAME, ExtraColumn
from raygen.data.registry import DatasetBuilder, PrepareRequest, SourcePlan, pool_split, register
from raygen.data.shards import Record
from raygen.data.sources._common import encode_labels, expand_paths, guess_geometry

IMAGE_COLUMNS = ("png", "image", "img", "jpg", "jpeg", "webp", "image_bytes")
LABEL_COLUMNS = ("label", "labels", "class", "target", "cls")
CAPTION_COLUMNS = ("caption", "text", "prompt", "txt", "sentence")


def _pick(names: list[str], candidates: tuple[str, ...]) -> str | None:
    return next((c for c in candidates if c in names), None)


def _extra_spec(field, column) -> ExtraColumn | None:
    """An ExtraColumn for a column we can carry, else None."""
    import pyarrow as pa
    t = field.type
    if pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t):
        return ExtraColumn(kind="scalar")
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return ExtraColumn(kind="string")
    if pa.types.is_fixed_size_list(t) and (pa.types.is_floating(t.value_type) or pa.types.is_integer(t.value_type)):
        return ExtraColumn(kind="vector", width=t.list_size)
    if (pa.types.is_list(t) or pa.types.is_large_list(t)) and pa.types.is_fixed_size_list(t.value_type):
        lengths = column.combine_chunks().value_lengths() if column.num_chunks else None
        max_len = int(max(lengths.to_pylist() or [0])) if lengths is not None else 0
        return ExtraColumn(kind="sequence", width=t.value_type.list_size, max_len=max_len)
    return None


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
        import pyarrow.parquet as pq

        files = expand_paths(req.source, ".parquet", "parquet")
        _check_same_columns(files)
        try:
            table = pa.concat_tables([pq.read_table(f) for f in files], promote_options="default")
        except (pa.ArrowException, OSError) as err:
            raise DataError(f"parquet import: cannot read {req.source}: {err}") from None
        names = table.column_names
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
            spec = _extra_spec(table.schema.field(name), table.column(name))
            if spec is None:
                continue
            known = meta.get("extra_columns", {}).get(name)
            if known and known.get("kind") == spec.kind:
                spec = ExtraColumn(**{**known, "max_len": max(spec.max_len, known.get("max_len", 0))})
            extras[name] = spec
        labels, class_names = encode_labels(table.column(label_col).to_pylist() if label_col else [None] * len(table),
                                            meta.get("class_names"))
        captions = table.column(caption_col).to_pylist() if caption_col else [""] * len(table)
        images = table.column(image_col)
        base = files[0].parent
        first = next((b for b in (_image_bytes(v, base) for v in images.slice(0, 64).to_pylist()) if b), None)
        if first is None:
            raise DataError(f"parquet import: column '{image_col}' of {files[0]} holds no image bytes")
        res, ch = guess_geometry(first, str(files[0]), req.resolution, req.channels)
        idx = pool_split(len(table), count=req.count, val_fraction=req.val_fraction, seed=req.seed)

        def records(split: str):
            for i in idx[split]:
                i = int(i)
                extra = {n: table.column(n)[i].as_py() for n in extras}
                yield Record(image=_image_bytes(images[i].as_py(), base), label=labels[i],
                             caption=captions[i] or "", extras=extra, origin=f"{req.source} row {i}")

        return SourcePlan(resolution=res, channels=ch, splits={k: len(v) for k, v in idx.items()}, records=records,
                          class_names=class_names, has_captions=caption_col is not None, extra_columns=extras,
                          source=f"parquet import of {req.source} ({len(files)} file(s))")
