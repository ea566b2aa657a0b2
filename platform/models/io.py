"""Exported generators: a folder of safetensors weights plus the spec.

This is what serving and `raygen sample` load, and what MLflow stores as the
model: no pickled code, weights only (safetensors), the family rebuilt from
the registry.

    model/
      weights.safetensors   (EMA weights when the run kept an EMA)
      spec.yaml             (the resolved job spec)
      data_info.json
      meta.json             (family, run id, step, which weights)
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

from raygen.models.base import DataInfo, Generator

WEIGHTS = "weights.safetensors"


class ModelLoadError(RuntimeError):
    pass


@dataclass
class LoadedGenerator:
    model: Generator
    spec: Any  # raygen.spec.JobSpec
    data_info: DataInfo
    meta: dict[str, Any]
    source: str


def export_generator(path: str | Path, state_dict: dict[str, torch.Tensor], spec, data_info: DataInfo,
                     meta: dict[str, Any] | None = None) -> Path:
    """Write an exported model folder atomically (temp folder, then rename)."""
    from raygen.spec.loader import spec_to_dict

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state_dict.items()}
    save_file(tensors, str(tmp / WEIGHTS))
    (tmp / "spec.yaml").write_text(yaml.safe_dump(spec_to_dict(spec), sort_keys=False))
    (tmp / "data_info.json").write_text(json.dumps(data_info.to_dict(), indent=2))
    (tmp / "meta.json").write_text(json.dumps({"family": spec.model.family, **(meta or {})}, indent=2))
    if path.exists():
        shutil.rmtree(path)
    os.replace(tmp, path)
    return path


def load_exported(path: str | Path, map_location: str = "cpu") -> LoadedGenerator:
    from raygen.models.registry import build_model
    from raygen.spec.loader import parse_spec

    path = Path(path)
    missing = [f for f in (WEIGHTS, "spec.yaml", "data_info.json") if not (path / f).is_file()]
    if missing:
        raise ModelLoadError(f"{path} is not an exported raygen model (missing {', '.join(missing)}); "
                             "pass a run's model folder, a checkpoint folder or a models:/NAME/VERSION URI")
    spec = parse_spec(yaml.safe_load((path / "spec.yaml").read_text()), str(path / "spec.yaml"))
    info = DataInfo.from_dict(json.loads((path / "data_info.json").read_text()))
    meta = json.loads((path / "meta.json").read_text()) if (path / "meta.json").is_file() else {}
    model = build_model(spec.model.family, spec.model.config, info)
    state = load_file(str(path / WEIGHTS), device=map_location)
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ModelLoadError(f"{path}: weights do not fit the {spec.model.family} model built from its spec "
                             f"(missing {result.missing_keys[:5]}, unexpected {result.unexpected_keys[:5]})")
    model.eval()
    return LoadedGenerator(model=model, spec=spec, data_info=info, meta=meta, source=str(path))


def load_generator(uri: str, tracking_uri: str | None = None) -> LoadedGenerator:
    """Load from an exported folder, a training checkpoint folder, a run folder,
    or an MLflow `models:/NAME/VERSION` / `runs:/ID/model` URI."""
    if uri.startswith(("models:/", "runs:/")):
        from raygen.tracking.models import download_model
        local = download_model(uri, tracking_uri)
        loaded = load_exported(local)
        loaded.source = uri
        return loaded
    path = Path(uri)
    if not path.exists():
        raise ModelLoadError(f"model not found: {uri} (give a folder written by `raygen train`, "
                             "or models:/NAME/VERSION from the MLflow registry)")
    for candidate in (path, path / "model", path / "export"):
        if (candidate / WEIGHTS).is_file():
            return load_exported(candidate)
    # a training checkpoint folder or a run folder: use its latest checkpoint's export
    from raygen.train.checkpoint import find_latest_checkpoint
    ckpt = find_latest_checkpoint(path)
    if ckpt is not None and (ckpt / "export" / WEIGHTS).is_file():
        return load_exported(ckpt / "export")
    raise ModelLoadError(f"{uri} holds no raygen model (no {WEIGHTS} in it, its model/ folder, or a completed checkpoint)")
