"""Reading images for the metrics CLI: a prepared dataset folder (parquet shards
with `png`, `label`, `caption` columns, listed in `manifest.json`) and a plain
folder of generated PNG/JPEG files. Everything comes back as uint8 [N, C, H, W],
i.e. exactly the pixels stored, so nothing is re-quantized differently."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch

from raygen.metrics.errors import MetricsError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


def _to_array(img, channels: int) -> np.ndarray:
    arr = np.asarray(img.convert("L" if channels == 1 else "RGB"), dtype=np.uint8)
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


def _channels_of(img) -> int:
    return 1 if img.mode in ("1", "L", "LA", "I", "I;16", "F") else 3


def _shard_paths(root: Path, split: str) -> tuple[list[Path], dict]:
    if (root / "manifest.json").is_file():
        try:
            from raygen.data.manifest import read_manifest
        except ImportError:
            read_manifest = None
        if read_manifest is not None:
            m = read_manifest(root)
            info = {"channels": m.channels, "resolution": m.resolution, "class_names": list(m.class_names),
                    "num_classes": m.num_classes, "has_captions": m.has_captions}
            return m.shard_paths(split), info
    paths = sorted(root.glob(f"{split}-*.parquet")) or sorted((root / split).glob("*.parquet"))
    return paths, {}


def load_dataset_images(dataset_dir: str | Path, split: str = "train", *, count: int | None = None,
                        channels: int | None = None, data_spec=None
                        ) -> tuple[torch.Tensor, torch.Tensor | None, list[str] | None]:
    """(images [N, C, H, W], labels long [N] or None, captions or None) of one split
    of a prepared dataset; the first `count` rows when given. A folder with a
    manifest is read by `raygen.data.load_split_images` (decoded exactly as
    training decodes it; `data_spec` defaults to the stored resolution and
    channels); bare `SPLIT-*.parquet` shards are read here. Images are uint8, or
    float in [0, 1] on 8-bit levels: the same pixels either way."""
    root = Path(dataset_dir).expanduser()
    if (root / "manifest.json").is_file():
        try:
            from raygen.data.local import load_split_images
            from raygen.data.manifest import read_manifest
        except ImportError:
            load_split_images = None
        if load_split_images is not None:
            if data_spec is None:
                from raygen.spec.schema import DataSpec
                m = read_manifest(root)
                data_spec = DataSpec(resolution=m.resolution, channels=channels or m.channels)
            out = load_split_images(root, split, data_spec, limit=count)
            labels = torch.as_tensor(out["label"]).long()
            captions = [str(c) for c in out["caption"]]
            return (out["image"], labels if labels.numel() and (labels >= 0).all() else None,
                    captions if any(captions) else None)
    return _read_shards(root, split, count=count, channels=channels)


def _read_shards(root: Path, split: str, *, count: int | None, channels: int | None):
    import pyarrow.parquet as pq
    from PIL import Image

    if not root.is_dir():
        raise MetricsError(f"dataset folder {root} does not exist; prepare one with `raygen data prepare NAME --out {root}`")
    paths, info = _shard_paths(root, split)
    if not paths:
        raise MetricsError(f"{root} holds no '{split}' parquet shards ({split}-*.parquet); "
                           f"prepare it with `raygen data prepare NAME --out {root}`")
    channels = channels or info.get("channels")
    images, labels, captions = [], [], []
    for path in paths:
        table = pq.read_table(path, columns=[c for c in ("png", "label", "caption")
                                             if c in pq.read_schema(path).names])
        if "png" not in table.column_names:
            raise MetricsError(f"{path} has no 'png' column; is it a raygen dataset shard?")
        cols = table.to_pydict()
        for i, blob in enumerate(cols["png"]):
            try:
                img = Image.open(io.BytesIO(blob))
                img.load()
            except Exception as err:
                raise MetricsError(f"{path} row {i}: undecodable image ({type(err).__name__}: {err}); "
                                   "prepare the dataset again") from None
            channels = channels or _channels_of(img)
            images.append(_to_array(img, channels))
            labels.append(cols.get("label", [-1] * len(cols["png"]))[i])
            captions.append(cols.get("caption", [""] * len(cols["png"]))[i] or "")
            if count is not None and len(images) >= count:
                break
        if count is not None and len(images) >= count:
            break
    shapes = {a.shape for a in images}
    if len(shapes) > 1:
        raise MetricsError(f"{root}: images of several sizes {sorted(shapes)[:3]}; prepare the dataset at one resolution")
    x = torch.from_numpy(np.stack(images))
    y = torch.tensor([-1 if v is None else int(v) for v in labels], dtype=torch.long)
    return x, (y if (y >= 0).all() and y.numel() else None), (captions if any(captions) else None)


def read_image_folder(folder: str | Path, *, channels: int | None = None, limit: int | None = None) -> torch.Tensor:
    """uint8 [N, C, H, W] of the image files in `folder` (sorted by name). Channels:
    as given, else 1 when every image is grayscale, else 3."""
    from PIL import Image

    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise MetricsError(f"image folder {folder} does not exist")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)[:limit]
    if not files:
        raise MetricsError(f"{folder} holds no image files ({', '.join(IMAGE_SUFFIXES)})")
    imgs = []
    for p in files:
        try:
            img = Image.open(p)
            img.load()
        except Exception as err:
            raise MetricsError(f"{p}: undecodable image ({type(err).__name__}: {err})") from None
        imgs.append(img)
    channels = channels or (1 if all(_channels_of(i) == 1 for i in imgs) else 3)
    arrays = [_to_array(i, channels) for i in imgs]
    sizes = {a.shape for a in arrays}
    if len(sizes) > 1:
        raise MetricsError(f"{folder}: images of several sizes {sorted(sizes)[:3]}; FID needs one size per set")
    return torch.from_numpy(np.stack(arrays))


def write_image_folder(images: torch.Tensor, folder: str | Path, prefix: str = "img") -> list[Path]:
    """Save [N, C, H, W] images in [0, 1] (or uint8) as PNG files, rounding like the dataset writer."""
    from PIL import Image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    x = images.detach().cpu()
    if x.dtype != torch.uint8:
        from raygen.images import quantize
        x = quantize(x)  # the one rounding rule (raygen.images)
    paths = []
    for i, a in enumerate(x.numpy()):
        arr = a[0] if a.shape[0] == 1 else a.transpose(1, 2, 0)
        p = folder / f"{prefix}{i:05d}.png"
        Image.fromarray(arr).save(p)
        paths.append(p)
    return paths
