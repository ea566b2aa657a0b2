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
import functools
import importlib
import logging
import threading
import time
from typing import Any, Sequence

import numpy as np
from ray import serve

from raygen.serving.metrics import metrics
from raygen.serving.requests import SampleJob
from raygen.serving.streaming import StreamItem, stream_job

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
        self.family = getattr(model, "family", "") or ""
        # what ran so far (tests and benchmarks read it): batches, model.sample calls, requests, images,
        # and the milliseconds spent in model.sample
        self.batches = self.forward_calls = self.jobs_done = self.images_done = 0
        self.sample_ms = 0.0
        self.stream_steps = self.cancelled = 0  # sampling steps run for streamed requests; streams cut short
        self.run_id: str | None = None  # the MLflow run of the weights, returned with each result

    def run(self, jobs: Sequence[SampleJob]) -> list[dict[str, Any]]:
        """One result per job, in order: {"images": uint8 [n, H, W, C], "seeds", "sample_ms", "batch_images"}
        or {"error", "status"}."""
        self.batches += 1
        groups: dict[tuple, tuple[Any, list[int]]] = {}
        results: list[dict[str, Any]] = [{}] * len(jobs)
        for i, job in enumerate(jobs):
            stream = None
            if isinstance(job, StreamItem):  # a streamed request: sampled alone, with its preview callback
                job, stream = job.job, job.sink
            try:
                params = self.model.sampling_params.model_validate(job.params)
            except ValueError as err:  # the ingress validated these already: only a version skew gets here
                results[i] = {"error": f"model {self.name!r} rejected the sampling params: {err}", "status": 422}
                continue
            if stream is not None:
                result = self._alone(job, params, stream)
                self.stream_steps += stream.steps
                self.cancelled += int(result.get("status") == 499)
                results[i] = {**result, "run_id": self.run_id} if "images" in result else result
                continue
            key = (job.kind, repr(params.key()), job.size)  # one forward call draws one size
            groups.setdefault(key, (params, []))[1].append(i)
        for params, members in groups.values():
            group = [jobs[i] for i in members]
            if self.merge and len(group) > 1:
                out = self._merged(group, params)
            else:
                out = [self._alone(job, params) for job in group]
            for i, result in zip(members, out):
                results[i] = {**result, "run_id": self.run_id} if "images" in result else result
        return results

    def _forward(self, jobs: Sequence[SampleJob], params, stream=None) -> tuple[np.ndarray, list[int], float]:
        import torch

        from raygen.models import Conditions
        from raygen.models.sampling import image_seeds, make_generators, previewing
        from raygen.images import to_uint8

        t0 = time.perf_counter()
        conditions = Conditions.cat([Conditions.repeat(job.kind, job.condition, job.n) for job in jobs])
        seeds = [s for job in jobs for s in image_seeds(job.seed, job.n)]
        self.forward_calls += 1
        size = jobs[0].size  # equal within a merged group (the group key holds it)
        with torch.inference_mode(), previewing(stream):
            generators = make_generators(seeds, self.device)
            if size is None:
                images = self.model.sample(conditions, params, generators)
            else:  # the request checked that the model can render (requests.render_size)
                images = self.model.render(conditions, params, generators, *size)
        self.jobs_done += len(jobs)
        self.images_done += len(seeds)
        self.sample_ms += (time.perf_counter() - t0) * 1e3
        metrics().sampled(self.name, self.family, len(seeds), time.perf_counter() - t0)
        expected = (len(seeds), *self.shape) if size is None else (len(seeds), self.shape[0], *size)
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

    def _alone(self, job: SampleJob, params, stream=None) -> dict[str, Any]:
        from raygen.models.sampling import SamplingCancelled

        try:
            images, seeds, ms = self._forward([job], params, stream)
        except SamplingCancelled as err:
            logger.info("%s", err)
            return {"error": str(err), "status": 499}  # nobody is listening: no client sees this
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
            if _alone(self._pending[0][1]):
                deadline = 0.0  # a streamed request waits for no company: it runs alone
            while len(self._pending) < self.max_batch_size and time.monotonic() < deadline:
                self._arrived.clear()
                try:
                    await asyncio.wait_for(self._arrived.wait(), deadline - time.monotonic())
                except asyncio.TimeoutError:
                    break
            head = self._pending[:self.max_batch_size]
            # a streamed request is a batch of its own; others in the window wait for the next batch
            taken = head[:1] if _alone(head[0][1]) else [p for p in head if not _alone(p[1])]
            self._pending = [p for p in self._pending if not any(p is t for t in taken)]
            batch = [p for p in taken if not p[2].done()]
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


def _alone(item: Any) -> bool:
    return bool(getattr(item, "alone", False))


class QueueFull(Exception):
    """A model's queue holds serve.max_queued_requests already: the request is refused (503)."""


def load_sampler(name: str, uri: str, *, tracking_uri: str | None, imports: list[str], use_gpu: bool,
                 merge: bool, measure_batch: int = 0) -> tuple[BatchSampler, dict[str, Any]]:
    """Load a model in a replica: its BatchSampler and its card (`loading.model_card`) plus the device.
    measure_batch > 0: a warm-up sample at that batch measures the model's serving memory
    (`memory.load_measured`), reported in the card as `serving_memory`."""
    import torch

    from raygen.exports import load_generator
    from raygen.serving.loading import import_modules, model_card, registry_info
    from raygen.serving.memory import load_measured

    import_modules(imports)
    device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
    holder = {}

    def load():
        holder["loaded"] = loaded = load_generator(uri, tracking_uri)
        loaded.model = loaded.model.to(device).eval()
        return loaded.model

    model, memory = load_measured(load, uri, batch=measure_batch, device=device)
    loaded = holder["loaded"]
    logger.info("generator %s loaded from %s on %s (memory: %s)", name, uri, device, memory)
    card = {**model_card(loaded, name=name), "device": device, "registry": registry_info(uri, tracking_uri),
            "serving_memory": memory}
    sampler = BatchSampler(model, name=name, device=device, merge=merge)
    sampler.run_id = card["run_id"]
    return sampler, card


class ModelSlot:
    """The model a replica samples with now.

    For a `models:/NAME@ALIAS` URI and `poll_s` > 0, a thread asks the registry
    every `poll_s` where the alias points; when it moves, the new version is
    loaded beside the old one and swapped in between batches: a batch already
    running finishes on the old model, the next one runs on the new one, and no
    request is dropped or refused. Responses carry the run_id of the weights
    that drew them, so a client sees the switch."""

    def __init__(self, name: str, uri: str, *, tracking_uri: str | None, imports: list[str], use_gpu: bool,
                 merge: bool, replicas: int, poll_s: float = 0.0, measure_batch: int = 0):
        self.name, self.uri, self.tracking_uri, self.poll_s = name, uri, tracking_uri, poll_s
        self._load = functools.partial(load_sampler, name, uri, tracking_uri=tracking_uri, imports=imports,
                                       use_gpu=use_gpu, merge=merge, measure_batch=measure_batch)
        self.sampler, info = self._load()
        self.info = {**info, "replicas": replicas}
        self.swaps = 0
        self._stop = threading.Event()
        registry = info.get("registry") or {}
        if poll_s > 0 and registry.get("alias"):
            threading.Thread(target=self._follow, daemon=True, name=f"raygen-follow-{name}").start()

    def run(self, jobs: Sequence[SampleJob]) -> list[dict[str, Any]]:
        return self.sampler.run(jobs)  # read once: a whole batch runs on one model

    def close(self) -> None:
        self._stop.set()

    def _follow(self) -> None:
        from raygen.serving.loading import registry_info

        while not self._stop.wait(self.poll_s):
            try:
                now = registry_info(self.uri, self.tracking_uri)["version"]
                if now == self.info["registry"]["version"]:
                    continue
                sampler, info = self._load()
            except Exception as err:  # noqa: BLE001 - a registry hiccup keeps the model that serves now
                logger.warning("following %s for %s failed (%s); keeping version %s", self.uri, self.name, err,
                               self.info["registry"]["version"])
                continue
            self.sampler, self.info = sampler, {**info, "replicas": self.info["replicas"]}
            self.swaps += 1
            logger.info("%s now serves %s version %s (run %s)", self.name, self.uri, info["registry"]["version"],
                        info["run_id"])


def sampler_stats(sampler: BatchSampler) -> dict[str, float]:
    return {"batches": sampler.batches, "forward_calls": sampler.forward_calls, "requests": sampler.jobs_done,
            "images": sampler.images_done, "sample_ms": sampler.sample_ms, "stream_steps": sampler.stream_steps,
            "cancelled": sampler.cancelled}


@serve.deployment
class GeneratorServer:
    """One model's replica behind the ingress (an app serving several models)."""

    def __init__(self, name: str, uri: str, *, tracking_uri: str | None, imports: list[str],
                 max_batch_size: int, batch_wait_timeout_s: float, replicas: int, use_gpu: bool,
                 merge: bool = True, alias_poll_s: float = 0.0):
        self.slot = ModelSlot(name, uri, tracking_uri=tracking_uri, imports=imports, use_gpu=use_gpu, merge=merge,
                              replicas=replicas, poll_s=alias_poll_s, measure_batch=max_batch_size)
        self.batcher = ContinuousBatcher(self.slot.run, max_batch_size=max_batch_size,
                                         batch_wait_timeout_s=batch_wait_timeout_s)

    async def info(self) -> dict[str, Any]:
        return self.slot.info

    async def stats(self) -> dict[str, int]:
        """Counters since start: batches, model.sample calls, and the requests and images they sampled."""
        return sampler_stats(self.slot.sampler)

    async def generate(self, job: SampleJob) -> dict[str, Any]:
        """Returns {"images": uint8 [n, H, W, C], "seeds", "sample_ms", "batch_images"} or {"error", "status"}."""
        return await self.batcher.submit(job)

    async def generate_stream(self, job: SampleJob, partial_images: int):
        """Streamed previews (call with `handle.options(stream=True)`): partial events, then the result.
        A caller that cancels the stream stops the sampling at its next step."""
        sampler = self.slot.sampler
        async for event in stream_job(self.batcher.submit, job, partial_images, model=sampler.name,
                                      family=sampler.family):
            yield event


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

    def __init__(self, batcher: ContinuousBatcher, slot: "ModelSlot", *, max_in_flight: int):
        self.batcher = batcher
        self.max_in_flight = max_in_flight
        self.slot = slot
        self.generate = _LocalMethod(self._generate)
        self.info = _LocalMethod(self._describe)

    def open_stream(self, job: SampleJob, partial_images: int):
        """Streamed previews (`streaming.stream_job`); refused at once with QueueFull like generate."""
        if self.batcher.in_flight >= self.max_in_flight:
            raise QueueFull(f"{self.batcher.in_flight} requests queued or running")
        sampler = self.slot.sampler
        return stream_job(self.batcher.submit, job, partial_images, model=sampler.name, family=sampler.family)

    async def _generate(self, job: SampleJob) -> dict[str, Any]:
        if self.batcher.in_flight >= self.max_in_flight:
            raise QueueFull(f"{self.batcher.in_flight} requests queued or running")
        return await self.batcher.submit(job)

    async def _describe(self) -> dict[str, Any]:
        return self.slot.info


def local_generator(name: str, uri: str, *, tracking_uri: str | None, imports: list[str], use_gpu: bool,
                    merge: bool, max_batch_size: int, batch_wait_timeout_s: float, max_queued_requests: int,
                    replicas: int, alias_poll_s: float = 0.0) -> tuple[ModelSlot, LocalGenerator]:
    """A model loaded in this process behind its batcher, shaped like a deployment handle."""
    slot = ModelSlot(name, uri, tracking_uri=tracking_uri, imports=imports, use_gpu=use_gpu, merge=merge,
                     replicas=replicas, poll_s=alias_poll_s, measure_batch=max_batch_size)
    batcher = ContinuousBatcher(slot.run, max_batch_size=max_batch_size, batch_wait_timeout_s=batch_wait_timeout_s)
    return slot, LocalGenerator(batcher, slot, max_in_flight=2 * max_batch_size + max_queued_requests)


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
                 merge: bool = True, http: dict | None = None, alias_poll_s: float = 0.0):
        from raygen.serving.ingress import Frontend, HttpOptions

        self.slot, local = local_generator(
            name, uri, tracking_uri=tracking_uri, imports=imports, use_gpu=use_gpu, merge=merge,
            max_batch_size=max_batch_size, batch_wait_timeout_s=batch_wait_timeout_s,
            max_queued_requests=max_queued_requests, replicas=replicas, alias_poll_s=alias_poll_s)
        self.http = HttpOptions.model_validate(http or {})
        self.front = Frontend({name: local}, scorer, cards=[card], default_model=name, max_n=max_n,
                              request_timeout_s=request_timeout_s, reranking=reranking, files=self.http.file_store())

    async def stats(self) -> dict[str, int]:
        return sampler_stats(self.slot.sampler)

    def __serve_build_asgi_app__(self):
        from raygen.serving.ingress import make_api

        return make_api(self.front, **self.http.api_kwargs())


class BatchScorer:
    """Reranks the candidates of many requests with few scorer calls: the requests a
    `ContinuousBatcher` collected are scored together (one `similarity` call per image
    size, each image against its own request's text), then each request keeps its best k,
    best first (a stable sort: ties keep the generation order, as `BestOfN` does)."""

    def __init__(self, scorer):
        self.scorer = scorer
        self.calls = self.requests = 0

    def run(self, jobs: Sequence[tuple[str, np.ndarray, int]]) -> list:
        import torch

        results: list = [None] * len(jobs)
        groups: dict[tuple, list[int]] = {}
        for i, (_, images, _) in enumerate(jobs):
            groups.setdefault(tuple(images.shape[1:]), []).append(i)
        for members in groups.values():
            images = np.concatenate([jobs[i][1] for i in members])
            texts = [jobs[i][0] for i in members for _ in range(len(jobs[i][1]))]
            batch = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div(255.0)
            try:
                with torch.inference_mode():
                    scores = torch.as_tensor(self.scorer.similarity(batch, texts)).float().cpu().view(-1)
                if scores.numel() != len(texts):
                    raise RuntimeError(f"the scorer returned {scores.numel()} scores for {len(texts)} images")
            except Exception as err:  # noqa: BLE001 - each request of the group hears of it
                for i in members:
                    results[i] = err
                continue
            self.calls += 1
            start = 0
            for i in members:
                n, k = len(jobs[i][1]), jobs[i][2]
                own = scores[start:start + n]
                order = torch.sort(own, descending=True, stable=True).indices[:k]
                results[i] = {"order": [int(j) for j in order], "scores": [float(own[j]) for j in order]}
                start += n
        self.requests += len(jobs)
        return results


@serve.deployment
class ScorerServer:
    """Best-of-n reranking for every generator: scores candidates against a text with a
    CLIP-style scorer (`raygen.metrics.load_scorer`, anything with `similarity(images,
    texts)`) and keeps the best k. Concurrent requests are scored in one batch
    (`BatchScorer`)."""

    def __init__(self, spec: str, loader: str, *, tracking_uri: str | None, imports: list[str] = (),
                 use_gpu: bool, max_batch_size: int = 16):
        import torch

        from raygen.serving.loading import import_modules

        import_modules(list(imports))
        device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
        module, _, func = loader.partition(":")
        scorer = getattr(importlib.import_module(module), func)(spec, device=device, tracking_uri=tracking_uri)
        self.scorer = BatchScorer(scorer)
        self.batcher = ContinuousBatcher(self.scorer.run, max_batch_size=max_batch_size, batch_wait_timeout_s=0.0)
        logger.info("scorer %s loaded on %s", spec, device)

    async def rerank(self, text: str, images: np.ndarray, k: int) -> dict[str, list]:
        """images: uint8 [n, H, W, C]. Returns the indices of the best k (best first) and their scores."""
        return await self.batcher.submit((text, images, k))

    async def stats(self) -> dict[str, int]:
        return {"requests": self.scorer.requests, "calls": self.scorer.calls}


class MultiplexedHandle:
    """One multiplexed model seen as a generator handle (`.generate.remote(job)`, `.info.remote()`):
    calls go to the shared multiplex deployment, routed by Serve to a replica that holds the model."""

    def __init__(self, handle, model_id: str):
        self.generate = _LocalMethod(lambda job: _awaiting(
            handle.options(multiplexed_model_id=model_id).generate.remote(job)))
        self.info = _LocalMethod(lambda: _awaiting(handle.info.remote(model_id)))
        self._handle, self._model_id = handle, model_id

    def open_stream(self, job: SampleJob, partial_images: int):
        return self._handle.options(multiplexed_model_id=self._model_id, stream=True).generate_stream.remote(
            job, partial_images)


async def _awaiting(response):
    try:
        return await response
    except asyncio.CancelledError:
        response.cancel()  # a caller's timeout frees the replica's slot
        raise


def multiplex_deployment(per_replica: int):
    """The deployment class holding many models (fine-tunes) per replica: a model is loaded when a
    request first names it, and the least recently used is dropped when a replica holds `per_replica`
    (`serve.multiplexed`). Requests select it by their `model` field; the ingress routes them."""

    @serve.deployment
    class MultiplexServer:
        def __init__(self, uris: dict[str, str], cards: dict[str, dict], *, tracking_uri: str | None,
                     imports: list[str], max_batch_size: int, batch_wait_timeout_s: float, use_gpu: bool,
                     merge: bool = True):
            from raygen.serving.loading import import_modules

            import_modules(imports)
            self.uris, self.cards = uris, cards
            self.options = dict(tracking_uri=tracking_uri, imports=imports, use_gpu=use_gpu, merge=merge)
            self.batching = dict(max_batch_size=max_batch_size, batch_wait_timeout_s=batch_wait_timeout_s)
            self.loads = 0
            self.device = "cuda" if use_gpu else "cpu"

        @serve.multiplexed(max_num_models_per_replica=per_replica)
        async def model(self, model_id: str) -> ContinuousBatcher:
            if model_id not in self.uris:
                raise KeyError(f"no multiplexed model {model_id!r}")
            sampler, _ = await asyncio.to_thread(load_sampler, model_id, self.uris[model_id], **self.options)
            self.loads += 1
            return ContinuousBatcher(sampler.run, **self.batching)

        async def generate(self, job: SampleJob) -> dict[str, Any]:
            batcher = await self.model(serve.get_multiplexed_model_id())
            return await batcher.submit(job)

        async def generate_stream(self, job: SampleJob, partial_images: int):
            model_id = serve.get_multiplexed_model_id()
            batcher = await self.model(model_id)
            async for event in stream_job(batcher.submit, job, partial_images, model=model_id,
                                          family=self.cards[model_id]["family"]):
                yield event

        async def info(self, model_id: str) -> dict[str, Any]:
            return {**self.cards[model_id], "device": self.device, "replicas": 1, "multiplexed": True}

        async def stats(self) -> dict[str, Any]:
            return {"loads": self.loads}

    return MultiplexServer
