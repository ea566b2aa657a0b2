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


def _type_name(typ: Any) -> str:
    return typ.__name__ if isinstance(typ, type) else str(typ)


def conditioning_of(model, info) -> str:
    """"label", "caption" or "none": what `sample` conditions on.

    Trusted in this order: a `conditioning` the family set on its class or
    instance (the base class default says nothing), the family config's
    `conditioning`, and last a guess from the data the model was trained on.
    """
    from raygen.models.base import Generator

    valid = ("none", "label", "caption")
    own = vars(model).get("conditioning", type(model).__dict__.get("conditioning"))
    if own is None and type(model).conditioning is not getattr(Generator, "conditioning", None):
        own = type(model).conditioning  # set on an intermediate base class
    if own in valid:
        return own
    configured = getattr(getattr(model, "config", None), "conditioning", None)
    if configured in valid:
        return configured
    return "caption" if info.has_captions else ("label" if info.num_classes else "none")


def describe(loaded, *, name: str, device: str, replicas: int) -> dict[str, Any]:
    """What /v1/models shows and what request validation checks against."""
    info = loaded.data_info
    model = loaded.model
    options = {key: {"type": _type_name(typ), "default": default, "help": help_}
               for key, (typ, default, help_) in (getattr(model, "sampling_options", None) or {}).items()}
    run_id = loaded.meta.get("run_id")
    return {
        "name": name,
        "family": loaded.meta.get("family") or loaded.spec.model.family,
        "run_id": str(run_id) if run_id is not None else None,
        "source": loaded.source,
        "conditioning": conditioning_of(model, info),
        "data": {"resolution": info.resolution, "channels": info.channels, "num_classes": info.num_classes,
                 "class_names": list(info.class_names), "has_captions": info.has_captions},
        "sampling_options": options,
        "device": device,
        "parameters": sum(p.numel() for p in model.parameters()),
        "replicas": replicas,
    }
