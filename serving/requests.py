"""Turn a validated `GenerateRequest` into a plan for one model, or a 4xx.

Pure Python (no Ray, no torch) so every rule here is tested without a server.
Each rejection names the field and what would be accepted.
"""
from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from typing import Any

from raygen.serving.schema import GenerateRequest

_TYPES = {"int": int, "float": float, "bool": bool, "str": str}


class RequestError(Exception):
    """A request the server will not run; becomes `{"error", "field"}` with `status`."""

    def __init__(self, message: str, field: str | None = None, status: int = 422):
        super().__init__(message)
        self.message = message
        self.field = field
        self.status = status


@dataclass(frozen=True)
class SampleJob:
    """What a generator replica runs for one request."""
    n: int
    seed: int
    label: int | None = None
    caption: str | None = None
    options: dict[str, Any] = field(default_factory=dict)

    def options_key(self) -> tuple:
        return tuple(sorted(self.options.items()))


@dataclass(frozen=True)
class Plan:
    model: str
    job: SampleJob
    keep: int                  # images returned (k when reranking, else n)
    rerank_text: str | None    # set when best_of asks for reranking
    format: str


def _show(names: list[str], limit: int = 12) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def pick_model(req: GenerateRequest, infos: dict[str, dict], default: str) -> dict:
    name = req.model or default
    if name not in infos:
        raise RequestError(f"unknown model {name!r}; served models: {_show(list(infos))}", "model", 404)
    return infos[name]


def resolve_label(value: int | str | None, info: dict) -> int | None:
    if value is None:
        return None
    data = info["data"]
    num, names = data["num_classes"], data["class_names"]
    if info["conditioning"] != "label" or num == 0:
        hint = "use 'caption' instead" if info["conditioning"] == "caption" else "leave 'label' out"
        kind = "conditions on captions, not labels" if info["conditioning"] == "caption" else "is unconditional"
        raise RequestError(f"model {info['name']!r} {kind} and takes no label; {hint}", "label")
    if isinstance(value, str):
        if value in names:
            return names.index(value)
        lowered = [n.lower() for n in names]
        if value.lower() in lowered:
            return lowered.index(value.lower())
        accepted = f"a class name ({_show(names)}) or " if names else ""
        raise RequestError(f"unknown label {value!r}; give {accepted}an integer 0..{num - 1}", "label")
    if not 0 <= value < num:
        raise RequestError(f"label {value} is out of range; this model has {num} classes (0..{num - 1})", "label")
    return value


def check_option(name: str, value: Any, spec: dict) -> Any:
    """Check one sampling option against its declared (type, default, help)."""
    typ = _TYPES.get(spec["type"])
    if typ is None:  # a type the API cannot describe: let the model judge it
        return value
    ok = isinstance(value, typ) and not (typ is not bool and isinstance(value, bool))
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        ok, value = True, float(value)
    if not ok:
        raise RequestError(f"{name} must be of type {spec['type']} (default {spec.get('default')!r}), "
                           f"got {type(value).__name__} {value!r}", name)
    return value


def resolve(req: GenerateRequest, infos: dict[str, dict], *, default_model: str, max_n: int,
            reranking: str, rng_seed: int | None = None) -> Plan:
    """`reranking` is "ready", "off" (no --scorer) or "unavailable" (scorer asked for, not loadable)."""
    info = pick_model(req, infos, default_model)
    data = info["data"]

    # model-specific sampling options: every extra field must be one the model declares
    declared = info["sampling_options"]
    options = {}
    for key, value in req.sampling_values().items():
        if key not in declared:
            accepted = f"; sampling options of {info['name']!r}: {', '.join(declared)}" if declared else \
                f"; {info['name']!r} takes no sampling options"
            raise RequestError(f"unknown field {key!r}{accepted}", key)
        options[key] = check_option(key, value, declared[key])

    n = req.n if req.n is not None else 1
    if n > max_n:
        raise RequestError(f"n must be between 1 and {max_n} (serve.max_n), got {n}", "n")

    label = resolve_label(req.label, info)

    takes_text = info["conditioning"] == "caption"
    caption = req.caption
    if caption is not None and not takes_text:
        raise RequestError(f"model {info['name']!r} does not condition on captions; leave 'caption' out"
                           + (" and use 'label'" if info["conditioning"] == "label" else ""), "caption")
    if caption is None and req.prompt is not None and takes_text:
        caption = req.prompt

    rerank_text = None
    keep = n
    if req.best_of is None:
        if req.k is not None:
            raise RequestError("k only applies with best_of; use n for the number of images", "k")
        if req.prompt is not None and not takes_text:
            raise RequestError(f"model {info['name']!r} takes no text; 'prompt' is only used to rerank with best_of",
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
        rerank_text = req.prompt or caption
        if rerank_text is None and label is not None and data["class_names"]:
            rerank_text = data["class_names"][label]
        if rerank_text is None:
            raise RequestError("best_of needs text to score against: give 'prompt' (or 'caption', or a label of a "
                               "model with class names)", "prompt")
        n = req.best_of

    # a drawn seed stays below 2**31 so it is easy to copy back into a request
    seed = req.seed if req.seed is not None else (rng_seed if rng_seed is not None else secrets.randbelow(2**31))
    job = SampleJob(n=n, seed=seed, label=label, caption=caption, options=options)
    return Plan(model=info["name"], job=job, keep=keep, rerank_text=rerank_text, format=req.format)
