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


class LabelCoder:
    """Labels as given (ints, numeric strings, class-name strings or None)
    -> int labels (-1 for none) and class names, in two passes so a source
    larger than memory never holds its labels: `see` every raw label, then
    `finish` once, then `code` each label."""

    def __init__(self):
        self._strings: set[str] = set()  # distinct labels as text: one per class
        self._ints: tuple[int, int] | None = None  # (min, max) while every label reads as an int
        self._all_int = True
        self._index: dict[str, int] | None = None

    def see(self, value) -> None:
        if value is None or value == "":
            return
        self._strings.add(str(value))
        if self._all_int:
            try:
                n = int(value)
            except (TypeError, ValueError):
                self._all_int = False
                return
            lo, hi = self._ints or (n, n)
            self._ints = (min(lo, n), max(hi, n))

    def finish(self, known_names: list[str] | None = None) -> list[str]:
        """The class names (raises DataError for a label below -1)."""
        if not self._strings:
            return []
        if not self._all_int:
            names = sorted(self._strings)
            self._index = {n: i for i, n in enumerate(names)}
            return names
        lo, hi = self._ints
        if lo < -1:
            raise DataError(f"labels must be >= 0 (or -1 for none); found {lo}")
        n = max(hi, -1) + 1
        return list(known_names) if known_names and len(known_names) >= n else [str(i) for i in range(n)]

    def code(self, value) -> int:
        if value is None or value == "":
            return -1
        return self._index[str(value)] if self._index is not None else int(value)


def encode_labels(values: list, known_names: list[str] | None = None) -> tuple[list[int], list[str]]:
    """Labels as given (ints, numeric strings, class-name strings or None)
    -> (int labels with -1 for none, class names)."""
    coder = LabelCoder()
    for v in values:
        coder.see(v)
    names = coder.finish(known_names)
    return [coder.code(v) for v in values], names
