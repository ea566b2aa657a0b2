"""Serve deployments that hold models: one generator deployment per model and
an optional CLIP scorer for best-of-n reranking.

Determinism: every request is sampled with its own `torch.Generator` seeded
from the request's seed, one request after another inside a batch. So the
images of a request never depend on which other requests shared its batch,
and the same seed gives the same bytes under any concurrency. The
`Generator.sample` protocol takes one generator per call, so folding several
requests into one `sample` call would tie each request's noise to its batch
neighbours; `@serve.batch` still collects concurrent requests so one worker
thread runs them back to back while the replica's event loop keeps accepting
and queueing the next ones.
"""
from __future__ import annotations

import asyncio
import importlib
import logging
import time
from typing import Any

import numpy as np
from ray import serve

from raygen.serving.requests import SampleJob

logger = logging.getLogger("ray.serve")


@serve.deployment
class GeneratorServer:
    def __init__(self, name: str, uri: str, *, tracking_uri: str | None, imports: list[str],
                 max_batch_size: int, batch_wait_timeout_s: float, replicas: int, use_gpu: bool):
        import torch

        from raygen.models.io import load_generator
        from raygen.serving.loading import describe, import_modules

        import_modules(imports)
        loaded = load_generator(uri, tracking_uri)
        self.device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
        self.model = loaded.model.to(self.device).eval()
        self.name = name
        self._info = describe(loaded, name=name, device=self.device, replicas=replicas)
        self._batched.set_max_batch_size(max_batch_size)
        self._batched.set_batch_wait_timeout_s(batch_wait_timeout_s)
        logger.info("generator %s loaded from %s on %s", name, uri, self.device)

    async def info(self) -> dict[str, Any]:
        return self._info

    async def generate(self, job: SampleJob) -> dict[str, Any]:
        """Returns {"images": uint8 [n, H, W, C], "sample_ms"} or {"error", "status"}."""
        return await self._batched(job)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.02)  # real values set per model in __init__
    async def _batched(self, jobs: list[SampleJob]) -> list[dict[str, Any]]:
        # torch work runs off the event loop so health checks and new requests are not blocked
        return await asyncio.to_thread(self._run_batch, jobs)

    def _run_batch(self, jobs: list[SampleJob]) -> list[dict[str, Any]]:
        # same-options requests run next to each other (warm caches, stable kernels); results keep request order
        order = sorted(range(len(jobs)), key=lambda i: repr(jobs[i].options_key()))
        results: list[dict[str, Any]] = [{}] * len(jobs)
        for i in order:
            results[i] = self._sample(jobs[i])
        return results

    def _sample(self, job: SampleJob) -> dict[str, Any]:
        import torch

        from raygen.serving.images import to_uint8

        data = self._info["data"]
        t0 = time.perf_counter()
        generator = torch.Generator(device=self.device).manual_seed(job.seed)
        labels = None if job.label is None else torch.full((job.n,), job.label, dtype=torch.long, device=self.device)
        captions = None if job.caption is None else [job.caption] * job.n
        try:
            with torch.inference_mode():
                images = self.model.sample(job.n, labels=labels, captions=captions, generator=generator, **job.options)
        except ValueError as err:
            # the family judged an option value (e.g. a negative temperature): the client's to fix
            return {"error": f"model {self.name!r} rejected the request: {err}", "status": 422}
        except Exception as err:
            logger.exception("sampling failed in %s for %r", self.name, job)
            return {"error": f"generation failed in model {self.name!r}: {type(err).__name__}: {err}", "status": 500}
        expected = (job.n, data["channels"], data["resolution"], data["resolution"])
        if tuple(images.shape) != expected:
            return {"error": f"model {self.name!r} returned images of shape {tuple(images.shape)}, "
                             f"expected {expected}", "status": 500}
        return {"images": to_uint8(images), "sample_ms": (time.perf_counter() - t0) * 1e3}


@serve.deployment
class ScorerServer:
    """Best-of-n reranking: scores candidates against a text with a CLIP-style
    scorer (`raygen.metrics.load_scorer`) and keeps the best k (`raygen.metrics.BestOfN`)."""

    def __init__(self, spec: str, loader: str, *, tracking_uri: str | None, use_gpu: bool):
        import torch

        from raygen.metrics import BestOfN

        device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
        module, _, func = loader.partition(":")
        scorer = getattr(importlib.import_module(module), func)(spec, device=device, tracking_uri=tracking_uri)
        self.reranker = BestOfN(scorer)
        logger.info("scorer %s loaded on %s", spec, device)

    async def rerank(self, text: str, images: np.ndarray, k: int) -> dict[str, list]:
        """images: uint8 [n, H, W, C]. Returns the indices of the best k (best first) and their scores."""
        return await asyncio.to_thread(self._rerank, text, images, k)

    def _rerank(self, text: str, images: np.ndarray, k: int) -> dict[str, list]:
        import torch

        batch = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div(255.0)
        _, scores, order = self.reranker.rerank(text, batch, k)
        return {"order": [int(i) for i in order], "scores": [float(s) for s in scores]}
