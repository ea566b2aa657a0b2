"""Metric and artifact sink the training hooks write to (rank 0 only)."""
from __future__ import annotations

import math
import time
from pathlib import Path


class MlflowSink:
    def __init__(self, tracking_uri: str, run_id: str):
        from mlflow.tracking import MlflowClient
        self.client = MlflowClient(tracking_uri=tracking_uri)
        self.run_id = run_id

    def log_step_metrics(self, rows: list[tuple[int, dict[str, float]]]) -> None:
        from mlflow.entities import Metric
        now = int(time.time() * 1000)
        metrics = [Metric(k, float(v), now, step) for step, values in rows for k, v in values.items()
                   if isinstance(v, (int, float)) and math.isfinite(v)]
        for i in range(0, len(metrics), 900):  # MLflow takes at most 1000 metrics per batch
            self.client.log_batch(self.run_id, metrics=metrics[i:i + 900])

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.log_step_metrics([(step, metrics)])

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def set_tags(self, tags: dict[str, str]) -> None:
        for k, v in tags.items():
            self.client.set_tag(self.run_id, k, str(v))
