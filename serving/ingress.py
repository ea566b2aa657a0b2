"""The HTTP front door: FastAPI routes, error bodies, and fan-out to the model deployments.

Every error leaves as JSON `{"error": "...", "field": "..."}`: validation
problems as 4xx naming the field, a full queue as 503, a slow generation as
504, and anything unexpected as a 500 with a one-line message (the traceback
goes to the replica log, not to the client).

The FastAPI app is built per replica from the served models' cards
(`make_api`), so the OpenAPI schema documents each model's condition and
sampling parameters with their real types and ranges. `Frontend` holds the
logic without FastAPI or Ray: tests drive it with stand-in deployment handles.
"""
# No `from __future__ import annotations`: FastAPI reads the routes' annotations at run time.
import asyncio
import base64
import contextlib
import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any, Optional

from fastapi import FastAPI, Request
from pydantic import BaseModel, ConfigDict, Field
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse, JSONResponse, Response
from ray import serve
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from raygen.images import grid, png_base64, png_bytes
from raygen.models.sampling import image_seeds
from raygen.serving.deployments import QueueFull
from raygen.serving.guard import DEFAULT_MAX_BODY_BYTES, Guard, error_body
from raygen.serving.metrics import metrics
from raygen.serving.openai_images import (MEDIA_TYPES, FileStore, ImagesRequest, check_size, completed_event,
                                          default_files_dir, encode, parse_openai, partial_event, size_fields,
                                          to_generate_body)
from raygen.serving.requests import RequestError, ServedModel, pick_model, resolve
from raygen.serving.schema import (ErrorBody, GenerateResponse, HealthResponse, ImagesResponse, ModelsResponse,
                                   OpenAIErrorBody, request_schemas)
from raygen.serving.streaming import EventStream, sse

logger = logging.getLogger("ray.serve")

PAGE = (Path(__file__).parent / "static" / "index.html").read_text(encoding="utf-8")
TITLE = "raygen"
DESCRIPTION = ("Generate images with models trained by raygen. `POST /v1/generate` with JSON; `GET /v1/models` "
               "lists the models, their condition, their sampling parameters (JSON schema) and their data.")
_ERRORS = {code: {"model": ErrorBody} for code in (400, 401, 404, 413, 422, 501, 503, 504)}


def error(status: int, message: str, field: Optional[str] = None, headers: Optional[dict] = None) -> JSONResponse:
    return JSONResponse({"error": message, "field": field}, status_code=status, headers=headers)


async def _await(response):
    return await response


def short(err: BaseException) -> str:
    """One line about an error; a Ray task error is reduced to its cause (its text holds a remote traceback)."""
    cause = getattr(err, "cause", None)
    if isinstance(cause, BaseException):
        err = cause
    text = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return f"{type(err).__name__}: {text[:300]}" if text else type(err).__name__


class Frontend:
    """What the ingress does for each route, given handles to the model deployments.

    `generators` maps model names to handles whose `.generate.remote(job)` and
    `.info.remote()` return awaitables (Serve's DeploymentHandles, or stand-ins
    in tests); `scorer` likewise has `.rerank.remote(text, images, k)`."""

    def __init__(self, generators: dict[str, Any], scorer: Optional[Any], *, cards: list[dict], default_model: str,
                 max_n: int, request_timeout_s: float, reranking: str, params_classes: Optional[dict] = None,
                 files: Optional[FileStore] = None):
        self.generators = generators
        self.scorer = scorer
        self.cards = cards
        self.models = {c["name"]: ServedModel.from_card(c, (params_classes or {}).get(c["name"])) for c in cards}
        self.default_model = default_model
        self.max_n = max_n
        self.timeout = request_timeout_s
        self.reranking = reranking
        self.files = files
        self._infos: Optional[dict[str, dict]] = None
        self._lock = asyncio.Lock()

    async def infos(self) -> dict[str, dict]:
        """Model descriptions as first asked of each generator: the readiness check (/v1/models asks afresh)."""
        if self._infos is None:
            async with self._lock:
                if self._infos is None:
                    names = list(self.generators)
                    found = await asyncio.gather(*(self.generators[n].info.remote() for n in names))
                    self._infos = dict(zip(names, found))
        return self._infos

    async def healthz(self):
        try:
            infos = await asyncio.wait_for(self.infos(), timeout=10.0)
        except Exception as err:  # noqa: BLE001 - any failure here means "not ready"
            return error(503, f"models are not ready: {short(err)}")
        return {"status": "ok", "models": list(infos), "reranking": self.reranking}

    async def list_models(self):
        await self.infos()
        names = list(self.generators)
        # asked afresh: a model that follows a registry alias changes version while serving
        infos = await asyncio.gather(*(self.generators[n].info.remote() for n in names))
        return {"models": list(infos), "default_model": self.default_model, "max_n": self.max_n,
                "reranking": self.reranking}

    async def _ready(self) -> None:
        if self._infos is None:
            try:
                await asyncio.wait_for(self.infos(), timeout=self.timeout)
            except Exception as err:  # noqa: BLE001 - generators that cannot describe themselves are not ready
                raise RequestError(f"models are not ready: {short(err)}", None, 503, headers={"Retry-After": "5"},
                                   code="not_ready") from None

    @contextlib.contextmanager
    def _failures(self, plan):
        """Turns what a deployment call raises into a RequestError with the right status."""
        try:
            yield
        except RequestError:
            raise
        except asyncio.TimeoutError:
            raise RequestError(f"generation did not finish within {self.timeout:g} s (serve.request_timeout_s)",
                               None, 504, code="timeout") from None
        except (BackPressureError, QueueFull):
            metrics().rejected(plan.model)
            raise RequestError("the server is busy: the model's queue is full (serve.max_queued_requests); retry "
                               "shortly", None, 503, headers={"Retry-After": "1"}, code="server_busy") from None
        except DeploymentUnavailableError as err:
            raise RequestError(f"the model is unavailable: {short(err)}", None, 503, headers={"Retry-After": "5"},
                               code="model_unavailable") from None
        except Exception as err:  # noqa: BLE001 - a failed replica call is a 500 with a message, not a traceback
            logger.exception("generate failed for %r", plan)
            raise RequestError(f"internal error: {short(err)}", None, 500, code="internal_error") from None

    async def _sample(self, plan, deadline: float) -> tuple[Any, list[int], list, Optional[str]]:
        """(images uint8 [k, H, W, C], their seeds, their scores or Nones, the run_id of the weights);
        failures raise RequestError."""
        await self._ready()
        with self._failures(plan):
            result = await self._call(self.generators[plan.model].generate.remote(plan.job), deadline)
            return await self._finish(plan, result, deadline)

    async def _finish(self, plan, result: dict, deadline: float) -> tuple[Any, list[int], list, Optional[str]]:
        """A generator's result, reranked when best_of asks, cut to the images the client keeps."""
        if "error" in result:
            raise RequestError(result["error"], None, result["status"],
                               code="model_rejected" if result["status"] == 422 else "generation_failed")
        images, seeds = result["images"], list(result["seeds"])
        scores: list = [None] * plan.keep
        if plan.rerank_text is not None:
            ranked = await self._call(self.scorer.rerank.remote(plan.rerank_text, images, plan.keep), deadline)
            order = list(ranked["order"])
            images, seeds, scores = images[order], [seeds[i] for i in order], [float(s) for s in ranked["scores"]]
        else:
            images, seeds = images[:plan.keep], seeds[:plan.keep]
        return images, seeds, scores, result.get("run_id") or self.models[plan.model].card["run_id"]

    def _open_stream(self, plan):
        handle = self.generators[plan.model]
        if isinstance(handle, DeploymentHandle):  # a generator deployment (any attribute is a method there)
            return handle.options(stream=True).generate_stream.remote(plan.job, plan.partial_images)
        return handle.open_stream(plan.job, plan.partial_images)  # a model in this process, or a multiplexed one

    async def _stream(self, plan, deadline: float):
        """("partial", event) for each preview, then ("result", (images, seeds, scores, run_id));
        failures raise RequestError. Closing it early cancels the sampling."""
        await self._ready()
        with self._failures(plan):
            stream = self._open_stream(plan)
        try:
            while True:
                with self._failures(plan):
                    try:
                        event = await asyncio.wait_for(stream.__anext__(), max(deadline - time.perf_counter(),
                                                                                0.001))
                    except StopAsyncIteration:
                        raise RequestError("the model's stream ended without a result", None, 500,
                                           code="internal_error") from None
                if event["type"] == "partial":
                    yield "partial", event
                    continue
                with self._failures(plan):
                    done = await self._finish(plan, event, deadline)
                yield "result", done
                return
        finally:
            cancel = getattr(stream, "cancel", None)  # a Serve stream; a local one is an async generator
            if cancel is not None:
                cancel()
            else:
                with contextlib.suppress(RuntimeError):  # still running in a cancelled wait: it closes itself
                    await stream.aclose()

    async def _first(self, plan, start: float):
        """Starts a stream and waits for its first event, so that a refusal (a full queue, a bad value)
        is still an HTTP status rather than an event."""
        events = self._stream(plan, start + self.timeout)
        try:
            return await events.__anext__(), events
        except BaseException:
            await events.aclose()
            raise

    @staticmethod
    async def _encode_previews(images, encode_one) -> list:
        return [encode_one(im) for im in images] if images[0].size * len(images) <= 65536 else \
            await asyncio.to_thread(lambda: [encode_one(im) for im in images])

    async def generate(self, body: Any):
        start = time.perf_counter()
        try:
            plan = resolve(body, self.models, default_model=self.default_model, max_n=self.max_n,
                           reranking=self.reranking)
            if plan.stream:
                first, events = await self._first(plan, start)
            else:
                images, seeds, scores, run_id = await self._sample(plan, start + self.timeout)
        except RequestError as err:
            metrics().answered(body.get("model") if isinstance(body, dict) else None, "generate", err.status)
            return error(err.status, err.message, err.field, err.headers)
        if plan.stream:
            return EventStream(self._generate_events(plan, first, events, start))
        metrics().answered(plan.model, "generate", 200)

        if plan.format == "png":
            body = await asyncio.to_thread(lambda: png_bytes(images[0] if len(images) == 1 else grid(images)))
            headers = {"X-Raygen-Model": plan.model, "X-Raygen-Seed": str(plan.job.seed),
                       "X-Raygen-Seeds": ",".join(str(s) for s in seeds),
                       "X-Raygen-Elapsed-Ms": f"{(time.perf_counter() - start) * 1e3:.1f}"}
            if run_id:
                headers["X-Raygen-Run-Id"] = run_id
            if plan.rerank_text is not None:
                headers["X-Raygen-Scores"] = ",".join(f"{s:.6g}" for s in scores)
            return Response(body, media_type="image/png", headers=headers)
        return JSONResponse(await self._generate_json(plan, images, seeds, scores, run_id, start))

    async def _generate_json(self, plan, images, seeds, scores, run_id, start: float) -> dict:
        # a few tiny PNGs encode faster here than a thread hand-off costs
        encoded = await self._encode_previews(images, png_base64)
        return {"model": plan.model, "run_id": run_id,
                "images": [{"png_base64": b, "seed": s, "score": sc} for b, s, sc in zip(encoded, seeds, scores)],
                "seed": plan.job.seed, "elapsed_ms": round((time.perf_counter() - start) * 1e3, 2)}

    async def _generate_events(self, plan, first, events, start: float):
        """`/v1/generate` with stream: `preview` events, then `result` (the JSON of a plain request) or `error`."""
        seeds = image_seeds(plan.job.seed, plan.job.n)
        try:
            kind, payload = first
            while True:
                if kind == "partial":
                    encoded = await self._encode_previews(payload["images"], png_base64)
                    yield sse("preview", {"index": payload["index"], "step": payload["step"],
                                          "total": payload["total"],
                                          "images": [{"png_base64": b, "seed": s} for b, s in zip(encoded, seeds)]})
                else:
                    metrics().answered(plan.model, "generate", 200)
                    yield sse("result", await self._generate_json(plan, *payload, start))
                    return
                kind, payload = await events.__anext__()
        except RequestError as err:
            metrics().answered(plan.model, "generate", err.status)
            yield sse("error", {"error": err.message, "field": err.field, "status": err.status})
        finally:
            await events.aclose()

    async def images_generations(self, body: Any, base_url: str):
        """OpenAI's `POST /v1/images/generations` (see `raygen.serving.openai_images`)."""
        start = time.perf_counter()
        path = "/v1/images/generations"
        try:
            req, rest = parse_openai(body)
            model = pick_model(req.model, self.models, self.default_model)
            size = check_size(req.size, model)
            generate_body, used = to_generate_body(req, rest, model)
            generate_body.update(size_fields(size, model))  # a render-capable model draws at the asked size
            try:
                plan = resolve(generate_body, self.models, default_model=self.default_model, max_n=self.max_n,
                               reranking=self.reranking)
            except RequestError as err:
                # OpenAI answers a bad value with 400; raygen's own rules say 422
                raise RequestError(err.message, err.field, 400 if err.status == 422 else err.status) from None
            if req.response_format == "url" and self.files is None:
                raise RequestError("this server keeps no files: use response_format b64_json", "response_format",
                                   400)
            if req.partial_images and not req.stream:
                raise RequestError("partial_images needs stream: true", "partial_images", 400)
            if req.stream:
                if req.response_format == "url":
                    raise RequestError("a stream sends images as b64_json: leave response_format out with stream",
                                       "response_format", 400)
                plan = dataclasses.replace(plan, stream=True, partial_images=req.partial_images or 0)
                first, events = await self._first(plan, start)
            else:
                images, seeds, scores, run_id = await self._sample(plan, start + self.timeout)
        except RequestError as err:
            metrics().answered(body.get("model") if isinstance(body, dict) else None, "images", err.status)
            code = err.code or {404: "model_not_found"}.get(err.status)
            return JSONResponse(error_body(path, err.status, err.message, err.field, code),
                                status_code=err.status, headers=err.headers)
        if req.stream:
            return EventStream(self._images_events(plan, req, size, used, first, events))
        metrics().answered(plan.model, "images", 200)
        fmt = req.output_format or "png"

        def encode_one(im):
            return encode(im, fmt, req.output_compression)

        blobs = await self._encode_previews(images, encode_one)
        data = []
        for blob, seed, score in zip(blobs, seeds, scores):
            item = {"revised_prompt": used, "seed": seed, "score": score}
            if req.response_format == "url":
                name, expires = await asyncio.to_thread(self.files.put, blob, fmt)
                item.update(url=f"{base_url.rstrip('/')}/v1/files/{name}", expires_at=expires)
            else:
                item["b64_json"] = base64.b64encode(blob).decode("ascii")
            data.append(item)
        return JSONResponse({"created": int(time.time()), "data": data, "size": size, "output_format": fmt,
                             "model": plan.model, "run_id": run_id,
                             "seed": plan.job.seed})

    async def _images_events(self, plan, req, size: str, used: Optional[str], first, events):
        """OpenAI's stream: `image_generation.partial_image` per preview and image, then
        `image_generation.completed` per image (or an `error` event)."""
        fmt = req.output_format or "png"
        seeds = image_seeds(plan.job.seed, plan.job.n)

        def b64(im) -> str:
            return base64.b64encode(encode(im, fmt, req.output_compression)).decode("ascii")

        try:
            kind, payload = first
            while True:
                if kind == "partial":
                    for i, blob in enumerate(await self._encode_previews(payload["images"], b64)):
                        yield sse("image_generation.partial_image", partial_event(
                            blob, index=payload["index"], size=size, output_format=fmt,
                            image_index=i, seed=seeds[i], step=payload["step"], total=payload["total"]))
                else:
                    images, kept, scores, run_id = payload
                    metrics().answered(plan.model, "images", 200)
                    for i, (blob, seed, score) in enumerate(zip(await self._encode_previews(images, b64), kept,
                                                                scores)):
                        yield sse("image_generation.completed", completed_event(
                            blob, size=size, output_format=fmt, image_index=i, seed=seed, score=score,
                            revised_prompt=used, model=plan.model, run_id=run_id))
                    return
                kind, payload = await events.__anext__()
        except RequestError as err:
            metrics().answered(plan.model, "images", err.status)
            code = err.code or {404: "model_not_found"}.get(err.status)
            yield sse("error", error_body("/v1/images/", err.status, err.message, err.field, code))
        finally:
            await events.aclose()

    def file(self, name: str):
        found = self.files.get(name) if self.files is not None else None
        if found is None:
            return JSONResponse(error_body("/v1/files/", 404, f"no file {name[:80]!r}: unknown or expired"),
                                status_code=404)
        data, media_type = found
        return Response(data, media_type=media_type, headers={"Cache-Control": "private, max-age=3600"})

    async def _call(self, response, deadline: float):
        """Await a deployment call within what is left of the request's time; cancel it when time is up."""
        try:
            return await asyncio.wait_for(_await(response), max(deadline - time.perf_counter(), 0.001))
        except asyncio.TimeoutError:
            response.cancel()  # frees the replica's slot instead of finishing work nobody waits for
            raise

    def openapi_request(self) -> tuple[dict, dict]:
        return request_schemas(self.cards, default_model=self.default_model, max_n=self.max_n,
                               reranking=self.reranking)


class HttpOptions(BaseModel):
    """What the front door checks and keeps, the same on every replica (`AppArgs.http_options()`)."""
    model_config = ConfigDict(extra="forbid")

    max_body_bytes: int = Field(DEFAULT_MAX_BODY_BYTES, ge=1024)
    token_sha256: Optional[str] = Field(None, pattern="^[0-9a-f]{64}$")
    files_dir: Optional[str] = None
    files_ttl_s: float = Field(3600.0, gt=0)

    def file_store(self) -> FileStore:
        return FileStore(self.files_dir or default_files_dir(), self.files_ttl_s)

    def api_kwargs(self) -> dict:
        return {"max_body_bytes": self.max_body_bytes, "token_sha256": self.token_sha256}


def _shaped(request: Request, status: int, message: str, field: Optional[str] = None,
            headers: Optional[dict] = None) -> JSONResponse:
    """An error in the shape of the route asked for (OpenAI's under /v1/images/)."""
    return JSONResponse(error_body(request.url.path, status, message, field), status_code=status, headers=headers)


async def _json_body(request: Request) -> Any:
    raw = await request.body()
    try:
        return json.loads(raw)
    except ValueError as err:  # JSONDecodeError and UnicodeDecodeError
        raise RequestError(f"malformed JSON body: {err}", "body") from None


def make_api(front: Frontend, *, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
             token_sha256: Optional[str] = None) -> FastAPI:
    """The FastAPI app of one ingress replica, behind the token and body-size checks (`guard.Guard`)."""
    api = FastAPI(title=TITLE, version="0.3.0", description=DESCRIPTION)
    api.add_middleware(Guard, max_body_bytes=max_body_bytes, token_sha256=token_sha256)

    @api.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = (exc.errors() or [{"loc": ("body",), "msg": "invalid request"}])[0]
        loc = [str(p) for p in first["loc"][1:]] or ["body"]
        return _shaped(request, 422, f"{loc[0]}: {first['msg']}", loc[0])

    @api.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _shaped(request, exc.status_code, str(exc.detail), None, getattr(exc, "headers", None))

    @api.exception_handler(Exception)
    async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error on %s %s", request.method, request.url.path)
        return _shaped(request, 500, f"internal error: {short(exc)}")

    @api.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def playground() -> HTMLResponse:
        return HTMLResponse(PAGE)

    @api.get("/healthz", response_model=HealthResponse, responses={503: {"model": ErrorBody}})
    async def healthz():
        return await front.healthz()

    @api.get("/v1/models", response_model=ModelsResponse)
    async def models():
        return await front.list_models()

    @api.post("/v1/generate", response_model=GenerateResponse,
              responses={**_ERRORS, 200: {"content": {"image/png": {}, "text/event-stream": {}},
                                          "description": "JSON, one PNG when format is png, or server-sent "
                                                         "events (preview, result, error) with stream"}})
    async def generate(request: Request):
        try:
            body = await _json_body(request)
        except RequestError as err:
            return error(err.status, err.message, err.field)
        return await front.generate(body)

    @api.post("/v1/images/generations", response_model=ImagesResponse,
              responses={200: {"content": {"text/event-stream": {}}, "description": "JSON, or with stream "
                               "server-sent events (image_generation.partial_image, image_generation.completed)"},
                         **{code: {"model": OpenAIErrorBody} for code in (400, 401, 404, 413, 422, 429, 503, 504)}})
    async def images_generations(request: Request):
        try:
            body = await _json_body(request)
        except RequestError as err:
            return _shaped(request, 400, err.message, err.field)
        return await front.images_generations(body, str(request.base_url))

    @api.get("/metrics", response_class=Response, responses={200: {"content": {"text/plain": {}}}})
    async def prometheus_metrics():
        """raygen's metrics of this process (a replica) in Prometheus text; in a Ray cluster the same
        metrics, summed over replicas, are exported with Serve's by Ray (`ray_raygen_*`)."""
        return Response(metrics().text(), media_type="text/plain; version=0.0.4")

    @api.get("/v1/files/{name}", response_class=Response,
             responses={200: {"content": {m: {} for m in MEDIA_TYPES.values()}}, 404: {"model": ErrorBody}})
    async def files(name: str):
        return front.file(name)

    def openapi() -> dict:
        if api.openapi_schema is None:
            schema = get_openapi(title=api.title, version=api.version, description=api.description,
                                 routes=api.routes)
            body, components = front.openapi_request()
            schema.setdefault("components", {}).setdefault("schemas", {}).update(components)
            schema["paths"]["/v1/generate"]["post"]["requestBody"] = {
                "required": True, "content": {"application/json": {"schema": body}}}
            images = ImagesRequest.model_json_schema()
            images["additionalProperties"] = True  # extra_body: seed, best_of, the condition, family parameters
            images["description"] = ("OpenAI's images request; any other field is passed on as in /v1/generate "
                                     "(seed, best_of, k, the model's condition and sampling parameters)")
            schema["components"]["schemas"]["ImagesRequest"] = images
            schema["paths"]["/v1/images/generations"]["post"]["requestBody"] = {
                "required": True, "content": {"application/json": {"schema": {
                    "$ref": "#/components/schemas/ImagesRequest"}}}}
            api.openapi_schema = schema
        return api.openapi_schema

    api.openapi = openapi
    return api


@serve.deployment
@serve.ingress()
class Ingress:
    """The ingress deployment; its FastAPI app is built after the constructor (`__serve_build_asgi_app__`)."""

    def __init__(self, generators: dict[str, Any], scorer: Optional[Any], *, cards: list[dict], imports: list[str],
                 default_model: str, max_n: int, request_timeout_s: float, reranking: str,
                 http: Optional[dict] = None, multiplexed: Optional[dict] = None):
        from raygen.serving.deployments import MultiplexedHandle
        from raygen.serving.loading import import_modules

        import_modules(imports)  # the families of the served models: their params classes check requests here
        generators = dict(generators)
        for name in (multiplexed or {}).get("models", []):  # many models behind one deployment
            generators[name] = MultiplexedHandle(multiplexed["handle"], name)
        self.http = HttpOptions.model_validate(http or {})
        self.front = Frontend(generators, scorer, cards=cards, default_model=default_model, max_n=max_n,
                              request_timeout_s=request_timeout_s, reranking=reranking, files=self.http.file_store())

    def __serve_build_asgi_app__(self) -> FastAPI:
        return make_api(self.front, **self.http.api_kwargs())
