"""Create and resume MLflow runs for raygen jobs.

The default store is embedded: `sqlite:///<run_dir>/mlflow.db` with artifacts
in `<run_dir>/mlartifacts` (the file store is deprecated and raises).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

PARAM_VALUE_LIMIT = 6000


def default_tracking_uri(run_dir: str | Path) -> str:
    return f"sqlite:///{Path(run_dir).resolve() / 'mlflow.db'}"


def _artifact_root(tracking_uri: str) -> str | None:
    if tracking_uri.startswith("sqlite:///"):
        return str(Path(tracking_uri[len("sqlite:///"):]).parent / "mlartifacts")
    return None  # a tracking server decides


def client(tracking_uri: str):
    from mlflow.tracking import MlflowClient
    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def ensure_experiment(tracking_uri: str, name: str) -> str:
    c = client(tracking_uri)
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    root = _artifact_root(tracking_uri)
    kwargs = {"artifact_location": f"{root}/{name}"} if root else {}
    try:
        return c.create_experiment(name, **kwargs)
    except Exception:  # created concurrently (parallel Tune trials)
        return c.get_experiment_by_name(name).experiment_id


@dataclass
class TrackingRun:
    tracking_uri: str
    run_id: str
    experiment_id: str

    @property
    def client(self):
        return client(self.tracking_uri)

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param
        existing = self.client.get_run(self.run_id).data.params
        items = [Param(k[:250], str(v)[:PARAM_VALUE_LIMIT]) for k, v in params.items() if k[:250] not in existing]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i:i + 100])

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        from raygen.tracking.mlflow_sink import MlflowSink
        MlflowSink(self.tracking_uri, self.run_id).log_metrics(metrics, step or 0)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        path = Path(path)
        if path.is_dir():
            self.client.log_artifacts(self.run_id, str(path), artifact_path)
        else:
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    def set_tags(self, tags: dict[str, str]) -> None:
        for k, v in tags.items():
            self.client.set_tag(self.run_id, k, str(v))

    def finish(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status)


def open_run(tracking_uri: str, experiment: str, run_name: str, *, spec=None, run_id: str | None = None,
             parent_run_id: str | None = None, tags: dict[str, str] | None = None) -> TrackingRun:
    """Start a new run (params = the flattened spec, artifact = the spec YAML) or reopen `run_id`."""
    from raygen.spec.loader import flatten, spec_to_dict

    c = client(tracking_uri)
    exp_id = ensure_experiment(tracking_uri, experiment)
    if run_id is not None:
        c.update_run(run_id, status="RUNNING")
        return TrackingRun(tracking_uri, run_id, exp_id)
    all_tags = {"mlflow.runName": run_name, **(tags or {})}
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    run = c.create_run(exp_id, run_name=run_name, tags=all_tags)
    tracked = TrackingRun(tracking_uri, run.info.run_id, exp_id)
    if spec is not None:
        tree = spec_to_dict(spec)
        tracked.log_params(flatten(tree))
        c.log_text(run.info.run_id, yaml.safe_dump(tree, sort_keys=False), "spec.yaml")
    return tracked
