"""Turn a generate request's JSON body into a plan for one model, or a 4xx.

No Ray and no server: every rule here is tested in plain Python. The rules
come from the model's own types: its condition kind checks the condition
field (`ConditionKind.parse`, e.g. the one case-insensitive label parser) and
its family's `SamplingParams` check the sampling parameters (`parse_params`).
Each rejection names the field and what would be accepted.
"""
from __future__ import annotations

import functools
import secrets
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from raygen.serving.schema import MAX_RENDER_PIXELS, MAX_SEED, GenerateCommon


class RequestError(Exception):
    """A request the server will not run; becomes `{"error", "field"}` with `status`."""

    def __init__(self, message: str, field: str | None = None, status: int = 422, *,
                 headers: dict | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.field = field
        self.status = status
        self.headers = headers  # e.g. Retry-After with a 503
        self.code = code        # a short machine-readable reason (OpenAI's error.code)


@dataclass(frozen=True)
class ServedModel:
    """A served model as request validation sees it: its card (`loading.model_card`)
    and the typed objects the card names."""
    card: dict
    data_info: Any               # raygen.models.DataInfo
    kind: Any                    # raygen.models.conditions.ConditionKind
    params_cls: type             # the family's SamplingParams subclass

    @property
    def name(self) -> str:
        return self.card["name"]

    @classmethod
    def from_card(cls, card: dict, params_cls: type | None = None) -> "ServedModel":
        """`params_cls` defaults to the registered family's (its module must be imported)."""
        from raygen.models import DataInfo, get_family
        from raygen.models.conditions import get_kind

        params_cls = params_cls or get_family(card["family"]).sampling_params
        return cls(card=card, data_info=DataInfo.from_dict(card["data"]), kind=get_kind(card["condition"]["kind"]),
                   params_cls=params_cls)


@dataclass(frozen=True)
class SampleJob:
    """What a generator replica runs for one request: n images, image i with
    seed `seed + i`, all with one condition value and one set of params."""
    n: int
    seed: int
    kind: str
    condition: Any               # the parsed condition value (None: unconditioned)
    params: dict[str, Any]       # validated sampling params, as JSON values
    size: tuple[int, int] | None = None  # (height, width) to render at; None: the model's own size


@dataclass(frozen=True)
class Plan:
    model: str
    job: SampleJob
    keep: int                  # images returned (k when reranking, else n)
    rerank_text: str | None    # set when best_of asks for reranking
    format: str
    stream: bool = False       # server-sent events; sampled alone, never merged with other requests
    partial_images: int = 0    # previews sent while sampling (with stream)


def _show(names: list[str], limit: int = 12) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def integral(values: dict[str, Any], integer_fields) -> dict[str, Any]:
    """JSON Schema's integers: 2.0 is the integer 2 for an integer field (2.5, "2" and true are not)."""
    return {k: (int(v) if k in integer_fields and isinstance(v, float) and v.is_integer() else v)
            for k, v in values.items()}


@functools.lru_cache(maxsize=None)
def integer_fields(cls: type) -> frozenset[str]:
    """The fields of a pydantic model whose JSON schema type is integer."""
    props = cls.model_json_schema().get("properties", {})
    return frozenset(k for k, p in props.items()
                     if p.get("type") == "integer" or {b.get("type") for b in p.get("anyOf", [])} - {"null"} ==
                     {"integer"})


def field_error(err: ValidationError, status: int = 422) -> RequestError:
    """The first problem of a pydantic error as a RequestError naming its field (and the value sent)."""
    first = err.errors()[0]
    field = str(first["loc"][0]) if first["loc"] else None
    message = f"{field}: {first['msg']}"
    if "input" in first and not isinstance(first["input"], (dict, list)) and first["type"] != "missing":
        message += f" (got {first['input']!r})"
    return RequestError(message, field, status)


def _common(body: dict) -> GenerateCommon:
    values = integral({k: v for k, v in body.items() if k in GenerateCommon.model_fields},
                      integer_fields(GenerateCommon))
    try:
        return GenerateCommon.model_validate(values)
    except ValidationError as err:
        raise field_error(err) from None


def pick_model(name: str | None, models: dict[str, ServedModel], default: str) -> ServedModel:
    name = name or default
    if name not in models:
        raise RequestError(f"unknown model {name!r}; served models: {_show(list(models))}", "model", 404)
    return models[name]


def parse_condition(model: ServedModel, given: dict[str, Any]) -> Any:
    """The one condition value of a request, parsed by the model's condition kind.

    `given` maps the condition fields the client sent (label, caption, scene,
    image) to their values; a field of another kind is refused."""
    from raygen.models import ConditionError

    kind, name = model.kind, model.name
    for field in given:
        if field != kind.field:
            if kind.name == "none":
                raise RequestError(f"model {name!r} is unconditional and takes no {field}; leave {field!r} out", field)
            raise RequestError(f"model {name!r} conditions on {kind.field}s, not {field}s; leave {field!r} out "
                               f"and use {kind.field!r}", field)
    value = given.get(kind.field) if kind.field else None
    try:
        if value is None:
            kind.columns([None], model.data_info)  # kinds that cannot go without a value say so here
            return None
        return kind.parse(value, model.data_info)
    except ConditionError as err:
        raise RequestError(err.message, err.field) from None


def parse_sampling(model: ServedModel, values: dict[str, Any]) -> dict[str, Any]:
    """Validated sampling params (JSON values, defaults filled in), checked by the family's own type."""
    from raygen.models import SamplingParamsError, parse_params

    accepted = list(model.params_cls.model_fields)
    for key in values:
        if key not in accepted:
            takes = f"its sampling parameters are {', '.join(accepted)}" if accepted else \
                "it takes no sampling parameters"
            raise RequestError(f"unknown field {key!r} for model {model.name!r}: {takes}; the common fields are "
                               f"{', '.join(GenerateCommon.model_fields)}"
                               + (f", and {model.kind.field!r}" if model.kind.field else ""), key)
    try:
        params = parse_params(model.params_cls, integral(values, integer_fields(model.params_cls)), strict=True)
    except SamplingParamsError as err:
        raise RequestError(err.message, err.field) from None
    return params.model_dump(mode="json")


def render_size(model: ServedModel, height: int | None, width: int | None, n: int) -> tuple[int, int] | None:
    """(height, width) for a model that renders at any size; None when the request leaves both out."""
    if height is None and width is None:
        return None
    field = "height" if height is not None else "width"
    if "render" not in model.card.get("capabilities", ()):
        from raygen.models import families_with
        can = ", ".join(families_with("render")) or "none loaded"
        raise RequestError(f"model {model.name!r} draws {model.data_info.height}x{model.data_info.width} images and "
                           f"cannot render at another size (families that can: {can}); leave {field!r} out", field)
    size = (height or model.data_info.height, width or model.data_info.width)
    if n * size[0] * size[1] > MAX_RENDER_PIXELS:
        raise RequestError(f"{n} images of {size[0]}x{size[1]} are {n * size[0] * size[1]} pixels; at most "
                           f"{MAX_RENDER_PIXELS} per request: lower n, height or width", "n")
    return size


def resolve(body: Any, models: dict[str, ServedModel], *, default_model: str, max_n: int,
            reranking: str, rng_seed: int | None = None) -> Plan:
    """`body` is the parsed JSON. `reranking` is "ready", "off" (no --scorer) or
    "unavailable" (scorer asked for, not loadable)."""
    from raygen.models.conditions import condition_fields

    if not isinstance(body, dict):
        raise RequestError(f"the body must be a JSON object of request fields, got {type(body).__name__}", "body")
    req = _common(body)
    model = pick_model(req.model, models, default_model)
    cond_fields = condition_fields()
    given = {k: v for k, v in body.items() if k in cond_fields and v is not None}
    extras = {k: v for k, v in body.items() if k not in GenerateCommon.model_fields and k not in cond_fields}

    if req.partial_images and not req.stream:
        raise RequestError("partial_images needs stream: true (previews are sent as server-sent events)",
                           "partial_images")
    if req.stream and req.format == "png":
        raise RequestError("a stream sends JSON events with base64 PNGs: leave format out (or base64) with stream",
                           "format")
    n = req.n if req.n is not None else 1
    if n > max_n:
        raise RequestError(f"n must be between 1 and {max_n} (serve.max_n), got {n}", "n")
    takes_text = model.kind.name == "caption"
    if takes_text and "caption" not in given and req.prompt is not None:
        given["caption"] = req.prompt
    condition = parse_condition(model, given)
    params = parse_sampling(model, extras)

    rerank_text = None
    keep = n
    if req.best_of is None:
        if req.k is not None:
            raise RequestError("k only applies with best_of; use n for the number of images", "k")
        if req.prompt is not None and not takes_text:
            raise RequestError(f"model {model.name!r} takes no text; 'prompt' is only used to rerank with best_of",
                               "prompt")
    else:
        if reranking == "off":
            raise RequestError("best_of needs a CLIP scorer; start the server with --scorer", "best_of", 400)
        if reranking == "unavailable":
            raise RequestError("best_of is unavailable on this server: --scorer was given but its loader could not "
                               "be imported (see the server's start-up note)", "best_of", 501)
        if req.best_of > max_n:
            raise RequestError(f"best_of must be between 1 and {max_n} (serve.max_n), got {req.best_of}", "best_of")
        if req.k is not None and req.n is not None and req.k != req.n:
            raise RequestError(f"give the number of images to keep once: k={req.k} and n={req.n} differ", "k")
        keep = req.k if req.k is not None else n
        if keep > req.best_of:
            raise RequestError(f"cannot keep {keep} of best_of={req.best_of} candidates; k must be <= best_of", "k")
        rerank_text = req.prompt
        # otherwise the condition as text, for any kind that has one (a caption; a label by its class name)
        if rerank_text is None and condition is not None and (model.kind.name != "label" or
                                                              model.data_info.class_names):
            rerank_text = model.kind.text(condition, model.data_info)
        if rerank_text is None:
            raise RequestError("best_of needs text to score against: give 'prompt' (or 'caption', or a label of a "
                               "model with class names)", "prompt")
        n = req.best_of

    # a drawn seed stays below 2**31 so it is easy to copy back into a request
    seed = req.seed if req.seed is not None else (rng_seed if rng_seed is not None else secrets.randbelow(2**31))
    if seed + n - 1 > MAX_SEED:
        raise RequestError(f"seed must be at most {MAX_SEED - n + 1} for {n} images (image i uses seed+i), got {seed}",
                           "seed")
    size = render_size(model, req.height, req.width, n)
    job = SampleJob(n=n, seed=seed, kind=model.kind.name, condition=condition, params=params, size=size)
    return Plan(model=model.name, job=job, keep=keep, rerank_text=rerank_text, format=req.format,
                stream=bool(req.stream), partial_images=req.partial_images or 0)
