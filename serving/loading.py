"""Loading what a server needs: plug-in modules, models and their public description."""
from __future__ import annotations

import importlib
import importlib.util
import re
import sys
from pathlib import Path
from typing import Any

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,99}")


def import_modules(imports: list[str]) -> None:
    """Import modules that register model families living outside raygen.

    Each entry is a module name (`my_pkg.families`) or a `.py` file path; a
    file is loaded under its stem unless a module of that name is loaded
    already. Runs in the driver and again in every replica, since a family
    registered in one process is unknown to the others.
    """
    for entry in imports:
        if entry.endswith(".py") or "/" in entry:
            path = Path(entry).expanduser().resolve()
            if not path.is_file():
                raise FileNotFoundError(f"--import {entry}: no such file")
            name = path.stem
            if name in sys.modules:
                continue
            spec = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module
            try:
                spec.loader.exec_module(module)
            except BaseException:
                del sys.modules[name]
                raise
        else:
            importlib.import_module(entry)


def parse_model_arg(arg: str) -> tuple[str | None, str]:
    """`NAME=URI` names a model; a bare URI takes its name from the model's spec."""
    name, sep, uri = arg.partition("=")
    if sep and uri and _NAME.fullmatch(name) and "/" not in name:
        return name, uri
    return None, arg


def check_model_name(name: str) -> str:
    if not _NAME.fullmatch(name):
        raise ValueError(f"model name {name!r} may hold letters, digits, '.', '_' and '-' (at most 100)")
    return name


def default_name(loaded) -> str:
    """The registered model name for MLflow models, else the job name of its spec."""
    return loaded.meta.get("name") or getattr(loaded.spec, "name", None) or loaded.meta.get("family", "model")


def condition_schema(kind, info) -> dict[str, Any]:
    """The JSON schema of a condition value for one model: the kind's own schema,
    narrowed to this model's data where the data says more (class names and
    count, scene fields)."""
    if kind.name == "label" and info.num_classes:
        index = {"type": "integer", "minimum": 0, "maximum": info.num_classes - 1}
        if info.class_names:
            return {"anyOf": [index, {"type": "string", "enum": list(info.class_names)}],
                    "description": kind.description}
        return {**index, "description": kind.description}
    if kind.name == "scene":
        objects = info.condition_columns.get(getattr(kind, "objects_column", "scene"))
        if objects and objects.get("fields"):
            def row(column):
                # the data's value ranges, when it records them, bound each field (the model refuses others)
                ranges = column.get("ranges") or {}
                return {"type": "object", "additionalProperties": False, "required": list(column["fields"]),
                        "properties": {f: {"type": "number", **({"minimum": ranges[f][0], "maximum": ranges[f][1]}
                                                                if f in ranges else {})}
                                       for f in column["fields"]}}
            schema = {"type": "object", "additionalProperties": False, "required": ["objects"],
                      "description": kind.description,
                      "properties": {"objects": {"type": "array", "items": row(objects), "minItems": 1}}}
            if objects.get("max_len"):
                schema["properties"]["objects"]["maxItems"] = int(objects["max_len"])
            globals_ = info.condition_columns.get(getattr(kind, "globals_column", "scene_globals"))
            if globals_ and globals_.get("fields"):
                schema["properties"]["globals"] = row(globals_)
                schema["required"].append("globals")
            return schema
    return {**kind.json_schema, "description": kind.description}


def model_card(loaded, *, name: str) -> dict[str, Any]:
    """What a server knows about one model before any replica starts: `/v1/models`
    shows it, the OpenAPI schema and the playground are generated from it, and
    request validation checks against it. JSON only (it travels to the ingress).

    Refuses, with one line, a model the server cannot sample from (a scorer such
    as `clip`) and sampling parameters whose names clash with request fields."""
    from raygen.models import Capability, require
    from raygen.models.conditions import condition_fields, get_kind
    from raygen.serving.schema import COMMON_FIELDS

    # the model's own view of its images: a model trained on latents stores the latent shape
    # as its training data, but draws (and is asked for) images of the source's size
    model, info = loaded.model, loaded.model.data_info
    if not getattr(model, "model_name", None):
        model.model_name = name  # so a CapabilityError names the model as the user called it
    require(model, Capability.SAMPLE)
    kind = get_kind(model.condition_kind)
    params_cls = model.sampling_params
    reserved = set(COMMON_FIELDS) | set(condition_fields())
    clash = sorted(set(params_cls.model_fields) & reserved)
    if clash:
        raise ValueError(f"model {name!r} (family {model.family}): sampling parameter {clash[0]!r} has the name of "
                         f"a request field; rename it in {params_cls.__name__}")
    run_id = loaded.meta.get("run_id")
    return {
        "name": name,
        "family": model.family,
        "capabilities": sorted(c.value for c in model.capabilities),
        "condition": {"kind": kind.name, "field": kind.field or None, "description": kind.description,
                      "schema": condition_schema(kind, info) if kind.field else None},
        "params": params_cls.model_json_schema(),
        "run_id": str(run_id) if run_id is not None else None,
        "source": loaded.source,
        "parameters": sum(p.numel() for p in model.parameters()),
        "memory_bytes": memory_bytes(model),
        "data": info.to_dict(),
    }


def registry_info(uri: str, tracking_uri: str | None) -> dict[str, Any] | None:
    """{"name", "version", "alias"} for a `models:/NAME/VERSION` or `models:/NAME@ALIAS` URI
    (the alias resolved to the version it points at now); None for anything else."""
    match = re.fullmatch(r"models:/([^/@]+)(?:/(\d+)|@([A-Za-z0-9_\-]+))/?", uri)
    if not match:
        return None
    name, version, alias = match.groups()
    if alias is not None:
        import mlflow

        from raygen.tracking.models import using_store

        with using_store(tracking_uri):
            version = mlflow.MlflowClient().get_model_version_by_alias(name, alias).version
    return {"name": name, "version": int(version), "alias": alias}


def memory_bytes(model) -> int:
    """Bytes of a model's parameters and buffers (its weights in memory)."""
    tensors = list(model.parameters()) + list(model.buffers())
    return int(sum(t.numel() * t.element_size() for t in tensors))


def summary(card: dict[str, Any]) -> str:
    """One line about a model for the CLI banner."""
    data, kind = card["data"], card["condition"]["kind"]
    cond = {"none": "unconditional", "label": f"{data['num_classes']} classes"}.get(kind, f"{kind}-conditional")
    run = f", run {card['run_id']}" if card["run_id"] else ""
    return f"{card['family']}, {data['height']}x{data['width']}x{data['channels']}, {cond}{run}"
