"""Typed sampling parameters and per-image randomness.

Each family declares a `SamplingParams` subclass: its fields (with types,
ranges, enums, defaults and descriptions) are what `raygen sample --set`,
the HTTP body, the OpenAPI schema, `/v1/models` and the playground form are
generated from. Params are frozen, so requests with equal params can be
merged into one batch.

`sample` takes one `torch.Generator` per image (the diffusers convention):
every random number an image uses comes from its own generator, so an image
does not depend on which other images shared its batch. The helpers below
draw per-image numbers and stack them.

Sampling loops report each step to an optional listener (`preview`,
`previewing`): a server streams previews from it and stops the work with
`SamplingCancelled` when its client goes away.
"""
from __future__ import annotations

import json
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
from pydantic import BaseModel, ConfigDict, ValidationError

#: seeds go to torch.Generator.manual_seed, which takes a 64-bit value
MAX_SEED = 2**63 - 1


class SamplingParams(BaseModel):
    """Base of every family's sampling parameters (no fields: nothing to choose)."""
    model_config = ConfigDict(extra="forbid", frozen=True)

    def key(self) -> tuple:
        """Requests whose params have the same key can share one forward batch."""
        return tuple(sorted(self.model_dump().items(), key=lambda kv: kv[0]))


class SamplingParamsError(ValueError):
    """Bad sampling parameters; `field` names the first bad one."""

    def __init__(self, message: str, field: str | None):
        super().__init__(message)
        self.message, self.field = message, field


def parse_params(cls: type[SamplingParams], values: dict[str, Any], *, strict: bool = True) -> SamplingParams:
    """Validate raw values into `cls`; one-line errors naming the field and what it accepts.

    strict: JSON types must match (HTTP); otherwise CLI strings such as "0.8" are converted."""
    try:
        if strict:
            try:  # JSON's own strictness: enum fields take their values ("inverted"), not only Enum members
                return cls.model_validate_json(json.dumps(values, allow_nan=True), strict=True)
            except TypeError:  # values that are not JSON (Python objects): strict Python validation
                return cls.model_validate(values, strict=True)
        return cls.model_validate(values)
    except ValidationError as err:
        first = err.errors()[0]
        field = ".".join(str(p) for p in first["loc"]) or None
        if first["type"] == "extra_forbidden":
            accepted = ", ".join(cls.model_fields) or "none"
            raise SamplingParamsError(f"unknown sampling parameter {field!r}; this model takes: {accepted}",
                                      field) from None
        info = cls.model_fields.get(str(first["loc"][0])) if first["loc"] else None
        expects = f" (expects {_type_name(info.annotation)})" if info is not None else ""
        hint = f"; {info.description}" if info is not None and info.description else ""
        got = f", got {first['input']!r}" if "input" in first and not isinstance(first["input"], dict) else ""
        raise SamplingParamsError(f"{field}: {first['msg']}{got}{expects}{hint}", field) from None


def _type_name(annotation: Any) -> str:
    return annotation.__name__ if isinstance(annotation, type) else str(annotation).replace("typing.", "")


def image_seeds(seed: int, n: int) -> list[int]:
    """Image i of a request with seed s uses seed s + i: the same seed gives
    the same images, and image i can be redrawn alone with seed s + i."""
    if not 0 <= seed <= MAX_SEED - max(n - 1, 0):
        raise ValueError(f"seed must be between 0 and {MAX_SEED - max(n - 1, 0)}, got {seed}")
    return [seed + i for i in range(n)]


def make_generators(seeds: Sequence[int], device: torch.device | str = "cpu") -> list[torch.Generator]:
    return [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]


def _device_of(generators: Sequence[torch.Generator]) -> torch.device:
    return generators[0].device if generators else torch.device("cpu")


def per_image_rand(generators: Sequence[torch.Generator], shape: Sequence[int], *, like: torch.Tensor | None = None,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Uniform [0, 1) numbers [n, *shape], row i drawn from generators[i]."""
    dev = _device_of(generators)
    out = torch.stack([torch.rand(tuple(shape), generator=g, device=dev, dtype=dtype) for g in generators])
    return out if like is None else out.to(like.device)


def per_image_randn(generators: Sequence[torch.Generator], shape: Sequence[int], *, like: torch.Tensor | None = None,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Standard normal numbers [n, *shape], row i drawn from generators[i]."""
    dev = _device_of(generators)
    out = torch.stack([torch.randn(tuple(shape), generator=g, device=dev, dtype=dtype) for g in generators])
    return out if like is None else out.to(like.device)


def per_image_randint(generators: Sequence[torch.Generator], high: int) -> torch.Tensor:
    """One integer in [0, high) per image, long [n]."""
    dev = _device_of(generators)
    return torch.cat([torch.randint(high, (1,), generator=g, device=dev) for g in generators])


def check_generators(n: int, generators: Sequence[torch.Generator]) -> None:
    if n < 1:
        raise ValueError(f"sample at least one image (got {n} conditions)")
    if len(generators) != n:
        raise ValueError(f"sample needs one torch.Generator per image: {n} conditions, {len(generators)} generators")


# ---------------------------------------------------------------- previews while sampling
# A sampling loop reports its progress with `preview(step, total, images)`; whoever runs `sample` (a
# server streaming previews) listens with `previewing(callback)`. Models know nothing of the listener:
# the callback lives in a contextvar, so a plain `sample` call pays one lookup per step.

class SamplingCancelled(Exception):
    """Raised by a preview callback to stop sampling (the client went away); the loop does not catch it."""


#: callback(step, total, images): step 1..total done; images() -> float [N, C, H, W] in [0, 1], the
#: estimate so far (None: nothing to show at this step, only progress). Computed only when called.
PreviewCallback = Callable[[int, int, Optional[Callable[[], torch.Tensor]]], None]
_PREVIEW: ContextVar[Optional[PreviewCallback]] = ContextVar("raygen_sampling_preview", default=None)


@contextmanager
def previewing(callback: Optional[PreviewCallback]) -> Iterator[None]:
    """Calls `callback` at every step of the sampling loops run inside (this thread or task)."""
    token = _PREVIEW.set(callback)
    try:
        yield
    finally:
        _PREVIEW.reset(token)


def preview(step: int, total: int, images: Optional[Callable[[], torch.Tensor]] = None) -> None:
    """Called by sampling loops after each step; may raise `SamplingCancelled`."""
    callback = _PREVIEW.get()
    if callback is not None:
        callback(step, total, images)


@contextmanager
def progress_only() -> Iterator[None]:
    """For a nested sampling call (an upscaler's base model): its steps still tick (and can be cancelled),
    but its images, of another size, are not previews of the outer result."""
    outer = _PREVIEW.get()
    with previewing(None if outer is None else (lambda step, total, images: outer(step, total, None))):
        yield
