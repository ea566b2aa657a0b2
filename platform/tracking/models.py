"""Log, register and fetch raygen models as MLflow Models (pyfunc flavor, no pickled code).

A trained model is logged once, as an MLflow 3 LoggedModel named `model`
linked to its run (`runs:/RUN_ID/model` and `models:/MODEL_ID` both name it):
an MLflow Model folder whose `artifacts/export/` is the raygen export
(raygen.tracking.pyfunc). The registry's versions point at that LoggedModel,
so MLflow (`mlflow.pyfunc.load_model`, `mlflow models serve`) and raygen
(`raygen serve/sample/eval models:/NAME/VERSION`) load the same artifact.
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any, Iterable, Iterator

from raygen.models.errors import ModelLoadError
from raygen.tracking.store import client

MODEL_NAME = "model"  # the LoggedModel's name, and the artifact path in runs:/RUN_ID/model
MODEL_TYPE = "raygen"
EXPORT_ARTIFACT = "export"  # the pyfunc artifact holding the raygen export (artifacts/export/)
#: run metrics that describe a model's quality: linked to the LoggedModel at their latest value
EVAL_METRICS = ("val_loss", "fid", "kid", "fid_floor")


@contextlib.contextmanager
def using_store(tracking_uri: str) -> Iterator[None]:
    """Point MLflow's fluent API (which Model.log and download_artifacts use) at
    `tracking_uri` for a while, then put back what was set before (the module
    settings and the MLFLOW_TRACKING_URI / MLFLOW_REGISTRY_URI variables they write)."""
    import mlflow
    from mlflow.tracking._model_registry import utils as registry
    from mlflow.tracking._tracking_service import utils as tracking

    saved = (getattr(tracking, "_tracking_uri", None), getattr(registry, "_registry_uri", None),
             {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")})
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)
    try:
        yield
    finally:
        tracking._tracking_uri, registry._registry_uri = saved[0], saved[1]
        for key, value in saved[2].items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def log_model(tracking_uri: str, run_id: str, export_dir: str | Path, *, step: int = 0,
              eval_metrics: Iterable[str] = EVAL_METRICS, tags: dict[str, Any] | None = None):
    """Log `export_dir` as the run's MLflow Model: a LoggedModel in the run's
    experiment, with the run's params, linked to the run as its output at
    `step`, and with the run's metrics at `step` (not the system metrics,
    whose steps count samples) plus the latest value of each of
    `eval_metrics`. Returns the LoggedModel."""
    import mlflow.pyfunc
    from mlflow.entities import LoggedModelOutput, Metric
    from mlflow.models import Model

    from raygen.tracking.pyfunc import pyfunc_log_kwargs

    c = client(tracking_uri)
    run = c.get_run(run_id)
    kwargs = pyfunc_log_kwargs(export_dir)
    logged = c.create_logged_model(
        experiment_id=run.info.experiment_id, name=MODEL_NAME, source_run_id=run_id, model_type=MODEL_TYPE,
        params={k: str(v) for k, v in run.data.params.items()},
        tags={"raygen.family": kwargs["metadata"]["raygen_family"], "raygen.task": kwargs["metadata"]["raygen_task"],
              "raygen.step": str(step), **{k: str(v) for k, v in (tags or {}).items()}})
    with using_store(tracking_uri), warnings.catch_warnings():
        # the signature is given; an input example would make MLflow sample an image while logging
        warnings.filterwarnings("ignore", message=".*input example was not provided.*")
        # no run_id here: Model.log would link every metric at `step`, system metrics too, and
        # log the model config as run params; the run and its metrics are linked below
        Model.log(None, name=MODEL_NAME, flavor=mlflow.pyfunc, model_id=logged.model_id, **kwargs)
    c.log_outputs(run_id, models=[LoggedModelOutput(logged.model_id, step=step)])
    # Same key, value, step and timestamp as the run's own points: the run's history is
    # unchanged, only the model gains the metrics; the eval metrics name the run's
    # validation dataset (raygen.tracking.lineage), so the model page lists it.
    val = _input_dataset(run, "validation")
    links = []
    for key in sorted(run.data.metrics):
        if key.startswith("system/"):
            continue
        history = c.get_metric_history(run_id, key)
        chosen = [m for m in history if m.step == step]
        if not chosen and key in eval_metrics:
            chosen = [max(history, key=lambda m: (m.step, m.timestamp))]
        name, digest = (val.name, val.digest) if val is not None and key in eval_metrics else (None, None)
        links += [Metric(key, m.value, m.timestamp, m.step, model_id=logged.model_id, run_id=run_id,
                         dataset_name=m.dataset_name or name, dataset_digest=m.dataset_digest or digest)
                  for m in chosen[-1:]]
    for i in range(0, len(links), 900):
        c.log_batch(run_id, metrics=links[i:i + 900])
    return c.get_logged_model(logged.model_id)


def _input_dataset(run, context: str):
    """The run's dataset input logged with `context` ("training", "validation"), or None."""
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT
    for item in (run.inputs.dataset_inputs if run.inputs else []):
        if any(t.key == MLFLOW_DATASET_CONTEXT and t.value == context for t in item.tags):
            return item.dataset
    return None


def log_and_register(tracking_uri: str, run_id: str, export_dir: str | Path, name: str | None, *,
                     step: int = 0, tags: dict[str, Any] | None = None) -> str | None:
    """Log `export_dir` as the run's MLflow Model (see `log_model`); register it under `name`.
    Returns the `models:/NAME/VERSION` URI, or `models:/MODEL_ID` when not registering."""
    logged = log_model(tracking_uri, run_id, export_dir, step=step, tags=tags)
    if not name:
        return f"models:/{logged.model_id}"
    return register(tracking_uri, run_id, name, model_id=logged.model_id)


def run_model_id(tracking_uri: str, run_id: str) -> str | None:
    """The newest LoggedModel named `model` that `run_id` produced (None for runs logged before MLflow Models)."""
    c = client(tracking_uri)
    run = c.get_run(run_id)
    found = c.search_logged_models(experiment_ids=[run.info.experiment_id],
                                   filter_string=f"source_run_id = '{run_id}' AND name = '{MODEL_NAME}'",
                                   order_by=[{"field_name": "creation_time", "ascending": False}], max_results=1)
    return found[0].model_id if found else None


def register(tracking_uri: str, run_id: str, name: str, *, model_id: str | None = None) -> str:
    """Register the run's model (its LoggedModel, or `model_id`) as a new version of `name`."""
    c = client(tracking_uri)
    try:
        c.get_registered_model(name)
    except Exception:
        c.create_registered_model(name, description="raygen model: an MLflow Model (pyfunc) holding the raygen "
                                                    "export (safetensors weights + job spec)")
    model_id = model_id or run_model_id(tracking_uri, run_id)
    if model_id is None:  # a run logged before raygen models were MLflow Models: its `model` run artifact
        version = c.create_model_version(name, source=f"runs:/{run_id}/{MODEL_NAME}", run_id=run_id)
    else:
        with using_store(tracking_uri):  # the registry resolves models:/MODEL_ID through the fluent store
            version = c.create_model_version(name, source=f"models:/{model_id}", run_id=run_id, model_id=model_id)
        # as mlflow.register_model does: the LoggedModel lists its versions (the UI's "Registered models")
        from mlflow.utils.mlflow_tags import MLFLOW_MODEL_VERSIONS
        listed = json.loads(c.get_logged_model(model_id).tags.get(MLFLOW_MODEL_VERSIONS) or "[]")
        listed.append({"name": name, "version": version.version})
        c.set_logged_model_tags(model_id, {MLFLOW_MODEL_VERSIONS: json.dumps(listed)})
    return f"models:/{name}/{version.version}"


def download_model(uri: str, tracking_uri: str | None = None) -> Path:
    """Fetch a `models:/NAME/VERSION`, `models:/NAME@ALIAS`, `models:/MODEL_ID` or
    `runs:/ID/model` folder to a local temp folder (an MLflow Model folder, or a
    bare export folder for models logged before raygen models were MLflow Models)."""
    import mlflow

    if tracking_uri is None:
        raise ModelLoadError(f"{uri} needs a tracking store: pass --tracking-uri (e.g. sqlite:///runs/mlflow.db)")
    dest = Path(tempfile.mkdtemp(prefix="raygen-model-"))
    try:
        with using_store(tracking_uri):
            return Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dest)))
    except Exception as err:
        raise ModelLoadError(f"could not fetch {uri} from {tracking_uri}: {err}") from None


def find_export(folder: str | Path) -> Path | None:
    """The raygen export inside an MLflow Model folder (from its MLmodel's
    `artifacts.export` entry), or None when `folder` is not one."""
    import yaml

    from raygen.exports import INDEX, WEIGHTS
    folder = Path(folder)
    mlmodel = folder / "MLmodel"
    if not mlmodel.is_file():
        return None
    try:
        flavor = (yaml.safe_load(mlmodel.read_text()) or {}).get("flavors", {}).get("python_function", {})
        rel = flavor.get("artifacts", {}).get(EXPORT_ARTIFACT, {}).get("path")
    except (OSError, yaml.YAMLError, AttributeError):
        rel = None
    candidates = [folder / rel] if isinstance(rel, str) else []
    candidates += sorted(p.parent for p in (folder / "artifacts").glob(f"*/{INDEX}"))
    root = folder.resolve()
    for candidate in candidates:
        inside = candidate.resolve().is_relative_to(root)  # an MLmodel cannot point outside its folder
        if inside and (candidate / WEIGHTS).is_file():
            return candidate
    return None
