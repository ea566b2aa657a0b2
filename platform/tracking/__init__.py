"""MLflow tracking: runs, params, metrics, artifacts, registered models."""
from raygen.tracking.store import TrackingRun, default_tracking_uri, open_run

__all__ = ["TrackingRun", "default_tracking_uri", "open_run"]
