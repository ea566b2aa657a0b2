"""Log, register and fetch exported models (safetensors + spec, no pickled code)."""
from __future__ import annotations

import tempfile
from pathlib import Path

from raygen.models.errors import ModelLoadError
from raygen.tracking.store import client


def log_and_register(tracking_uri: str, run_id: str, export_dir: str | Path, name: str | None) -> str | None:
    """Log `export_dir` as the run's `model` artifact; register it under `name`.
    Returns the `models:/NAME/VERSION` URI (or the runs:/ URI when not registering)."""
    client(tracking_uri).log_artifacts(run_id, str(export_dir), "model")
    if not name:
        return f"runs:/{run_id}/model"
    return register(tracking_uri, run_id, name)


def register(tracking_uri: str, run_id: str, name: str) -> str:
    """Register the run's `model` artifact as a new version of `name`."""
    c = client(tracking_uri)
    try:
        c.get_registered_model(name)
    except Exception:
        c.create_registered_model(name, description="raygen generator (safetensors weights + job spec)")
    version = c.create_model_version(name, source=f"runs:/{run_id}/model", run_id=run_id)
    return f"models:/{name}/{version.version}"


def download_model(uri: str, tracking_uri: str | None = None) -> Path:
    """Fetch a `models:/NAME/VERSION` or `runs:/ID/model` folder to a local temp folder."""
    import mlflow

    if tracking_uri is None:
        raise ModelLoadError(f"{uri} needs a tracking store: pass --tracking-uri (e.g. sqlite:///runs/mlflow.db)")
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)
    dest = Path(tempfile.mkdtemp(prefix="raygen-model-"))
    try:
        return Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dest)))
    except Exception as err:
        raise ModelLoadError(f"could not fetch {uri} from {tracking_uri}: {err}") from None
