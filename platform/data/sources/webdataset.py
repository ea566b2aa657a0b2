"""Import webdataset `.tar` shards: members sharing a key (path up to the
first dot of the file name) form one sample; `png/jpg/...` is the image,
`cls` the label, `txt`/`caption` the caption, `json` may hold either.

The shards are streamed, never held: a first pass reads the small members
(labels, captions, json) and skips over the images, a second reads the
samples again in order and hands them to `PoolReorder`. As in webdataset
itself, the members of a sample are adjacent in the tar."""
from __future__ import annotations

import json
import tarfile
from pathlib import Path
from typing import Iterator

from raygen.data.errors import DataError
from raygen.data.registry import DatasetBuilder, PrepareRequest, SourcePlan, register
from raygen.data.shards import Record
from raygen.data.sources._common import LabelCoder, expand_paths, guess_geometry
from raygen.data.sources._reorder import PoolReorder

IMAGE_EXTS = ("png", "jpg", "jpeg", "webp", "bmp")
LABEL_EXTS = ("cls", "cls.txt", "label", "label.txt")
CAPTION_EXTS = ("txt", "caption", "caption.txt", "text")
_SMALL_EXTS = {*LABEL_EXTS, *CAPTION_EXTS, "json"}


def iter_samples(files: list[Path], *, images: bool = True) -> Iterator[dict]:
    """Samples in tar order: {"__key__", ext: bytes, ...}, one at a time.
    `images` False reads only the label, caption and json members; an image
    member is then present as its size in bytes (an int)."""
    for path in files:
        sample: dict | None = None
        try:
            with tarfile.open(path) as tar:
                while (m := tar.next()) is not None:
                    tar.members.clear()  # TarFile keeps every header it has read: drop them
                    if not m.isfile():
                        continue
                    folder, _, base = m.name.rpartition("/")
                    if "." not in base or base.startswith("."):
                        continue
                    stem, ext = base.split(".", 1)
                    key, ext = f"{path.name}:{folder}/{stem}", ext.lower()
                    if sample is None or sample["__key__"] != key:
                        if sample is not None:
                            yield sample
                        sample = {"__key__": key}
                    if images or ext in _SMALL_EXTS:
                        sample[ext] = tar.extractfile(m).read()
                    else:
                        sample[ext] = m.size
        except (tarfile.TarError, OSError) as err:
            raise DataError(f"webdataset import: cannot read {path}: {err}") from None
        if sample is not None:
            yield sample


def read_samples(files) -> list[dict]:
    """Every sample in memory (small sources, tests)."""
    return list(iter_samples(list(files)))


def _text(b: bytes | None) -> str:
    return b.decode("utf-8", errors="replace").strip() if b else ""


def _has_image(s: dict) -> bool:
    return any(e in s for e in IMAGE_EXTS)


def _label_caption(s: dict) -> tuple:
    meta = json.loads(s["json"]) if "json" in s else {}
    label = next((_text(s[e]) for e in LABEL_EXTS if e in s), meta.get("label"))
    caption = next((_text(s[e]) for e in CAPTION_EXTS if e in s), meta.get("caption", meta.get("text", "")))
    return label, caption


@register
class WebDatasetImport(DatasetBuilder):
    name = "webdataset"
    summary = "import webdataset .tar shards (a file, folder or glob)"
    takes_source = True

    def plan(self, req: PrepareRequest, opts) -> SourcePlan:
        files = expand_paths(req.source, ".tar", "webdataset")
        # pass 1: count the samples with an image, collect the label set, find the first image
        coder, pool, image_bytes, has_captions, first = LabelCoder(), 0, 0, False, None
        for s in iter_samples(files, images=False):
            if not _has_image(s):
                continue
            label, caption = _label_caption(s)
            coder.see(label)
            has_captions = has_captions or bool(caption)
            ext = next(e for e in IMAGE_EXTS if e in s)
            image_bytes += s[ext]
            if first is None:
                first = s["__key__"]
            pool += 1
        if not pool:
            raise DataError(f"webdataset import: no samples with an image ({', '.join(IMAGE_EXTS)}) in {req.source}")
        class_names = coder.finish()
        sample = next(s for s in iter_samples(files) if s["__key__"] == first)
        res, ch = guess_geometry(next(sample[e] for e in IMAGE_EXTS if e in sample), first,
                                 req.resolution, req.channels)

        def stream(wanted):  # pass 2: the samples with an image, in order; None for those no split keeps
            i = 0
            for s in iter_samples(files):
                if not _has_image(s):
                    continue
                if not wanted(i):
                    yield None
                else:
                    label, caption = _label_caption(s)
                    yield Record(image=next(s[e] for e in IMAGE_EXTS if e in s), label=coder.code(label),
                                 caption=str(caption or ""), origin=s["__key__"])
                i += 1

        order = PoolReorder(pool, count=req.count, val_fraction=req.val_fraction, seed=req.seed,
                            record_bytes=image_bytes / pool, stream=stream, what=f"webdataset import of {req.source}")
        return SourcePlan(resolution=res, channels=ch, splits=order.splits, records=order.records,
                          class_names=class_names, has_captions=has_captions,
                          source=f"webdataset import of {req.source} ({len(files)} file(s))")
