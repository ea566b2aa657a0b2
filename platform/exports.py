"""Exported models: what serving, `raygen sample`/`eval` and MLflow load.

An export is a folder; no pickled code, weights only (safetensors), the
family rebuilt from the registry:

    model/
      raygen-model.json     index: format, family, meta, components
      weights.safetensors   the model's own weights (EMA when the run kept one),
                            without its frozen components
      spec.yaml             the resolved job spec
      data_info.json
      components/<name>/    one export folder per frozen component (a VAE,
                            codebooks), in this same layout

This module sits above models, spec, tracking and train (it imports them;
none of them imports it), so model loading and URI handling have one home.
Folders written before the index existed (no raygen-model.json) still load.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import load_file, save_file

from raygen.models import DataInfo, Generator, build_model
from raygen.models.errors import ModelLoadError
from raygen.spec.loader import parse_spec, spec_to_dict
from raygen.spec.schema import JobSpec
from raygen.tracking.models import download_model, find_export
from raygen.train.checkpoint import find_latest_checkpoint

INDEX = "raygen-model.json"
WEIGHTS = "weights.safetensors"
COMPONENTS = "components"
FORMAT = 2
COMPONENT_PREFIX = "components."

__all__ = ["INDEX", "WEIGHTS", "LoadedGenerator", "ModelLoadError", "export_generator", "load_exported",
           "load_generator", "locate_export", "own_weights"]


@dataclass
class LoadedGenerator:
    model: Generator
    spec: JobSpec
    data_info: DataInfo
    meta: dict[str, Any]
    source: str


def own_weights(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A model's weights without its frozen components (those are exported apart)."""
    return {k: v for k, v in state_dict.items() if not k.startswith(COMPONENT_PREFIX)}


def export_generator(path: str | Path, state_dict: dict[str, torch.Tensor], spec: JobSpec, data_info: DataInfo,
                     meta: dict[str, Any] | None = None) -> Path:
    """Write an export folder atomically (temp folder, then rename).

    Components named in `spec.model.components` must already be resolved to
    local export folders (the driver does that before training); they are
    copied in as they are."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in own_weights(state_dict).items()}
    save_file(tensors, str(tmp / WEIGHTS))
    components = {}
    for name, source in spec.model.components.items():
        folder = Path(source)
        if not (folder / WEIGHTS).is_file():
            raise ModelLoadError(f"model.components.{name}: {source} is not a resolved export folder")
        shutil.copytree(folder, tmp / COMPONENTS / name)
        components[name] = {"path": f"{COMPONENTS}/{name}", "source": source}
    (tmp / "spec.yaml").write_text(yaml.safe_dump(spec_to_dict(spec), sort_keys=False))
    (tmp / "data_info.json").write_text(json.dumps(data_info.to_dict(), indent=2))
    index = {"format": FORMAT, "family": spec.model.family, "weights": WEIGHTS, "components": components,
             "meta": meta or {}}
    (tmp / INDEX).write_text(json.dumps(index, indent=2))
    (tmp / "meta.json").write_text(json.dumps({"family": spec.model.family, **(meta or {})}, indent=2))
    if path.exists():
        shutil.rmtree(path)
    os.replace(tmp, path)
    return path


def _read_index(path: Path) -> dict[str, Any]:
    if (path / INDEX).is_file():
        return json.loads((path / INDEX).read_text())
    # an export written before the index: no components
    meta = json.loads((path / "meta.json").read_text()) if (path / "meta.json").is_file() else {}
    return {"format": 1, "family": meta.get("family"), "weights": WEIGHTS, "components": {}, "meta": meta}


def load_exported(path: str | Path, map_location: str = "cpu") -> LoadedGenerator:
    path = Path(path)
    missing = [f for f in (WEIGHTS, "spec.yaml", "data_info.json") if not (path / f).is_file()]
    if missing:
        raise ModelLoadError(f"{path} is not an exported raygen model (missing {', '.join(missing)}); "
                             "pass a run's model folder, a checkpoint folder or a models:/NAME/VERSION URI")
    index = _read_index(path)
    components = {name: load_exported(path / entry["path"], map_location).model
                  for name, entry in index["components"].items()}
    spec = parse_spec(yaml.safe_load((path / "spec.yaml").read_text()), str(path / "spec.yaml"))
    info = DataInfo.from_dict(json.loads((path / "data_info.json").read_text()))
    model = build_model(spec.model.family, spec.model.config, info, components)
    state = load_file(str(path / index["weights"]), device=map_location)
    expected = own_weights(model.state_dict())
    missing_keys = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing_keys or unexpected:
        raise ModelLoadError(f"{path}: weights do not fit the {spec.model.family} model built from its spec "
                             f"(missing {missing_keys[:5]}, unexpected {unexpected[:5]})")
    model.load_state_dict(state, strict=False)
    model.eval()
    return LoadedGenerator(model=model, spec=spec, data_info=info, meta=index.get("meta", {}), source=str(path))


def locate_export(uri: str, tracking_uri: str | None = None) -> Path:
    """The local export folder behind an exported folder, a training checkpoint
    folder, a run folder, or an MLflow `models:/NAME/VERSION` (or `@ALIAS`) /
    `runs:/ID/model` URI (downloaded). An MLflow Model folder (a logged raygen
    model: MLmodel + artifacts/export/) gives the export inside it."""
    if uri.startswith(("models:/", "runs:/")):
        folder = download_model(uri, tracking_uri)
        return find_export(folder) or folder
    path = Path(uri)
    if not path.exists():
        raise ModelLoadError(f"model not found: {uri} (give a folder written by `raygen train`, "
                             "or models:/NAME/VERSION from the MLflow registry)")
    for candidate in (path, path / "model", path / "export"):
        if (candidate / WEIGHTS).is_file():
            return candidate
        inside = find_export(candidate)
        if inside is not None:
            return inside
    ckpt = find_latest_checkpoint(path)  # a run folder or a checkpoint folder: its newest checkpoint's export
    if ckpt is not None and (ckpt / "export" / WEIGHTS).is_file():
        return ckpt / "export"
    raise ModelLoadError(f"{uri} holds no raygen model (no {WEIGHTS} in it, its model/ folder, or a completed checkpoint)")


def load_generator(uri: str, tracking_uri: str | None = None) -> LoadedGenerator:
    loaded = load_exported(locate_export(uri, tracking_uri))
    if uri.startswith(("models:/", "runs:/")):
        loaded.source = uri
    return loaded
