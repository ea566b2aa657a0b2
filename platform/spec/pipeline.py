"""A pipeline spec: named stages run in order, later ones using earlier models.

    name: fashion-latent
    stages:
      vae:                      # a job spec: a file (relative to this one) or inline
        spec: vae.yaml
        set: {train.steps: 400}
      latents:                  # not a job spec: encode a dataset with an earlier model
        encode: {model: ${stages.vae.model}, data: fashion-mnist, dtype: float16}
      prior:
        spec: {model: {family: diffusion, components: {vae: ${stages.vae.model}}}, ...}

`${stages.NAME.model}` (in any string of a later stage) becomes that stage's
exported model once it has run, `${stages.NAME.data}` an encode stage's
latent dataset folder (raygen.data.latents). Each stage is validated up
front, with the reference standing in for a model or a dataset, so a typo
fails before the first stage trains.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from raygen.models.capabilities import Capability
from raygen.models.registry import families_with, get_family
from raygen.spec.errors import SpecError, format_pydantic_errors
from raygen.spec.loader import apply_overrides, flatten, parse_spec, read_spec_file
from raygen.spec.schema import JobSpec

REFERENCE = re.compile(r"\$\{stages\.([A-Za-z0-9_\-]+)\.(model|data)\}")
_NAME = r"[A-Za-z0-9][A-Za-z0-9_\-]{0,49}"


class EncodeStageSpec(BaseModel):
    """A stage that encodes a dataset with a frozen model (`raygen data encode`); its output is `${stages.NAME.data}`."""
    model_config = ConfigDict(extra="forbid")
    model: str = Field(description="the encoder: ${stages.X.model}, a run or export folder, or a models:/ URI; "
                                   "its family needs the 'encode' capability")
    data: str = Field(description="the dataset to encode: a built-in name (prepared with the model's data settings), "
                                  "a prepared folder, or ${stages.X.data}")
    batch_size: int = Field(64, ge=1, description="images per encoder call")
    dtype: Literal["float32", "float16"] = Field("float32", description="how the latents are stored")
    workers: int = Field(1, ge=1, description="Ray Train workers")
    use_gpu: bool = False
    shard_rows: int | None = Field(None, ge=1, description="rows per output shard (default: about 8 shards per split)")
    threads: int = Field(1, ge=1, description="CPU threads per encoder call, the same on every worker")
    count: int | None = Field(None, gt=0, description="training images of a built-in dataset (default: the model's)")


class StageSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    spec: str | dict[str, Any] | None = Field(
        None, description="the stage's job spec: a YAML file (relative to the pipeline file) or inline")
    set: dict[str, Any] = Field(default_factory=dict, description="dotted overrides applied to the stage's spec")
    encode: EncodeStageSpec | None = Field(None, description="instead of a spec: encode a dataset into latents")

    @model_validator(mode="after")
    def _one_kind(self) -> "StageSpec":
        if (self.spec is None) == (self.encode is None):
            raise ValueError("a stage has either `spec` (a training job) or `encode` (a dataset to encode), not "
                             + ("both" if self.spec is not None else "neither"))
        if self.encode is not None and self.set:
            raise ValueError("`set` overrides a stage's spec; an encode stage has none: give its options in `encode`")
        return self

    @property
    def kind(self) -> str:
        """"train" or "encode"."""
        return "encode" if self.encode is not None else "train"

    @property
    def output(self) -> str:
        """What `${stages.NAME.<output>}` refers to: "model" or "data"."""
        return "data" if self.encode is not None else "model"


class PipelineSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(description="pipeline name; stage runs are <run_dir>/<name>/<stage>")
    run_dir: str = Field("runs", description="where the pipeline's folder is created")
    stages: dict[str, StageSpec] = Field(description="stages in the order they run")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not re.fullmatch(_NAME, v):
            raise ValueError("name may hold letters, digits, '_' and '-' (at most 50), starting with a letter or digit")
        return v

    @field_validator("stages")
    @classmethod
    def _stages(cls, v: dict) -> dict:
        if not v:
            raise ValueError("a pipeline needs at least one stage")
        for name in v:
            if not re.fullmatch(_NAME, name):
                raise ValueError(f"stage name {name!r} may hold letters, digits, '_' and '-'")
        return v


def is_pipeline(raw: Any) -> bool:
    return isinstance(raw, dict) and "stages" in raw


def substitute(value: Any, outputs: dict[str, str | dict[str, str]], stage: str, earlier: list[str]) -> Any:
    """Replace `${stages.X.model}` / `${stages.X.data}` in every string of
    `value` by X's output: outputs[X] is {"model": path} or {"data": path}
    (a plain string is a model)."""
    if isinstance(value, dict):
        return {k: substitute(v, outputs, stage, earlier) for k, v in value.items()}
    if isinstance(value, list):
        return [substitute(v, outputs, stage, earlier) for v in value]
    if isinstance(value, str):
        def repl(match: re.Match) -> str:
            ref, kind = match.group(1), match.group(2)
            if ref not in earlier:
                where = "is this stage itself or a later one" if ref != stage else "is this stage itself"
                raise SpecError([f"stages.{stage}: ${{stages.{ref}.{kind}}} refers to a stage that "
                                 + (where if ref in outputs or ref == stage else "does not exist")
                                 + f"; a stage may use only earlier stages ({', '.join(earlier) or 'none'})"])
            out = outputs[ref]
            out = {"model": out} if isinstance(out, str) else out
            if kind not in out:
                has = next(iter(out))
                what = {"model": "a training stage: it gives a model", "data": "an encode stage: it gives a dataset"}
                raise SpecError([f"stages.{stage}: ${{stages.{ref}.{kind}}}: stage {ref} is {what[has]}, "
                                 f"${{stages.{ref}.{has}}}"])
            return out[kind]
        return REFERENCE.sub(repl, value)
    return value


def load_pipeline(path: str | Path, overrides: list[str] | None = None) -> tuple[PipelineSpec, Path]:
    raw = read_spec_file(path)
    if overrides:
        raw = apply_overrides(raw, overrides)
    try:
        return PipelineSpec.model_validate(raw), Path(path).resolve().parent
    except ValidationError as err:
        raise SpecError(format_pydantic_errors(err), str(path)) from None


def stage_raw(pipeline: PipelineSpec, base: Path, stage: str) -> dict[str, Any]:
    """The stage's job spec as a dict, overrides applied, references not yet substituted."""
    st = pipeline.stages[stage]
    if st.encode is not None:
        raise SpecError([f"stages.{stage}: an encode stage has no job spec"])
    raw = read_spec_file(base / st.spec) if isinstance(st.spec, str) else dict(st.spec)
    if st.set:  # nested ({train: {steps: 4}}) or dotted ({train.steps: 4}) alike
        raw = apply_overrides(raw, flatten(st.set))
    raw["name"] = f"{pipeline.name}-{stage}"
    return raw


def stage_spec(pipeline: PipelineSpec, base: Path, stage: str, outputs: dict[str, str]) -> JobSpec:
    names = list(pipeline.stages)
    earlier = names[:names.index(stage)]
    raw = substitute(stage_raw(pipeline, base, stage), outputs, stage, earlier)
    try:
        return parse_spec(raw, f"stages.{stage}")
    except SpecError as err:
        raise SpecError([f"stages.{stage}: {p}" for p in err.problems]) from None


def encode_stage(pipeline: PipelineSpec, stage: str, outputs: dict[str, str | dict[str, str]]) -> EncodeStageSpec:
    """An encode stage's options with the references to earlier stages filled in."""
    names = list(pipeline.stages)
    raw = pipeline.stages[stage].encode.model_dump()
    return EncodeStageSpec.model_validate(substitute(raw, outputs, stage, names[:names.index(stage)]))


def validate_pipeline(pipeline: PipelineSpec, base: Path) -> dict[str, JobSpec | EncodeStageSpec]:
    """Every stage checked up front, placeholders standing in for earlier
    stages' models and datasets: training stages parsed as job specs, encode
    stages' references resolved (and an encoder from an earlier stage must
    be of a family that can encode)."""
    placeholders = {name: {st.output: f"<{st.output} of stage {name}>"} for name, st in pipeline.stages.items()}
    out: dict[str, JobSpec | EncodeStageSpec] = {}
    for name, st in pipeline.stages.items():
        if st.encode is None:
            out[name] = stage_spec(pipeline, base, name, placeholders)
            continue
        out[name] = encode_stage(pipeline, name, placeholders)
        ref = REFERENCE.fullmatch(st.encode.model.strip())
        if ref and ref.group(2) == "model" and isinstance(out.get(ref.group(1)), JobSpec):
            family = out[ref.group(1)].model.family
            if Capability.ENCODE not in get_family(family).capabilities:
                raise SpecError([f"stages.{name}.encode.model: stage {ref.group(1)} trains a {family} model, which "
                                 f"cannot encode (it lacks capability 'encode'; families that can: "
                                 f"{', '.join(families_with(Capability.ENCODE)) or 'none'})"])
    return out
