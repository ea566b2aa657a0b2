"""Serve deployments that hold models: one generator deployment per model and
an optional CLIP scorer for best-of-n reranking.

Batching and determinism: `sample` takes one `torch.Generator` per image, and
image i of a request with seed s uses seed s + i. A generator replica collects
concurrent requests (`ContinuousBatcher`: a batch holds what queued while the
previous one ran), and requests whose sampling params are equal
(`SamplingParams.key()`) are merged into ONE `model.sample` call (their
conditions concatenated, one generator per image); the result is sliced back
per request. So the images of a request do not depend on which requests shared
its forward pass, and the same request gives the same bytes under any
concurrency. Requests with other params in the same batch go in forward calls
of their own. `BatchSampler` and `ContinuousBatcher` hold this logic without
Ray, so it is tested in plain Python.
"""
from __future__ import annotations

import asyncio
import importlib
import logging
import time
from typing import Any, Sequence

import numpy as np
from ray import serve

from raygen.serving.requests import SampleJob

logger = logging.getLogger("ray.serve")


class BatchSampler:
    """Samples a batch of jobs for one model: jobs with equal params share one forward call.

    merge=False samples every job in a call of its own (the benchmark's
    "batching off"). If a merged call fails, its jobs are retried one by one,
    so one request's bad value fails only that request."""

    def __init__(self, model, *, name: str, device: str = "cpu", merge: bool = True):
        self.model = model
        self.name = name
        self.device = device
        self.merge = merge
        self.shape = tuple(model.data_info.shape)
        # what ran so far (tests and benchmarks read it): batches, model.sample calls, requests, images,
        # and the milliseconds spent in model.sample
        self.batches = self.forward_calls = self.jobs_done = self.images_done = 0
        self.sample_ms = 0.0

    def run(self, jobs: Sequence[SampleJob]) -> list[dict[str, Any]]:
        """One result per job, in order: {"images": uint8 [n, H, W, C], "seeds", "sample_ms", "batch_images"}
        or {"error", "status"}."""
        self.batches += 1
        groups: dict[tuple, tuple[Any, list[int]]] = {}
        results: list[dict[str, Any]] = [{}] * len(jobs)
        for i, job in enumerate(jobs):
            try:
                params = self.model.sampling_params.model_validate(job.params)
            except ValueError as err:  # the ingress validated these already: only a version skew gets here
                results[i] = {"error": f"model {self.name!r} rejected the sampling params: {err}", "status": 422}
                continue
            key = (job.kind, repr(params.key()))
            groups.setdefault(key, (params, []))[1].append(i)
        for params, members in groups.values():
            group = [jobs[i] for i in members]
            if self.merge and len(group) > 1:
                out = self._merged(group, params)
            else:
                out = [self._alone(job, params) for job in group]
            for i, result in zip(members, out):
                results[i] = result
        return results

    def _forward(self, jobs: Sequence[SampleJob], params) -> tuple[np.ndarray, list[int], float]:
        import torch

        from raygen.models import Conditions
        from raygen.models.sampling import image_seeds, make_generators
        from raygen.images import to_uint8

        t0 = time.perf_counter()
        conditions = Conditions.cat([Conditions.repeat(job.kind, job.condition, job.n) for job in jobs])
        seeds = [s for job in jobs for s in image_seeds(job.seed, job.n)]
        self.forward_calls += 1
        with torch.inference_mode():
            images = self.model.sample(conditions, params, make_generators(seeds, self.device))
        self.jobs_done += len(jobs)
        self.images_done += len(seeds)
        self.sample_ms += (time.perf_counter() - t0) * 1e3
        expected = (len(seeds), *self.shape)
        if tuple(images.shape) != expected:
            raise RuntimeError(f"model {self.name!r} returned images of shape {tuple(images.shape)}, "
                               f"expected {expected}")
        return to_uint8(images), seeds, (time.perf_counter() - t0) * 1e3

    def _merged(self, jobs: Sequence[SampleJob], params) -> list[dict[str, Any]]:
        try:
            images, seeds, ms = self._forward(jobs, params)
        except Exception as err:  # noqa: BLE001 - find out which request it was
            logger.info("merged sampling of %d requests failed in %s (%s); retrying them one by one",
                        len(jobs), self.name, err)
            return [self._alone(job, params) for job in jobs]
        out, start = [], 0
        for job in jobs:
            out.append({"images": images[start:start + job.n], "seeds": seeds[start:start + job.n],
                        "sample_ms": ms, "batch_images": len(seeds)})
            start += job.n
        return out

    def _alone(self, job: SampleJob, params) -> dict[str, Any]:
        try:
            images, seeds, ms = self._forward([job], params)
        except ValueError as err:
            # the family judged a value (a condition or a parameter): the client's to fix
            return {"error": f"model {self.name!r} rejected the request: {err}", "status": 422}
        except Exception as err:  # noqa: BLE001 - a one-line 500; the traceback goes to the replica log
            logger.exception("sampling failed in %s for %r", self.name, job)
            return {"error": f"generation failed in model {self.name!r}: {type(err).__name__}: {err}", "status": 500}
        return {"images": images, "seeds": seeds, "sample_ms": ms, "batch_images": len(seeds)}


class ContinuousBatcher:
    """Collects concurrent requests into batches for one worker, without Ray.

    A batch is formed when the worker is free: it takes every request that
    queued while the previous batch ran (up to `max_batch_size`), so under
    load batches fill by themselves. A request that finds the worker idle waits
    at most `batch_wait_timeout_s` (from its arrival) for company. Serve's
    `@serve.batch` (Ray 2.60) forms each batch as soon as its wait is over,
    before the previous batch has finished, so under sustained load a batch
    only ever holds the requests of one wait window: at 16 clients and a wait
    of 0 it averaged 1.07 requests. Requests cancelled while queued (a caller's
    timeout) are dropped before sampling."""

    def __init__(self, run, *, max_batch_size: int, batch_wait_timeout_s: float):
        self.run = run  # list of items -> list of results, run in a worker thread
        self.max_batch_size = max_batch_size
        self.wait_s = batch_wait_timeout_s
        self._pending: list[tuple[float, Any, asyncio.Future]] = []
        self._running = 0
        self._arrived: asyncio.Event | None = None
        self._worker: asyncio.Task | None = None

    @property
    def in_flight(self) -> int:
        """Requests queued or in the batch that runs now."""
        return len(self._pending) + self._running

    async def submit(self, item: Any) -> Any:
        loop = asyncio.get_running_loop()
        if self._worker is None or self._worker.done():
            self._arrived = asyncio.Event()
            self._worker = loop.create_task(self._work())
        future = loop.create_future()
        self._pending.append((time.monotonic(), item, future))
        self._arrived.set()
        return await future

    async def _work(self) -> None:
        while True:
            self._pending = [p for p in self._pending if not p[2].done()]  # cancelled while queued
            if not self._pending:
                self._arrived.clear()
                await self._arrived.wait()
                continue
            deadline = self._pending[0][0] + self.wait_s
            while len(self._pending) < self.max_batch_size and time.monotonic() < deadline:
                self._arrived.clear()
                try:
                    await asyncio.wait_for(self._arrived.wait(), deadline - time.monotonic())
                except asyncio.TimeoutError:
                    break
            batch = [p for p in self._pending[:self.max_batch_size] if not p[2].done()]
            del self._pending[:self.max_batch_size]
            if not batch:
                continue
            self._running = len(batch)
            try:
                # torch work runs off the event loop so health checks and new requests are not blocked
                results = await asyncio.to_thread(self.run, [item for _, item, _ in batch])
            except Exception as err:  # noqa: BLE001 - every caller of the batch hears of it
                results = [err] * len(batch)
            finally:
                self._running = 0
            for (_, _, future), result in zip(batch, results):
                if not future.done():
                    if isinstance(result, Exception):
                        future.set_exception(result)
                    else:
                        future.set_result(result)


class QueueFull(Exception):
    """A model's queue holds serve.max_queued_requests already: the request is refused (503)."""


def load_sampler(name: str, uri: str, *, tracking_uri: str | None, imports: list[str], use_gpu: bool,
                 merge: bool) -> tuple[BatchSampler, dict[str, Any]]:
    """Load a model in a replica: its BatchSampler and its card (`loading.model_card`) plus the device."""
    import torch

    from raygen.exports import load_generator
    from raygen.serving.loading import import_modules, model_card

    import_modules(imports)
    loaded = load_generator(uri, tracking_uri)
    device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
    model = loaded.model.to(device).eval()
    logger.info("generator %s loaded from %s on %s", name, uri, device)
    return BatchSampler(model, name=name, device=device, merge=merge), {**model_card(loaded, name=name),
                                                                       "device": device}


def sampler_stats(sampler: BatchSampler) -> dict[str, float]:
    return {"batches": sampler.batches, "forward_calls": sampler.forward_calls, "requests": sampler.jobs_done,
            "images": sampler.images_done, "sample_ms": sampler.sample_ms}


@serve.deployment
class GeneratorServer:
    """One model's replica behind the ingress (an app serving several models)."""

    def __init__(self, name: str, uri: str, *, tracking_uri: str | None, imports: list[str],
                 max_batch_size: int, batch_wait_timeout_s: float, replicas: int, use_gpu: bool,
                 merge: bool = True):
        self.sampler, info = load_sampler(name, uri, tracking_uri=tracking_uri, imports=imports, use_gpu=use_gpu,
                                          merge=merge)
        self.batcher = ContinuousBatcher(self.sampler.run, max_batch_size=max_batch_size,
                                         batch_wait_timeout_s=batch_wait_timeout_s)
        self._info = {**info, "replicas": replicas}

    async def info(self) -> dict[str, Any]:
        return self._info

    async def stats(self) -> dict[str, int]:
        """Counters since start: batches, model.sample calls, and the requests and images they sampled."""
        return sampler_stats(self.sampler)

    async def generate(self, job: SampleJob) -> dict[str, Any]:
        """Returns {"images": uint8 [n, H, W, C], "seeds", "sample_ms", "batch_images"} or {"error", "status"}."""
        return await self.batcher.submit(job)


class _LocalCall:
    """An in-process call shaped like Serve's DeploymentResponse: awaitable and cancellable."""

    def __init__(self, coro):
        self._task = asyncio.ensure_future(coro)

    def __await__(self):
        return self._task.__await__()

    def cancel(self) -> None:
        self._task.cancel()  # a request still queued in the batcher is then dropped unsampled


class _LocalMethod:
    def __init__(self, fn):
        self._fn = fn

    def remote(self, *args):
        return _LocalCall(self._fn(*args))


class LocalGenerator:
    """A model in the ingress's own process, with a deployment handle's shape
    (`.generate.remote(job)`, `.info.remote()`) for `ingress.Frontend`.

    At most `max_in_flight` requests queue or run (2 x max_batch_size plus
    serve.max_queued_requests, as for a separate generator replica); more
    are refused with `QueueFull`."""

    def __init__(self, batcher: ContinuousBatcher, info: dict[str, Any], *, max_in_flight: int):
        self.batcher = batcher
        self.max_in_flight = max_in_flight
        self._info = info
        self.generate = _LocalMethod(self._generate)
        self.info = _LocalMethod(self._describe)

    async def _generate(self, job: SampleJob) -> dict[str, Any]:
        if self.batcher.in_flight >= self.max_in_flight:
            raise QueueFull(f"{self.batcher.in_flight} requests queued or running")
        return await self.batcher.submit(job)

    async def _describe(self) -> dict[str, Any]:
        return self._info


@serve.deployment
@serve.ingress()
class ModelServer:
    """An app serving ONE model: the HTTP front door and the model share each replica.

    The same `Frontend` as the separate ingress, with the model as a
    `LocalGenerator`: a request makes one Ray hop (proxy -> replica) instead
    of two (proxy -> ingress -> generator), which on 2 CPU cores is most of
    the HTTP path's overhead. Replicas scale the model and its front door
    together."""

    def __init__(self, name: str, uri: str, scorer: Any, *, card: dict, tracking_uri: str | None,
                 imports: list[str], max_batch_size: int, batch_wait_timeout_s: float, max_queued_requests: int,
                 replicas: int, use_gpu: bool, max_n: int, request_timeout_s: float, reranking: str,
                 merge: bool = True):
        from raygen.serving.ingress import Frontend

        self.sampler, info = load_sampler(name, uri, tracking_uri=tracking_uri, imports=imports, use_gpu=use_gpu,
                                          merge=merge)
        batcher = ContinuousBatcher(self.sampler.run, max_batch_size=max_batch_size,
                                    batch_wait_timeout_s=batch_wait_timeout_s)
        local = LocalGenerator(batcher, {**info, "replicas": replicas},
                               max_in_flight=2 * max_batch_size + max_queued_requests)
        self.front = Frontend({name: local}, scorer, cards=[card], default_model=name, max_n=max_n,
                              request_timeout_s=request_timeout_s, reranking=reranking)

    async def stats(self) -> dict[str, int]:
        return sampler_stats(self.sampler)

    def __serve_build_asgi_app__(self):
        from raygen.serving.ingress import make_api

        return make_api(self.front)


@serve.deployment
class ScorerServer:
    """Best-of-n reranking: scores candidates against a text with a CLIP-style
    scorer (`raygen.metrics.load_scorer`) and keeps the best k (`raygen.metrics.BestOfN`)."""

    def __init__(self, spec: str, loader: str, *, tracking_uri: str | None, imports: list[str] = (),
                 use_gpu: bool):
        import torch

        from raygen.metrics import BestOfN
        from raygen.serving.loading import import_modules

        import_modules(list(imports))
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
