"""HTTP request and response bodies of the serving API.

Known fields are strict (no "4" for 4, no true for 1): a client that sends the
wrong type hears about it instead of getting a silently coerced request.
Extra top-level fields are allowed by the schema only so that each model's own
sampling options (`Generator.sampling_options`) can be given flat beside the
common ones; `raygen.serving.requests.resolve` rejects any extra field the
chosen model does not accept.
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

# Seeds are fed to torch.Generator.manual_seed, which takes a 64-bit value.
MAX_SEED = 2**63 - 1


class GenerateRequest(BaseModel):
    model_config = ConfigDict(
        extra="allow", strict=True,
        json_schema_extra={"examples": [{"n": 4, "label": 3, "seed": 0},
                                        {"n": 1, "caption": "a red circle", "seed": 7, "format": "png"},
                                        {"best_of": 8, "k": 2, "prompt": "a red circle", "seed": 1}]})

    n: int | None = Field(None, ge=1, description="images to return (1..serve.max_n); default 1")
    model: str | None = Field(None, min_length=1, description="model name from /v1/models; default: the first model")
    label: int | str | None = Field(None, description="class index (0..num_classes-1) or class name, for class-conditional models")
    caption: str | None = Field(None, min_length=1, max_length=2000, description="text condition, for models trained with captions")
    prompt: str | None = Field(None, min_length=1, max_length=2000,
                               description="text for best_of reranking; also the caption when no caption is given and the model takes captions")
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="same seed, same images; default: a random seed, returned in the response")
    format: Literal["base64", "png"] = Field("base64", description="base64: JSON with base64 PNGs; png: one image/png (a grid when more than one)")
    best_of: int | None = Field(None, ge=1, description="generate this many candidates and keep the k best by CLIP score (needs --scorer)")
    k: int | None = Field(None, ge=1, description="with best_of: how many to return; default n")

    def sampling_values(self) -> dict[str, Any]:
        """The extra (model-specific) fields the client sent."""
        return dict(self.model_extra or {})


class ImageOut(BaseModel):
    png_base64: str
    score: float | None = Field(None, description="CLIP score against the prompt when reranked, else null")


class GenerateResponse(BaseModel):
    model: str
    run_id: str | None
    images: list[ImageOut]
    seed: int
    elapsed_ms: float


class ErrorBody(BaseModel):
    error: str
    field: str | None = None


class SamplingOptionInfo(BaseModel):
    type: str
    default: Any = None
    help: str = ""


class DataInfoOut(BaseModel):
    resolution: int
    channels: int
    num_classes: int
    class_names: list[str]
    has_captions: bool


class ModelInfo(BaseModel):
    name: str
    family: str
    run_id: str | None
    source: str
    conditioning: Literal["none", "label", "caption"] = Field(
        description="what generate accepts: label (class index or name), caption (text), or neither")
    data: DataInfoOut
    sampling_options: dict[str, SamplingOptionInfo]
    device: str
    parameters: int
    replicas: int


class ModelsResponse(BaseModel):
    models: list[ModelInfo]
    default_model: str
    max_n: int
    reranking: Literal["ready", "off", "unavailable"]


class HealthResponse(BaseModel):
    status: Literal["ok"]
    models: list[str]
    reranking: Literal["ready", "off", "unavailable"]
