"""Image tensors to PNG bytes (single images and grids)."""
from __future__ import annotations

import base64
import io
import math

import numpy as np
from PIL import Image

_MODES = {1: "L", 3: "RGB", 4: "RGBA"}


def to_uint8(images) -> np.ndarray:
    """float [n, C, H, W] in [0, 1] (torch or numpy) -> uint8 [n, H, W, C]."""
    if hasattr(images, "detach"):
        images = images.detach().float().cpu().numpy()
    images = np.asarray(images, dtype=np.float32)
    if images.ndim != 4:
        raise ValueError(f"expected images [n, C, H, W], got shape {tuple(images.shape)}")
    # NaN would become an arbitrary byte; map it to black so a broken sample is visible, not random
    images = np.nan_to_num(images, nan=0.0)
    return (np.clip(images, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8).transpose(0, 2, 3, 1)


def png_bytes(image: np.ndarray) -> bytes:
    """uint8 [H, W, C] -> PNG bytes (C of 1, 3 or 4)."""
    channels = image.shape[-1]
    if channels not in _MODES:
        raise ValueError(f"cannot write a PNG with {channels} channels (1, 3 or 4)")
    pil = Image.fromarray(image[..., 0] if channels == 1 else image)
    buf = io.BytesIO()
    # compress_level 1: images are small and latency matters more than a few bytes
    pil.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def png_base64(image: np.ndarray) -> str:
    return base64.b64encode(png_bytes(image)).decode("ascii")


def grid(images: np.ndarray, pad: int = 2) -> np.ndarray:
    """uint8 [n, H, W, C] -> one uint8 [H', W', C] grid, near-square, padded with black."""
    n, h, w, c = images.shape
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    out = np.zeros((rows * h + (rows + 1) * pad, cols * w + (cols + 1) * pad, c), dtype=np.uint8)
    for i in range(n):
        r, col = divmod(i, cols)
        y, x = pad + r * (h + pad), pad + col * (w + pad)
        out[y:y + h, x:x + w] = images[i]
    return out
