"""raygen's own serving metrics: images generated, sampling seconds, requests, queue rejections, and the
steps and cancellations of streamed requests.

Recorded in two places at once:

- a Prometheus registry of this process, served as text at `GET /metrics` by
  the app (in a Ray cluster that is the one replica the request reached);
- Ray's metrics (`ray.util.metrics`) when the process is part of a Ray
  cluster, which Ray exports with Serve's own metrics (`ray_serve_*`) at each
  node's metrics port, summed over replicas, as `ray_raygen_*`.

Recording never fails a request: a metrics error is logged once and ignored.
"""
from __future__ import annotations

import logging
import threading
from typing import Optional

logger = logging.getLogger("ray.serve")

SECONDS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class ServeMetrics:
    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Histogram

        self.registry = CollectorRegistry()
        self.images = Counter("raygen_images_generated", "images generated", ["model", "family"],
                              registry=self.registry)
        self.sampling = Histogram("raygen_sampling_seconds", "seconds per model.sample call (a merged batch)",
                                  ["model", "family"], buckets=SECONDS_BUCKETS, registry=self.registry)
        self.requests = Counter("raygen_requests", "requests answered, by route and status",
                                ["model", "route", "status"], registry=self.registry)
        self.rejections = Counter("raygen_queue_rejections", "requests refused because a model's queue was full",
                                  ["model"], registry=self.registry)
        self.steps = Counter("raygen_sampling_steps", "sampling steps run for streamed requests (denoising "
                             "steps, tokens, levels)", ["model", "family"], registry=self.registry)
        self.cancels = Counter("raygen_sampling_cancelled", "streamed requests whose sampling stopped because "
                               "the client went away", ["model"], registry=self.registry)
        self._ray: Optional[dict] = None
        self._ray_checked = False
        self._warned = False

    def _ray_metrics(self) -> Optional[dict]:
        if not self._ray_checked:
            self._ray_checked = True
            try:
                import ray
                if ray.is_initialized():
                    from ray.util import metrics as rm
                    self._ray = {
                        "images": rm.Counter("raygen_images_generated", "images generated", ("model", "family")),
                        "sampling": rm.Histogram("raygen_sampling_seconds", "seconds per model.sample call",
                                                 list(SECONDS_BUCKETS), ("model", "family")),
                        "requests": rm.Counter("raygen_requests", "requests answered",
                                               ("model", "route", "status")),
                        "rejections": rm.Counter("raygen_queue_rejections", "requests refused: queue full",
                                                 ("model",)),
                    }
            except Exception as err:  # noqa: BLE001 - metrics are optional
                logger.info("Ray metrics unavailable: %s", err)
        return self._ray

    def _safely(self, fn) -> None:
        try:
            fn()
        except Exception as err:  # noqa: BLE001 - never fail a request for a metric
            if not self._warned:
                self._warned = True
                logger.warning("recording a serving metric failed: %s", err)

    def sampled(self, model: str, family: str, images: int, seconds: float) -> None:
        def record():
            self.images.labels(model, family).inc(images)
            self.sampling.labels(model, family).observe(seconds)
            ray_metrics = self._ray_metrics()
            if ray_metrics:
                tags = {"model": model, "family": family}
                ray_metrics["images"].inc(images, tags=tags)
                ray_metrics["sampling"].observe(seconds, tags=tags)
        self._safely(record)

    def answered(self, model: Optional[str], route: str, status: int) -> None:
        def record():
            self.requests.labels(model or "", route, str(status)).inc()
            ray_metrics = self._ray_metrics()
            if ray_metrics:
                ray_metrics["requests"].inc(1, tags={"model": model or "", "route": route, "status": str(status)})
        self._safely(record)

    def rejected(self, model: str) -> None:
        def record():
            self.rejections.labels(model).inc()
            ray_metrics = self._ray_metrics()
            if ray_metrics:
                ray_metrics["rejections"].inc(1, tags={"model": model})
        self._safely(record)

    def stepped(self, model: str, family: str) -> None:
        self._safely(lambda: self.steps.labels(model, family).inc())

    def cancelled(self, model: str) -> None:
        self._safely(lambda: self.cancels.labels(model).inc())

    def text(self) -> bytes:
        from prometheus_client import generate_latest
        return generate_latest(self.registry)


_metrics: Optional[ServeMetrics] = None
_lock = threading.Lock()


def metrics() -> ServeMetrics:
    """This process's metrics (one set per process: a replica, or the in-process app)."""
    global _metrics
    if _metrics is None:
        with _lock:
            if _metrics is None:
                _metrics = ServeMetrics()
    return _metrics
