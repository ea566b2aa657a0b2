"""Import webdataset `.tar` shards: members sharing a key (path up to the
first dot of the file name) form one sample; `png/jpg/...` is the image,
`cls` the label, `txt`/`caption` the caption, `json` may hold either."""
from __future__ import annotations

import json
import tarfile

from raygen.data.errors import DataError
from raygen.data.registry import DatasetBuilder, PrepareRequest, SourcePlan, pool_split, register
from raygen.data.shards import Record
from raygen.data.sources._common import encode_labels, expand_paths, guess_geometry

IMAGE_EXTS = ("png", "jpg", "jpeg", "webp", "bmp")
LABEL_EXTS = ("cls", "cls.txt", "label", "label.txt")
CAPTION_EXTS = ("txt", "caption", "caption.txt", "text")


def read_samples(files) -> list[dict]:
    samples: dict[str, dict] = {}
    for path in files:
        try:
            with tarfile.open(path) as tar:
                for m in tar:
                    if not m.isfile():
                        continue
                    folder, _, base = m.name.rpartition("/")
                    if "." not in base or base.startswith("."):
                        continue
                    stem, ext = base.split(".", 1)
                    key = f"{path.name}:{folder}/{stem}"
                    samples.setdefault(key, {"__key__": key})[ext.lower()] = tar.extractfile(m).read()
        except (tarfile.TarError, OSError) as err:
            raise DataError(f"webdataset import: cannot read {path}: {err}") from None
    return list(samples.values())


def _text(b: bytes | None) -> str:
    return b.decode("utf-8", errors="replace").strip() if b else ""


@register
class WebDatasetImport(DatasetBuilder):
    name = "webdataset"
    summary = "import webdataset .tar shards (a file, folder or glob)"
    takes_source = True

    def plan(self, req: PrepareRequest, opts) -> SourcePlan:
        files = expand_paths(req.source, ".tar", "webdataset")
        samples = [s for s in read_samples(files) if any(e in s for e in IMAGE_EXTS)]
        if not samples:
            raise DataError(f"webdataset import: no samples with an image ({', '.join(IMAGE_EXTS)}) in {req.source}")
        raw_labels, captions = [], []
        for s in samples:
            meta = json.loads(s["json"]) if "json" in s else {}
            raw_labels.append(next((_text(s[e]) for e in LABEL_EXTS if e in s), meta.get("label")))
            captions.append(next((_text(s[e]) for e in CAPTION_EXTS if e in s),
                                 meta.get("caption", meta.get("text", ""))))
        labels, class_names = encode_labels(raw_labels)
        first = next(s[e] for e in IMAGE_EXTS if e in samples[0])
        res, ch = guess_geometry(first, samples[0]["__key__"], req.resolution, req.channels)
        idx = pool_split(len(samples), count=req.count, val_fraction=req.val_fraction, seed=req.seed)

        def records(split: str):
            for i in idx[split]:
                s = samples[i]
                yield Record(image=next(s[e] for e in IMAGE_EXTS if e in s), label=labels[i],
                             caption=str(captions[i] or ""), origin=s["__key__"])

        return SourcePlan(resolution=res, channels=ch, splits={k: len(v) for k, v in idx.items()}, records=records,
                          class_names=class_names, has_captions=any(captions),
                          source=f"webdataset import of {req.source} ({len(files)} file(s))")
