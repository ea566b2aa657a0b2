"""Helpers shared by the import builders (folder, parquet, webdataset)."""
from __future__ import annotations

import glob as globlib
from pathlib import Path

from raygen.data.errors import DataError
from raygen.data.images import decode_image

IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
_GRAY_MODES = {"1", "L", "LA", "I", "I;16", "F"}


def expand_paths(source: str | None, suffix: str, what: str) -> list[Path]:
    """A file, a folder (all `*suffix` files under it) or a glob -> sorted files."""
    if not source:
        raise DataError(f"{what} import needs a path: give PATH (or --source / data.source)")
    p = Path(source).expanduser()
    if p.is_dir():
        files = sorted(f for f in p.rglob(f"*{suffix}") if f.is_file() and not f.name.startswith("."))
    elif p.is_file():
        files = [p]
    else:
        files = sorted(Path(f) for f in globlib.glob(str(p), recursive=True) if Path(f).is_file())
    if not files:
        raise DataError(f"{what} import: no {suffix} files at {source}; check the path or glob")
    return files


def guess_geometry(first_image: bytes, where: str, resolution, channels: int | None) -> tuple:
    """Default resolution (the shorter side) and channels (1 for grey modes)
    from the first image, where the user gave none."""
    if resolution and channels:
        return resolution, channels
    try:
        img = decode_image(first_image)
    except Exception as err:
        raise DataError(f"{where}: first image is unreadable ({err}); pass --resolution and --channels") from None
    res = resolution or max(4, min(1024, min(img.size)))
    ch = channels or (1 if img.mode in _GRAY_MODES else 3)
    return res, ch


def encode_labels(values: list, known_names: list[str] | None = None) -> tuple[list[int], list[str]]:
    """Labels as given (ints, numeric strings, class-name strings or None)
    -> (int labels with -1 for none, class names)."""
    present = [v for v in values if v is not None and v != ""]
    if not present:
        return [-1] * len(values), []
    try:
        ints = [int(v) if v is not None and v != "" else -1 for v in values]
    except (TypeError, ValueError):
        names = sorted({str(v) for v in present})
        index = {n: i for i, n in enumerate(names)}
        return [index[str(v)] if v is not None and v != "" else -1 for v in values], names
    if min(ints) < -1:
        raise DataError(f"labels must be >= 0 (or -1 for none); found {min(ints)}")
    n = max(ints) + 1
    names = list(known_names) if known_names and len(known_names) >= n else [str(i) for i in range(n)]
    return ints, names
