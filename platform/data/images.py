"""Image helpers shared by the dataset builders, the Ray pipeline and the
plain loader, so every path decodes, resizes and converts pixels the same way.

Arrays are uint8; single images are HWC, batches are BCHW. A size is one
int (a square) or (height, width), as `data.resolution` gives it; `as_size`
turns either into (height, width).
"""
from __future__ import annotations

import io

import numpy as np
from PIL import Image

#: per-row status the decoder emits beside each image
OK, CORRUPT, REJECTED_SIZE, RESIZED = 0, 1, 2, 3
STATUS_NAMES = {OK: "ok", CORRUPT: "corrupt", REJECTED_SIZE: "wrong size (rejected)", RESIZED: "wrong size (resized)"}

_MODES = {1: "L", 3: "RGB"}


def mode_for(channels: int) -> str:
    return _MODES[channels]


def as_size(size) -> tuple[int, int]:
    """One int (a square) or [height, width] -> (height, width)."""
    if isinstance(size, (int, np.integer)):
        return int(size), int(size)
    h, w = size
    return int(h), int(w)


def spec_size(size) -> int | list[int]:
    """(height, width) -> the way a spec writes it: one int when square."""
    h, w = as_size(size)
    return h if h == w else [h, w]


def size_text(size) -> str:
    """"16x16", or "12x20 (HxW)" for non-square sizes, so the order is never a guess."""
    h, w = as_size(size)
    return f"{h}x{w}" if h == w else f"{h}x{w} (HxW)"


def to_pil(image: np.ndarray) -> Image.Image:
    """HxW or HxWxC (C in 1, 3) uint8 array -> PIL image."""
    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        raise TypeError(f"images must be uint8, got {arr.dtype}")
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    return Image.fromarray(arr)


def fit_image(img: Image.Image, resolution, channels: int) -> Image.Image:
    """Convert to the channel mode, centre-crop to the target's aspect ratio
    and resize to exactly `resolution` (one int, or (height, width)).

    Centre-cropping keeps the source's proportions instead of squashing
    them; LANCZOS keeps downscaled detail (prepare time only).
    """
    img = img.convert(mode_for(channels))
    th, tw = as_size(resolution)
    w, h = img.size
    # the largest centred box of aspect tw:th (integer maths: a square source
    # for a square target stays whole, as before)
    if w * th != h * tw:
        if w * th > h * tw:   # too wide: keep the full height
            cw, ch = max(1, round(h * tw / th)), h
        else:                 # too tall: keep the full width
            cw, ch = w, max(1, round(w * th / tw))
        left, top = (w - cw) // 2, (h - ch) // 2
        img = img.crop((left, top, left + cw, top + ch))
    if img.size != (tw, th):
        img = img.resize((tw, th), Image.Resampling.LANCZOS)
    return img


def encode_png(image: np.ndarray | Image.Image) -> bytes:
    img = image if isinstance(image, Image.Image) else to_pil(image)
    buf = io.BytesIO()
    # compress_level 6 is PIL's default; the output is byte-identical across runs.
    img.save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def decode_image(data: bytes) -> Image.Image:
    """Fully decode image bytes (raises on a truncated or corrupt file)."""
    img = Image.open(io.BytesIO(data))
    img.load()
    return img


def to_channels_array(img: Image.Image, channels: int) -> np.ndarray:
    """PIL image -> HxWxC uint8 with C == channels."""
    arr = np.asarray(img.convert(mode_for(channels)), dtype=np.uint8)
    return arr[:, :, None] if arr.ndim == 2 else arr


def resize_batch(x: np.ndarray, resolution) -> np.ndarray:
    """Resize a uint8 BCHW batch to `resolution` (one int or (height,
    width)) in one vectorized call (bilinear, antialiased)."""
    size = as_size(resolution)
    if tuple(x.shape[-2:]) == size:
        return x
    import torch
    import torch.nn.functional as F

    t = torch.from_numpy(np.ascontiguousarray(x)).float()
    t = F.interpolate(t, size=size, mode="bilinear", antialias=True, align_corners=False)
    return t.round_().clamp_(0, 255).to(torch.uint8).numpy()


def center_crop_batch(x: np.ndarray, size) -> np.ndarray:
    ch, cw = as_size(size)
    h, w = x.shape[-2:]
    top, left = (h - ch) // 2, (w - cw) // 2
    return x[..., top:top + ch, left:left + cw]


def _fast_png_decoder(channels: int):
    """torchvision's libpng decoder (about 2.5x PIL on small images), or
    None where torchvision is missing; PIL stays the fallback for anything
    it rejects, so both give the same verdict on corrupt bytes."""
    import warnings
    try:
        import torch
        with warnings.catch_warnings():
            # torchvision 0.29 deprecates its image codecs for torchcodec; PIL takes over once they are gone
            warnings.simplefilter("ignore", DeprecationWarning)
            from torchvision.io import ImageReadMode, decode_png
    except Exception:  # pragma: no cover - torchvision is a dependency, but keep PIL working without it
        return None
    mode = ImageReadMode.GRAY if channels == 1 else ImageReadMode.RGB

    def decode(buf: np.ndarray) -> np.ndarray | None:
        try:
            x = decode_png(torch.from_numpy(buf), mode=mode)
        except Exception:
            return None
        return x.numpy().transpose(1, 2, 0) if x.dtype == torch.uint8 else None
    return decode


def _binary_views(blobs) -> list[np.ndarray | None]:
    """Zero-copy uint8 views of a pyarrow binary array's values (or a list of bytes)."""
    if isinstance(blobs, list):
        return [None if b is None else np.frombuffer(b, np.uint8) for b in blobs]
    arr = blobs.combine_chunks() if hasattr(blobs, "combine_chunks") else blobs
    if arr.type.equals(__import__("pyarrow").large_binary()):
        offsets = np.frombuffer(arr.buffers()[1], np.int64)[arr.offset:arr.offset + len(arr) + 1]
    else:
        offsets = np.frombuffer(arr.buffers()[1], np.int32)[arr.offset:arr.offset + len(arr) + 1]
    data = np.frombuffer(arr.buffers()[2], np.uint8) if arr.buffers()[2] is not None else np.zeros(0, np.uint8)
    valid = arr.is_valid().to_numpy(zero_copy_only=False)
    return [data[offsets[i]:offsets[i + 1]] if valid[i] else None for i in range(len(arr))]


def decode_batch(blobs, *, stored_resolution, resolution, channels: int,
                 bad_size_policy: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Decode a batch of PNG bytes (a list of bytes or a pyarrow binary
    array) to uint8 [B, channels, H, W]; sizes are one int (square) or
    (height, width).

    Returns (images, status, messages). A row that cannot be decoded gets a
    zero image, status CORRUPT and a message; an image whose size differs
    from the dataset's stored resolution is resized (RESIZED) or rejected
    (REJECTED_SIZE) per `bad_size_policy`. Callers drop rows whose status
    is CORRUPT or REJECTED_SIZE and count them. The resize to `resolution`
    happens once for the whole batch.
    """
    import warnings
    views = _binary_views(blobs)
    n = len(views)
    s = as_size(stored_resolution)
    stored = np.zeros((n, *s, channels), dtype=np.uint8)
    status = np.zeros(n, dtype=np.int8)
    messages = [""] * n
    odd: dict[int, np.ndarray] = {}  # rows already brought to `resolution` one by one
    fast = _fast_png_decoder(channels)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch warns about read-only buffers; we only read them
        warnings.simplefilter("ignore", DeprecationWarning)  # see _fast_png_decoder
        for i, buf in enumerate(views):
            arr = fast(buf) if fast is not None and buf is not None and len(buf) else None
            if arr is None:  # not decodable by libpng: let PIL try, and name the problem
                try:
                    if buf is None or not len(buf):
                        raise ValueError("no image bytes")
                    img = decode_image(buf.tobytes())
                except Exception as err:  # PIL raises many types for bad bytes
                    status[i] = CORRUPT
                    messages[i] = f"{type(err).__name__}: {err}"
                    continue
                if img.size[::-1] != s:
                    arr = None
                else:
                    arr = to_channels_array(img, channels)
            else:
                img = None
            if arr is not None and arr.shape[:2] == s:
                stored[i] = arr
            elif bad_size_policy == "reject":
                hw = arr.shape[:2] if arr is not None else img.size[::-1]
                status[i] = REJECTED_SIZE
                messages[i] = f"size {size_text(hw)}, expected {size_text(s)}"
            else:
                if img is None:
                    img = to_pil(arr)
                status[i] = RESIZED
                messages[i] = f"size {size_text(img.size[::-1])} resized to {size_text(resolution)}"
                odd[i] = to_channels_array(fit_image(img, resolution, channels), channels)
    out = resize_batch(stored.transpose(0, 3, 1, 2), resolution)
    if odd:
        out = np.array(out, copy=True)
        for i, arr in odd.items():
            out[i] = arr.transpose(2, 0, 1)
    return np.ascontiguousarray(out), status, messages
