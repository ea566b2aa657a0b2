"""Image output, one way everywhere: float -> uint8, grids, PNG.

Training (sample grids), the CLI (`raygen sample`, `raygen data inspect`),
the metrics (generated image folders, dataset checksums) and the server all
turn float images into bytes through this module, so one model gives the
same pixels whichever path wrote them.

The one rounding rule (`quantize`): NaN -> 0 (a broken sample shows black,
not noise), clamp to [0, 1], then round half up, `floor(x * 255 + 0.5)`
(torchvision's `save_image` rounding, and what the FID preprocessing
assumes a PNG writer stored).

Layouts: float batches are [N, C, H, W] in [0, 1]; uint8 images for PIL are
HWC; `to_uint8` goes from the first to a stack of the second.
"""
from __future__ import annotations

import base64
import io
import math
from pathlib import Path
from typing import Union

import numpy as np
import torch
from PIL import Image

ArrayLike = Union[torch.Tensor, np.ndarray]

_MODES = {1: "L", 3: "RGB", 4: "RGBA"}


def quantize(x: ArrayLike) -> ArrayLike:
    """Float values in [0, 1] -> uint8, same shape and kind (torch stays torch,
    numpy stays numpy). uint8 input is returned as is."""
    if isinstance(x, torch.Tensor):
        if x.dtype == torch.uint8:
            return x
        x = torch.nan_to_num(x.detach().float(), nan=0.0).clamp_(0.0, 1.0)
        return torch.floor(x * 255.0 + 0.5).to(torch.uint8)
    arr = np.asarray(x)
    if arr.dtype == np.uint8:
        return arr
    arr = np.clip(np.nan_to_num(arr.astype(np.float32), nan=0.0), 0.0, 1.0)
    return np.floor(arr * 255.0 + 0.5).astype(np.uint8)


def to_uint8(images: ArrayLike) -> np.ndarray:
    """[N, C, H, W] float in [0, 1] (torch or numpy) -> uint8 numpy [N, H, W, C]."""
    if isinstance(images, torch.Tensor):
        images = images.detach().cpu()
    if images.ndim != 4:
        raise ValueError(f"expected images [n, C, H, W], got shape {tuple(images.shape)}")
    out = quantize(images)
    out = out.numpy() if isinstance(out, torch.Tensor) else out
    return np.ascontiguousarray(out.transpose(0, 2, 3, 1))


def grid(images: np.ndarray, *, nrow: int | None = None, pad: int = 2, fill: int = 0,
         upscale: int = 1) -> np.ndarray:
    """uint8 [n, H, W, C] -> one uint8 [H', W', C] grid: `nrow` images per row
    (near-square by default), `pad` pixels of `fill` between and around them,
    each image enlarged `upscale` times (nearest) so tiny images stay visible."""
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4:
        raise ValueError(f"grid takes uint8 [n, H, W, C]; got {images.dtype} {tuple(images.shape)}")
    if upscale > 1:
        images = images.repeat(upscale, axis=1).repeat(upscale, axis=2)
    n, h, w, c = images.shape
    cols = max(1, min(nrow or math.ceil(math.sqrt(n)), n))
    rows = math.ceil(n / cols)
    out = np.full((rows * h + (rows + 1) * pad, cols * w + (cols + 1) * pad, c), fill, dtype=np.uint8)
    for i in range(n):
        r, col = divmod(i, cols)
        y, x = pad + r * (h + pad), pad + col * (w + pad)
        out[y:y + h, x:x + w] = images[i]
    return out


#: pixel height of the caption strip under a captioned grid cell
CAPTION_HEIGHT = 14


def _fit_text(draw, text: str, font, width: int) -> str:
    """`text`, cut with an ellipsis so that it fits `width` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text + "…" if text else ""


def caption_cells(images: np.ndarray, captions: list[str]) -> np.ndarray:
    """uint8 [n, H, W, C] -> uint8 [n, H + CAPTION_HEIGHT, W, C]: each image
    with its caption (cut to the image's width) on a dark strip under it."""
    from PIL import ImageDraw, ImageFont

    images = np.asarray(images)
    if len(captions) != images.shape[0]:
        raise ValueError(f"give one caption per image: {len(captions)} captions for {images.shape[0]} images")
    n, h, w, c = images.shape
    font = ImageFont.load_default(size=CAPTION_HEIGHT - 3)
    out = np.zeros((n, h + CAPTION_HEIGHT, w, c), dtype=np.uint8)
    out[:, :h] = images
    for i, text in enumerate(captions):
        strip = Image.new("L", (w, CAPTION_HEIGHT), 0)
        draw = ImageDraw.Draw(strip)
        draw.text((1, 1), _fit_text(draw, str(text), font, w - 2), fill=255, font=font)
        out[i, h:] = np.asarray(strip)[..., None]  # white text in every channel
        if c == 4:
            out[i, h:, :, 3] = 255  # an opaque strip
    return out


def make_grid(images: ArrayLike, *, nrow: int | None = None, pad: int = 2, upscale: int = 1,
              captions: list[str] | None = None) -> np.ndarray:
    """Float [N, C, H, W] in [0, 1] -> one uint8 [H', W', C] grid; with
    `captions`, each image's caption is written under it (after upscaling,
    so the text stays legible)."""
    cells = to_uint8(images)
    if captions is None:
        return grid(cells, nrow=nrow, pad=pad, upscale=upscale)
    if upscale > 1:
        cells = cells.repeat(upscale, axis=1).repeat(upscale, axis=2)
    return grid(caption_cells(cells, captions), nrow=nrow, pad=pad)


def upscale_for(height: int, width: int, target: int = 128) -> int:
    """How much to enlarge images of this size so a grid cell is about `target` pixels."""
    return max(1, target // max(height, width))


def to_pil(image: np.ndarray) -> Image.Image:
    """uint8 [H, W, C] (C of 1, 3 or 4) -> a PIL image."""
    channels = image.shape[-1]
    if image.dtype != np.uint8 or image.ndim != 3 or channels not in _MODES:
        raise ValueError(f"a PNG needs uint8 [H, W, C] with C of 1, 3 or 4; got {image.dtype} {tuple(image.shape)}")
    return Image.fromarray(image[..., 0] if channels == 1 else image)


def png_bytes(image: np.ndarray, compress_level: int = 1) -> bytes:
    """uint8 [H, W, C] -> PNG bytes. compress_level 1: images are small and
    latency (the server) matters more than a few bytes."""
    buf = io.BytesIO()
    to_pil(image).save(buf, format="PNG", compress_level=compress_level)
    return buf.getvalue()


def png_base64(image: np.ndarray) -> str:
    return base64.b64encode(png_bytes(image)).decode("ascii")


def save_png(image: np.ndarray, path: str | Path) -> Path:
    """Write uint8 [H, W, C] as a PNG file (parent folders created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(png_bytes(image, compress_level=6))
    return path


def save_grid(images: ArrayLike, path: str | Path, upscale: int = 1, nrow: int | None = None,
              captions: list[str] | None = None) -> Path:
    """Float [N, C, H, W] in [0, 1] -> a grid PNG at `path` (captions under the images when given)."""
    return save_png(make_grid(images, nrow=nrow, upscale=upscale, captions=captions), path)
