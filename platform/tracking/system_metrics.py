"""MLflow system metrics (CPU, memory, disk, network; GPU where present) for a training run.

One monitor per node, started by the worker of local rank 0 (so an 8-GPU node
logs once, not eight times), sampling every `track.system_metrics_every_s`
seconds into the run as `system/...` (`system/node_<rank>/...` when the run
spans several nodes), which the MLflow UI shows in the run's System metrics
tab. GPU metrics need `nvidia-ml-py` (pynvml) on the node; without it MLflow
logs the rest. A resumed run continues the steps after the last ones logged.
"""
from __future__ import annotations

import contextlib
from typing import Iterator


def node_id(node_rank: int, nodes: int) -> str | None:
    """The metric-name infix of a node: none for a one-node run."""
    return f"node_{node_rank}" if nodes > 1 else None


@contextlib.contextmanager
def system_metrics(tracking_uri: str | None, run_id: str | None, every_s: float, *, node: str | None = None) -> Iterator:
    """Log system metrics into `run_id` every `every_s` seconds while the block runs (0 or no run: nothing)."""
    if not every_s or not run_id:
        yield None
        return
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor
    monitor = SystemMetricsMonitor(run_id, sampling_interval=every_s, samples_before_logging=1, resume_logging=True,
                                   node_id=node, tracking_uri=tracking_uri)
    first_step = monitor._logging_step
    monitor.start()
    try:
        yield monitor
    finally:
        monitor.finish()  # wakes the sampling thread and flushes what it holds
        if monitor._logging_step == first_step:
            _log_one_sample(monitor)


def _log_one_sample(monitor) -> None:
    """A block shorter than one interval still leaves one sample in the run."""
    try:
        if not any(m._metrics for m in monitor.monitors):
            monitor.collect_metrics()
        monitor.publish_metrics(monitor.aggregate_metrics())
        monitor.mlflow_logger.flush()
    except Exception:  # system metrics never fail a run
        pass


def worker_system_metrics(ctx, tracking_uri: str | None, run_id: str | None, every_s: float):
    """`system_metrics` for a Ray Train worker: on the worker of local rank 0 only, one per node."""
    if ctx.get_local_rank() != 0:
        return contextlib.nullcontext()
    nodes = max(1, ctx.get_world_size() // max(1, ctx.get_local_world_size()))
    return system_metrics(tracking_uri, run_id, every_s, node=node_id(ctx.get_node_rank(), nodes))
