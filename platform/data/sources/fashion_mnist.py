"""Fashion-MNIST from the Debian package `dataset-fashion-mnist` (IDX files).

The official test set supplies the validation split; captions name the
garment ("a photo of a sneaker").
"""
from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np

from raygen.data.errors import DataError
from raygen.data.images import fit_image, to_pil
from raygen.data.registry import DatasetBuilder, PrepareRequest, SourcePlan, register, val_size_for
from raygen.data.shards import Record

DEFAULT_SOURCE = "/usr/share/datasets/fashion-mnist"
CLASS_NAMES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
CAPTIONS = ["a photo of a t-shirt", "a photo of a pair of trousers", "a photo of a pullover", "a photo of a dress",
            "a photo of a coat", "a photo of a sandal", "a photo of a shirt", "a photo of a sneaker",
            "a photo of a bag", "a photo of an ankle boot"]
FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
         "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (optionally gzipped) of unsigned bytes."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise DataError(f"{path}: not an IDX file of unsigned bytes")
    ndim = data[3]
    dims = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise DataError(f"{path}: truncated IDX file ({body.size} values, header says {int(np.prod(dims))})")
    return body.reshape(dims)


def find_file(root: Path, stem: str) -> Path:
    for name in (stem + ".gz", stem):
        if (root / name).is_file():
            return root / name
    raise DataError(f"fashion-mnist: {root}/{stem}.gz not found; install the files with "
                    f"`apt-get install dataset-fashion-mnist` or point data.source / --source at a folder holding them")


@register
class FashionMNIST(DatasetBuilder):
    name = "fashion-mnist"
    summary = "Fashion-MNIST 28x28 garments, 10 classes, captions (Debian dataset-fashion-mnist)"
    default_resolution = 28
    default_channels = 1
    takes_source = True

    def plan(self, req: PrepareRequest, opts) -> SourcePlan:
        root = Path(req.source or DEFAULT_SOURCE).expanduser()
        if not root.is_dir():
            raise DataError(f"fashion-mnist: source folder {root} not found; install it with "
                            "`apt-get install dataset-fashion-mnist` or pass --source DIR (data.source) "
                            "holding the IDX files")
        paths = {k: [find_file(root, s) for s in v] for k, v in FILES.items()}
        arrays: dict[str, tuple[np.ndarray, np.ndarray]] = {}

        def load(part: str) -> tuple[np.ndarray, np.ndarray]:
            if part not in arrays:
                images, labels = read_idx(paths[part][0]), read_idx(paths[part][1])
                if len(images) != len(labels):
                    raise DataError(f"fashion-mnist: {paths[part][0]} has {len(images)} images but "
                                    f"{paths[part][1]} has {len(labels)} labels")
                arrays[part] = images, labels
            return arrays[part]

        n_train_pool, n_test_pool = len(load("train")[1]), len(load("test")[1])
        rng = np.random.default_rng([req.seed, 11])
        train_idx = rng.permutation(n_train_pool)[:req.count] if req.count else rng.permutation(n_train_pool)
        val_idx = rng.permutation(n_test_pool)[:min(n_test_pool, val_size_for(len(train_idx), req.val_fraction))]
        order = {"train": ("train", train_idx), "val": ("test", val_idx)}
        res, ch = req.resolution, req.channels

        def records(split: str):
            images, labels = load(order[split][0])
            for i in order[split][1]:
                img = images[i]
                if res != 28 or ch != 1:
                    img = fit_image(to_pil(img), res, ch)
                label = int(labels[i])
                yield Record(image=img, label=label, caption=CAPTIONS[label])

        return SourcePlan(resolution=res, channels=ch, splits={k: len(v[1]) for k, v in order.items()},
                          records=records, class_names=list(CLASS_NAMES), has_captions=True,
                          source=f"fashion-mnist IDX files in {root}")
