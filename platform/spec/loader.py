"""Load a job spec from YAML, apply dotted overrides, validate it whole."""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Iterable

import yaml
from pydantic import ValidationError

from raygen.spec.errors import SpecError, format_pydantic_errors
from raygen.spec.schema import JobSpec


def parse_value(text: str) -> Any:
    """CLI values are YAML scalars: `1e-3`, `true`, `[4, 8]`, `gpt2`."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    # YAML 1.1 reads '1e-3' as a string; users mean a float.
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def set_dotted(tree: dict, dotted: str, value: Any) -> None:
    """Set `a.b.c` in a nested dict, creating sections as needed."""
    keys = dotted.split(".")
    node = tree
    for i, key in enumerate(keys[:-1]):
        child = node.get(key)
        if child is None:
            child = node[key] = {}
        if not isinstance(child, dict):
            raise SpecError([f"{'.'.join(keys[:i + 1])}: is a value, not a section; cannot set '{dotted}'"])
        node = child
    node[keys[-1]] = value


def apply_overrides(raw: dict, overrides: Iterable[str] | dict[str, Any]) -> dict:
    """Return a copy of `raw` with `key.path=value` overrides applied."""
    raw = copy.deepcopy(raw)
    if isinstance(overrides, dict):
        items = list(overrides.items())
    else:
        items = []
        for item in overrides:
            if "=" not in item:
                raise SpecError([f"override '{item}' must look like key.path=value, e.g. train.optimizer.lr=1e-3"])
            key, _, text = item.partition("=")
            items.append((key.strip(), parse_value(text)))
    for key, value in items:
        if not key or any(not part for part in key.split(".")):
            raise SpecError([f"override key '{key}' is not a dotted path such as train.steps"])
        set_dotted(raw, key, value)
    return raw


def parse_spec(raw: dict | None, source: str | None = None) -> JobSpec:
    """Validate a spec dict; every problem is reported with its YAML path."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise SpecError([f"the spec must be a mapping of sections (data, model, train, ...), got {type(raw).__name__}"], source)
    try:
        return JobSpec.model_validate(raw)
    except ValidationError as err:
        raise SpecError(format_pydantic_errors(err), source) from None


def read_spec_file(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise SpecError([f"spec file not found: {path}"])
    try:
        return yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise SpecError([f"not valid YAML{where}: {getattr(err, 'problem', err)}"], str(path)) from None


def load_spec(path: str | Path | None = None, overrides: Iterable[str] | dict | None = None) -> JobSpec:
    raw = read_spec_file(path) if path is not None else {}
    if overrides:
        raw = apply_overrides(raw, overrides)
    return parse_spec(raw, str(path) if path is not None else None)


def spec_to_dict(spec: JobSpec) -> dict:
    return spec.model_dump(mode="json")


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """`{"a": {"b": 1}}` -> `{"a.b": 1}` (what MLflow logs as params)."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, dotted + "."))
        else:
            out[dotted] = value
    return out
