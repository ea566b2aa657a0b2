"""HTTP bodies of the serving API.

A generate request is the common fields below (`GenerateCommon`), plus the
condition field of the chosen model's kind (`label`, `caption`, `scene` or
`image`), plus that model's sampling parameters (its family's
`SamplingParams`), all flat in one JSON object. The common fields are strict
(no "4" for 4, no true for 1); the rest is checked by the model's own types
(`raygen.serving.requests.resolve`). The OpenAPI schema of the request is
generated per served model from the same types (`request_schemas`), so it
documents every parameter with its type, range and default.
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

# Seeds are fed to torch.Generator.manual_seed, which takes a 64-bit value.
MAX_SEED = 2**63 - 1
#: the largest side a render-capable model draws at, and the most pixels one request may ask for
#: (n x height x width): a decoder that runs per pixel holds activations for all of them at once
MAX_RENDER_SIDE = 512
MAX_RENDER_PIXELS = 2**20


class GenerateCommon(BaseModel):
    """The fields every model takes."""
    model_config = ConfigDict(extra="forbid", strict=True)

    n: int | None = Field(None, ge=1, description="images to return (1..serve.max_n); default 1")
    model: str | None = Field(None, min_length=1, description="model name from /v1/models; default: the first model")
    prompt: str | None = Field(None, min_length=1, max_length=2000,
                               description="text for best_of reranking; also the caption when no caption is given "
                                           "and the model takes captions")
    seed: int | None = Field(None, ge=0, le=MAX_SEED,
                             description="image i uses seed+i: same seed, same images; default: a random seed, "
                                         "returned in the response")
    format: Literal["base64", "png"] = Field("base64", description="base64: JSON with base64 PNGs; png: one "
                                                                   "image/png (a grid when more than one)")
    best_of: int | None = Field(None, ge=1, description="generate this many candidates and keep the k best by CLIP "
                                                        "score (needs --scorer)")
    k: int | None = Field(None, ge=1, description="with best_of: how many to return; default n")
    height: int | None = Field(None, ge=1, le=MAX_RENDER_SIDE,
                               description="render at this height (models that can render at any size, e.g. inr); "
                                           "default: the model's own")
    stream: bool | None = Field(None, description="true: answer with server-sent events: `preview` events "
                                "(partial_images of them), then `result` (this route's JSON) or `error`")
    partial_images: int | None = Field(None, ge=0, le=3, description="with stream: how many previews to send "
                                       "while sampling (0..3; the sampling loop's estimate so far)")
    width: int | None = Field(None, ge=1, le=MAX_RENDER_SIDE,
                              description="render at this width (models that can render at any size); default: the "
                                          "model's own")


#: the fields every model takes; the condition field and the model's sampling parameters come on top
COMMON_FIELDS = tuple(GenerateCommon.model_fields)


class ImageOut(BaseModel):
    png_base64: str
    seed: int = Field(description="this image's own seed: a request with n=1 and this seed draws it again")
    score: float | None = Field(None, description="CLIP score against the prompt when reranked, else null")


class GenerateResponse(BaseModel):
    model: str
    run_id: str | None
    images: list[ImageOut]
    seed: int = Field(description="the request's seed (image i of the candidates used seed+i)")
    elapsed_ms: float


class ErrorBody(BaseModel):
    error: str
    field: str | None = None


class OpenAIError(BaseModel):
    message: str
    type: str = Field(description="invalid_request_error, authentication_error, rate_limit_error or server_error")
    param: str | None = Field(None, description="the request field at fault")
    code: str | None = None


class OpenAIErrorBody(BaseModel):
    error: OpenAIError


class ImageData(BaseModel):
    b64_json: str | None = None
    url: str | None = Field(None, description="with response_format url: a link under /v1/files/")
    expires_at: int | None = Field(None, description="unix time after which the url answers 404")
    revised_prompt: str | None = Field(None, description="the text the model used: the caption or the class name")
    seed: int
    score: float | None = Field(None, description="CLIP score when reranked with best_of, else null")


class ImagesResponse(BaseModel):
    """OpenAI's images response, plus raygen's model, run_id and seed."""
    created: int
    data: list[ImageData]
    size: str
    output_format: Literal["png", "jpeg", "webp"]
    model: str
    run_id: str | None
    seed: int


class ConditionInfo(BaseModel):
    kind: str = Field(description="none, label, caption, scene or image")
    field: str | None = Field(description="the request field that carries it (null: unconditional)")
    description: str
    schema_: dict[str, Any] | None = Field(alias="schema", description="JSON schema of the field's value")


class ServingMemory(BaseModel):
    """A model's serving memory, measured when the replica loaded it (`raygen.serving.memory`)."""
    batch: int = Field(description="images in the measured sample: serve.max_batch_size")
    weights_bytes: int = Field(description="parameters and buffers")
    activation_bytes: int | None = Field(description="peak bytes of the tensors a sample at that batch holds")
    resident_bytes: int | None = Field(description="what the process grew by, from before the weights to the "
                                                   "sample's peak (resident memory; the allocator's on a GPU)")
    ratio: float | None = Field(description="resident / (weights + activations)")
    target_ratio: float
    load_peak_bytes: int | None = Field(None, description="the loader's peak growth (two copies of the weights "
                                                         "for a moment), not part of resident_bytes")
    runtime_bytes: int | None = Field(None, description="torch's once-per-process set-up, measured before the "
                                                        "weights and not counted in resident_bytes")
    warmup_ms: float | None = None
    note: str | None = None


class ModelInfo(BaseModel):
    model_config = ConfigDict(populate_by_name=True)

    name: str
    family: str
    capabilities: list[str]
    condition: ConditionInfo
    params: dict[str, Any] = Field(description="JSON schema of the model's sampling parameters")
    run_id: str | None
    source: str
    data: dict[str, Any] = Field(description="channels, height, width, resolution, num_classes, class_names, "
                                             "has_captions, condition_columns")
    device: str
    parameters: int
    memory_bytes: int = Field(description="bytes of the model's weights in memory")
    registry: dict[str, Any] | None = Field(None, description="{name, version, alias} when served from the MLflow "
                                                               "registry (models:/NAME/VERSION or models:/NAME@ALIAS)")
    replicas: int
    multiplexed: bool = Field(False, description="loaded on demand in a shared deployment (serve.multiplexed)")
    serving_memory: ServingMemory | None = Field(None, description="measured at load (null: multiplexed)")


class ModelsResponse(BaseModel):
    models: list[ModelInfo]
    default_model: str
    max_n: int
    reranking: Literal["ready", "off", "unavailable"]


class HealthResponse(BaseModel):
    status: Literal["ok"]
    models: list[str]
    reranking: Literal["ready", "off", "unavailable"]


def _component(name: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in name)


def request_schemas(cards: list[dict[str, Any]], *, default_model: str, max_n: int,
                    reranking: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The request body's JSON schema (anyOf one schema per model) and the
    components it refers to, for the OpenAPI document.

    Each model's schema holds the common fields (n and best_of capped at
    max_n), its condition field and its sampling parameters, and no other
    field. `model` may be left out for the default model only. best_of and k
    appear only when reranking is ready. What JSON schema cannot say is
    checked by `requests.resolve` alone: k <= best_of, and k and n equal when
    both are given with best_of."""
    common = {}
    for key, prop in GenerateCommon.model_json_schema()["properties"].items():
        # documented without null (the server takes null as absent), so "k needs best_of" holds in the schema
        branches = [b for b in prop.pop("anyOf", []) if b.get("type") != "null"]
        entry = {**prop, **(branches[0] if len(branches) == 1 else {"anyOf": branches} if branches else {})}
        if "default" in entry and entry["default"] is None:
            del entry["default"]
        common[key] = entry
    common["n"].update(maximum=max_n)
    common["best_of"].update(maximum=max_n)
    common["k"].update(maximum=max_n)
    common["seed"].update(maximum=MAX_SEED - max_n + 1)  # image i uses seed + i: this seed serves any n
    components: dict[str, Any] = {}
    branches = []
    for card in cards:
        name = card["name"]
        params = dict(card["params"])
        prefix = f"{_component(card['family'])}."
        for def_name, def_schema in params.pop("$defs", {}).items():
            components[prefix + def_name] = def_schema
        params_props = _rewrite_refs(params.get("properties", {}), prefix)
        props = {k: dict(v) for k, v in common.items()}
        props["model"] = {"const": name, "description": common["model"]["description"]}
        takes_text = card["condition"]["kind"] == "caption"
        if reranking != "ready":
            props.pop("best_of"), props.pop("k")
            if not takes_text:
                props.pop("prompt")
        cond = card["condition"]
        if cond["field"]:
            props[cond["field"]] = cond["schema"]
        props.update(params_props)
        schema: dict[str, Any] = {"title": f"GenerateRequest[{name}]", "type": "object",
                                  "additionalProperties": False, "properties": props,
                                  "description": f"a request for model {name!r} ({card['family']}, conditioned on "
                                                 f"{cond['kind']})"}
        if name != default_model:
            schema["required"] = ["model"]
        if reranking == "ready":
            schema["dependentRequired"] = {"k": ["best_of"], **({} if takes_text else {"prompt": ["best_of"]})}
            # best_of scores against a text: the prompt, a caption, or the class name of a label
            texts = ["prompt"] + ([cond["field"]] if takes_text or (cond["kind"] == "label" and
                                                                      card["data"].get("class_names")) else [])
            schema["dependentSchemas"] = {"best_of": {"anyOf": [{"required": [t]} for t in texts]}}
        key = f"GenerateRequest.{_component(name)}"
        components[key] = schema
        branches.append({"$ref": f"#/components/schemas/{key}"})
    return {"anyOf": branches} if len(branches) > 1 else branches[0], components


def _rewrite_refs(node: Any, prefix: str) -> Any:
    """Point pydantic's `#/$defs/X` references at `#/components/schemas/<prefix>X`."""
    if isinstance(node, dict):
        return {k: (f"#/components/schemas/{prefix}{v.rsplit('/', 1)[-1]}"
                    if k == "$ref" and isinstance(v, str) and v.startswith("#/$defs/") else _rewrite_refs(v, prefix))
                for k, v in node.items()}
    if isinstance(node, list):
        return [_rewrite_refs(v, prefix) for v in node]
    return node
