"""Any folder of images: the class is the first-level subfolder name, the
caption a sidecar `.txt` beside the image (same stem), if present."""
from __future__ import annotations

from pathlib import Path

from raygen.data.errors import DataError
from raygen.data.registry import DatasetBuilder, PrepareRequest, SourcePlan, pool_split, register
from raygen.data.shards import Record
from raygen.data.sources._common import IMAGE_EXTS, guess_geometry


def scan_folder(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*")
                  if p.suffix.lower() in IMAGE_EXTS and p.is_file()
                  and not any(part.startswith(".") for part in p.relative_to(root).parts))


@register
class Folder(DatasetBuilder):
    name = "folder"
    summary = "a folder of images (class = subfolder name, caption = sidecar .txt)"
    takes_source = True

    def plan(self, req: PrepareRequest, opts) -> SourcePlan:
        if not req.source:
            raise DataError("folder import needs a path: `raygen data prepare folder PATH --out DIR` "
                            "(or data.dataset: folder with data.source: PATH)")
        root = Path(req.source).expanduser()
        if not root.is_dir():
            raise DataError(f"folder import: {root} is not a folder")
        files = scan_folder(root)
        if not files:
            raise DataError(f"folder import: no images ({', '.join(sorted(IMAGE_EXTS))}) under {root}")
        rel = [f.relative_to(root) for f in files]
        class_names = sorted({r.parts[0] for r in rel if len(r.parts) > 1})
        class_of = {name: i for i, name in enumerate(class_names)}
        labels = [class_of[r.parts[0]] if len(r.parts) > 1 else -1 for r in rel]
        has_captions = any(f.with_suffix(".txt").is_file() for f in files)
        res, ch = guess_geometry(files[0].read_bytes(), str(files[0]), req.resolution, req.channels)
        idx = pool_split(len(files), count=req.count, val_fraction=req.val_fraction, seed=req.seed)

        def records(split: str):
            for i in idx[split]:
                f = files[i]
                side = f.with_suffix(".txt")
                caption = side.read_text(errors="replace").strip() if side.is_file() else ""
                yield Record(image=f.read_bytes(), label=labels[i], caption=caption, origin=str(f))

        return SourcePlan(resolution=res, channels=ch, splits={k: len(v) for k, v in idx.items()}, records=records,
                          class_names=class_names, has_captions=has_captions, source=f"image folder {root.resolve()}")
