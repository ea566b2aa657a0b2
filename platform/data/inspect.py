"""`raygen data show`: a prepared dataset's summary and a grid of samples."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np

from raygen.data.images import size_text
from raygen.data.manifest import read_manifest


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def summarize(dir: str | Path, *, examples: int = 6, verify: bool = False) -> list[str]:
    """Lines describing the dataset at `dir`."""
    import pyarrow.parquet as pq
    m = read_manifest(dir, verify=verify)
    lines = [f"dataset: {m.name}  ({m.source})", f"folder: {m.path}  (schema v{m.schema_version})",
             f"images: {size_text(m.size)}, {m.channels} channel(s)"]
    if m.kind == "latents":  # raygen.data.latents
        enc, src = m.latents.encoder, m.latents.source
        lines[-1] = (f"latents: {'x'.join(map(str, m.latents.shape))} {m.latents.dtype} per image "
                     f"(of {size_text(m.size)}x{m.channels}), encoded by {enc.get('family')} {enc.get('uri')} "
                     f"(digest {str(enc.get('digest'))[:12]}) from {src.get('name')} {src.get('path')} "
                     f"(digest {str(src.get('digest'))[:12]})")
    parts = []
    for split, info in m.splits.items():
        size = sum(s.bytes for s in info.shards)
        skipped = f", {info.skipped} skipped at prepare" if info.skipped else ""
        parts.append(f"{split} {info.rows} ({len(info.shards)} shard(s), {_mib(size)}{skipped})")
    lines.append("splits: " + "; ".join(parts))
    if verify:
        lines.append("checksums: ok")
    first = m.shard_paths("train")[0]
    head = pq.ParquetFile(first).read_row_group(0, columns=["label", "caption"])
    labels = [lab for p in m.shard_paths("train")
              for lab in pq.read_table(p, columns=["label"]).column("label").to_pylist()]
    if m.num_classes:
        counts = Counter(labels)
        shown = ", ".join(f"{name} ({counts.get(i, 0)})" for i, name in enumerate(m.class_names[:20]))
        more = f", ... {m.num_classes - 20} more" if m.num_classes > 20 else ""
        unlabelled = f"; {counts[-1]} unlabelled" if counts.get(-1) else ""
        lines.append(f"classes: {m.num_classes}: {shown}{more}{unlabelled}")
    else:
        lines.append("classes: none (label -1)")
    lines.append(f"captions: {'yes' if m.has_captions else 'no'}")
    rows = list(zip(head.column("label").to_pylist(), head.column("caption").to_pylist()))[:examples]
    if m.num_classes or m.has_captions:
        lines.append("examples (train):")
    else:
        rows = []
    for lab, cap in rows:
        name = m.class_names[lab] if 0 <= lab < len(m.class_names) else "-"
        lines.append(f"  label {lab:>3} {name:<14} caption: {cap!r}" if m.has_captions else f"  label {lab:>3} {name}")
    for name, col in m.extra_columns.items():
        fields = f" [{', '.join(col.fields)}]" if col.fields else ""
        shape = {"sequence": f"sequence of up to {col.max_len} rows x {col.width}", "vector": f"vector of {col.width}",
                 "scalar": "scalar", "string": "string"}[col.kind]
        lines.append(f"extra column {name}: {shape}{fields}" + (f" - {col.description}" if col.description else ""))
    p = m.prepare
    if p and m.kind == "images":
        lines.append(f"prepared with: seed {p.get('seed')}, count {p.get('count')}, "
                     f"val_fraction {p.get('val_fraction')}"
                     + (f", options {p['options']}" if p.get("options") else ""))
    return lines


def write_grid(dir: str | Path, out: str | Path, *, n: int = 64, split: str = "train") -> int:
    """Write a PNG grid of the split's first `n` images; returns how many."""
    from raygen.data.local import iter_decoded
    from raygen.data.shards import atomic_write_bytes
    from raygen.images import grid, png_bytes
    if read_manifest(dir).kind == "latents":
        from raygen.data.errors import DataError
        raise DataError(f"{dir} is a latent dataset: it holds no images to show; show its source dataset "
                        "(see `raygen data show` of it without --grid)")
    images = []
    for cols in iter_decoded(dir, split, limit=n):
        images.append(cols["image"])
    x = np.concatenate(images)[:n]  # uint8 [N, C, H, W], the stored pixels
    upscale = -(-32 // max(x.shape[2], x.shape[3]))  # cells of at least 32 px, so 8x8 digits stay visible
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out, png_bytes(grid(x.transpose(0, 2, 3, 1), nrow=8, pad=1, fill=64, upscale=upscale),
                                      compress_level=6))
    return len(x)
