"""OpenAI's images API (`POST /v1/images/generations`) on top of raygen's own request rules.

An OpenAI request is turned into a `/v1/generate` body (`to_generate_body`)
and then checked by the same code (`requests.resolve`), so the typed sampling
parameters and conditions of each family work here too: they come as extra
top-level fields, which is where the `openai` client puts `extra_body`.
The prompt goes where the model can use it: the caption of a caption model,
the label of a label model (a class name, or its index), and otherwise only
the text that `best_of` reranks against. `revised_prompt` in the answer says
what was used.

`url` answers are served by raygen itself under `/v1/files/NAME` from
`FileStore`, a folder shared by the replicas of one machine, until they expire.
No Ray and no FastAPI here: tested in plain Python.
"""
from __future__ import annotations

import io
import os
import re
import secrets
import time
from pathlib import Path
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from raygen.serving.requests import RequestError, ServedModel, field_error

MEDIA_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
_FILE_NAME = re.compile(r"[A-Za-z0-9_-]{16,64}\.(png|jpeg|webp)")


class ImagesRequest(BaseModel):
    """The OpenAI fields of an images request; anything else is raygen's (seed, best_of, the condition,
    the family's sampling parameters)."""
    model_config = ConfigDict(extra="forbid", strict=True)

    prompt: str = Field(min_length=1, max_length=32000, description="the caption of a caption model, the class "
                        "name (or index) of a label model; otherwise the text best_of reranks against")
    model: Optional[str] = Field(None, min_length=1, description="a model name from /v1/models; default: the first")
    n: Optional[int] = Field(None, ge=1, description="images to return (1..serve.max_n)")
    size: Optional[str] = Field(None, description="'auto' or the model's own WIDTHxHEIGHT")
    response_format: Optional[Literal["b64_json", "url"]] = Field(
        None, description="b64_json (default), or url: a link under /v1/files/ that expires")
    output_format: Optional[Literal["png", "jpeg", "webp"]] = Field(None, description="default png")
    output_compression: Optional[int] = Field(None, ge=0, le=100, description="jpeg/webp quality, 0..100")
    user: Optional[str] = Field(None, max_length=256, description="accepted and not used")
    quality: Optional[Literal["auto"]] = Field(None, description="only 'auto': a model draws at one quality")
    background: Optional[Literal["auto"]] = Field(None, description="only 'auto'")
    moderation: Optional[Literal["auto"]] = Field(None, description="only 'auto'")
    style: Optional[str] = Field(None, description="not supported; a family's own 'style' parameter, if any, "
                                                   "is passed as a sampling parameter")
    stream: Optional[bool] = Field(None, description="true: server-sent events, image_generation.partial_image "
                                   "(partial_images of them) then image_generation.completed per image")
    partial_images: Optional[int] = Field(None, ge=0, le=3, description="with stream: previews sent while sampling "
                                          "(0..3)")


OPENAI_FIELDS = frozenset(ImagesRequest.model_fields) - {"style"}


def parse_openai(body: Any) -> tuple[ImagesRequest, dict[str, Any]]:
    """The OpenAI fields, checked, and the other fields as they came."""
    if not isinstance(body, dict):
        raise RequestError(f"the body must be a JSON object, got {type(body).__name__}", "body", 400)
    ours = {k: v for k, v in body.items() if k in OPENAI_FIELDS}
    rest = {k: v for k, v in body.items() if k not in OPENAI_FIELDS}
    if "format" in rest:
        raise RequestError("use output_format (png, jpeg, webp) and response_format (b64_json, url) here; "
                           "'format' belongs to /v1/generate", "format", 400)
    try:
        req = ImagesRequest.model_validate(ours)
    except ValidationError as err:
        raise field_error(err, 400) from None
    return req, rest


def check_size(size: Optional[str], model: ServedModel) -> str:
    """The 'WxH' the answer will have: the model's own, or for a model that renders at any
    size (inr) the size asked for; another size for any other model is refused."""
    info = model.data_info
    own = f"{info.width}x{info.height}"
    if size in (None, "auto", own):
        return own
    if "render" in model.card.get("capabilities", ()):
        match = re.fullmatch(r"([1-9][0-9]*)x([1-9][0-9]*)", size)
        if match:
            return size  # to_generate_body passes it on as width/height; resolve() checks the limits
        raise RequestError(f"size must be 'auto' or WIDTHxHEIGHT, e.g. '{own}', got {size!r}", "size", 400)
    raise RequestError(f"model {model.name!r} draws {own} images; size must be '{own}' or 'auto', got "
                       f"{size!r}", "size", 400)


def size_fields(size: str, model: ServedModel) -> dict[str, int]:
    """`width`/`height` for a `/v1/generate` body when `size` (checked) is not the model's own."""
    width, height = (int(v) for v in size.split("x"))
    info = model.data_info
    return {} if (width, height) == (info.width, info.height) else {"width": width, "height": height}


def to_generate_body(req: ImagesRequest, rest: dict[str, Any], model: ServedModel) -> tuple[dict, Optional[str]]:
    """The `/v1/generate` body of an OpenAI request, and the prompt as the model will use it
    (`revised_prompt`): the caption, the class name, or None when the model takes no text."""
    body = {k: v for k, v in rest.items()}
    body["model"] = model.name
    if req.n is not None:
        body["n"] = req.n
    kind = model.kind.name
    reranks = rest.get("best_of") is not None
    used = None
    if kind == "caption":
        body.setdefault("prompt", req.prompt)  # resolve() takes it as the caption unless one is given
        used = body.get("caption", req.prompt)
    elif kind == "label" and "label" not in rest:
        body["label"] = _label(req.prompt, model)
        names = model.data_info.class_names
        used = names[body["label"]] if names else str(body["label"])
        if reranks:
            body["prompt"] = used
    elif reranks:
        body["prompt"] = req.prompt
    if "style" in req.model_fields_set:
        body["style"] = req.style  # a family parameter of that name, or a 400 naming 'style'
    return body, used


def _label(prompt: str, model: ServedModel) -> int:
    """A label model's prompt: a class name (any case) or a class index."""
    from raygen.models import ConditionError

    text = prompt.strip()
    try:
        return int(model.kind.parse(int(text) if text.isdigit() else text, model.data_info))
    except (ConditionError, TypeError, ValueError):
        names = model.data_info.class_names
        choices = f"one of {', '.join(names[:12])}{' ...' if len(names) > 12 else ''} (or 0..{len(names) - 1})" \
            if names else f"a class index 0..{model.data_info.num_classes - 1}"
        raise RequestError(f"model {model.name!r} draws classes, so the prompt must name one: {choices}; "
                           f"got {prompt[:80]!r} (or pass 'label' in extra_body and the prompt is then only used "
                           "for best_of)", "prompt", 400) from None


def encode(image, output_format: str, quality: Optional[int] = None) -> bytes:
    """uint8 [H, W, C] -> bytes of a PNG, JPEG or WebP."""
    from raygen.images import png_bytes, to_pil

    if output_format == "png":
        return png_bytes(image)
    pil = to_pil(image)
    if output_format == "jpeg" and pil.mode == "RGBA":
        pil = pil.convert("RGB")
    buf = io.BytesIO()
    pil.save(buf, format=output_format.upper(), quality=quality if quality is not None else 90)
    return buf.getvalue()


class FileStore:
    """Generated images kept for `ttl_s` and served under `/v1/files/NAME`.

    A folder on disk (0700), so every replica on one machine serves every
    file; a name is 128 random bits, which makes the link its own key. Expired
    files are removed as new ones are written and refused when asked for."""

    def __init__(self, folder: str | os.PathLike, ttl_s: float = 3600.0):
        self.folder = Path(folder)
        self.ttl_s = ttl_s
        self._last_sweep = 0.0

    def put(self, data: bytes, output_format: str) -> tuple[str, int]:
        """Stores the bytes; returns (name, expiry as unix seconds)."""
        self.folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._sweep()
        name = f"{secrets.token_urlsafe(16)}.{output_format}"
        tmp = self.folder / f".{name}.part"
        tmp.write_bytes(data)
        tmp.replace(self.folder / name)  # a reader never sees half a file
        return name, int(time.time() + self.ttl_s)

    def get(self, name: str) -> Optional[tuple[bytes, str]]:
        """(bytes, media type), or None when unknown or expired."""
        if not _FILE_NAME.fullmatch(name):
            return None
        path = self.folder / name
        try:
            if time.time() - path.stat().st_mtime > self.ttl_s:
                return None
            return path.read_bytes(), MEDIA_TYPES[name.rsplit(".", 1)[1]]
        except OSError:
            return None

    def _sweep(self) -> None:
        now = time.time()
        if now - self._last_sweep < 60:
            return
        self._last_sweep = now
        for path in self.folder.iterdir():
            try:
                if now - path.stat().st_mtime > self.ttl_s:
                    path.unlink()
            except OSError:
                pass  # another replica removed it first


def default_files_dir() -> str:
    import tempfile

    return str(Path(tempfile.gettempdir()) / f"raygen-files-{os.getuid()}")


# ---------------------------------------------------------------- streamed answers (stream: true)
# The fields of the openai client's ImageGenPartialImageEvent and ImageGenCompletedEvent; raygen's own
# (image_index, seed, step, total, score, model, run_id, revised_prompt) ride along as extras.
_STREAM_COMMON = {"background": "opaque", "quality": "auto"}
_NO_USAGE = {"input_tokens": 0, "input_tokens_details": {"image_tokens": 0, "text_tokens": 0}, "output_tokens": 0,
             "total_tokens": 0}


def partial_event(b64_json: str, *, index: int, size: str, output_format: str, **extra) -> dict:
    """`image_generation.partial_image`: preview `index` (0-based) of one image."""
    return {"type": "image_generation.partial_image", "b64_json": b64_json, "partial_image_index": index,
            "created_at": int(time.time()), "size": size, "output_format": output_format, **_STREAM_COMMON,
            **extra}


def completed_event(b64_json: str, *, size: str, output_format: str, **extra) -> dict:
    """`image_generation.completed`: one final image (one event per image when n > 1)."""
    return {"type": "image_generation.completed", "b64_json": b64_json, "created_at": int(time.time()),
            "size": size, "output_format": output_format, "usage": _NO_USAGE, **_STREAM_COMMON, **extra}
