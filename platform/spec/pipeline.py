"""A pipeline spec: named stages run in order, later ones using earlier models.

    name: fashion-latent
    stages:
      vae:                      # a job spec: a file (relative to this one) or inline
        spec: vae.yaml
        set: {train.steps: 400}
      prior:
        spec: {model: {family: diffusion, components: {vae: ${stages.vae.model}}}, ...}

`${stages.NAME.model}` (in any string of a later stage) becomes that stage's
exported model once it has run. Each stage is validated as a job spec up
front, with the reference standing in for a model, so a typo fails before the
first stage trains.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from raygen.spec.errors import SpecError, format_pydantic_errors
from raygen.spec.loader import apply_overrides, flatten, parse_spec, read_spec_file
from raygen.spec.schema import JobSpec

REFERENCE = re.compile(r"\$\{stages\.([A-Za-z0-9_\-]+)\.(model)\}")
_NAME = r"[A-Za-z0-9][A-Za-z0-9_\-]{0,49}"


class StageSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    spec: str | dict[str, Any] = Field(description="the stage's job spec: a YAML file (relative to the pipeline file) or inline")
    set: dict[str, Any] = Field(default_factory=dict, description="dotted overrides applied to the stage's spec")


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


def substitute(value: Any, outputs: dict[str, str], stage: str, earlier: list[str]) -> Any:
    """Replace `${stages.X.model}` in every string of `value` by outputs[X]."""
    if isinstance(value, dict):
        return {k: substitute(v, outputs, stage, earlier) for k, v in value.items()}
    if isinstance(value, list):
        return [substitute(v, outputs, stage, earlier) for v in value]
    if isinstance(value, str):
        def repl(match: re.Match) -> str:
            ref = match.group(1)
            if ref not in earlier:
                where = "is this stage itself or a later one" if ref != stage else "is this stage itself"
                raise SpecError([f"stages.{stage}: ${{stages.{ref}.model}} refers to a stage that "
                                 + (where if ref in outputs or ref == stage else "does not exist")
                                 + f"; a stage may use only earlier stages ({', '.join(earlier) or 'none'})"])
            return outputs[ref]
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


def validate_pipeline(pipeline: PipelineSpec, base: Path) -> dict[str, JobSpec]:
    """Every stage parsed up front, a placeholder standing in for earlier models."""
    placeholders = {name: f"<model of stage {name}>" for name in pipeline.stages}
    return {name: stage_spec(pipeline, base, name, placeholders) for name in pipeline.stages}
