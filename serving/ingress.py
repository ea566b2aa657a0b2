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
import json
import logging
import time
from pathlib import Path
from typing import Any, Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse, JSONResponse, Response
from ray import serve
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from starlette.exceptions import HTTPException as StarletteHTTPException

from raygen.images import grid, png_base64, png_bytes
from raygen.serving.deployments import QueueFull
from raygen.serving.requests import RequestError, ServedModel, resolve
from raygen.serving.schema import ErrorBody, GenerateResponse, HealthResponse, ModelsResponse, request_schemas

logger = logging.getLogger("ray.serve")

PAGE = (Path(__file__).parent / "static" / "index.html").read_text(encoding="utf-8")
TITLE = "raygen"
DESCRIPTION = ("Generate images with models trained by raygen. `POST /v1/generate` with JSON; `GET /v1/models` "
               "lists the models, their condition, their sampling parameters (JSON schema) and their data.")
_ERRORS = {code: {"model": ErrorBody} for code in (400, 404, 422, 501, 503, 504)}


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
                 max_n: int, request_timeout_s: float, reranking: str, params_classes: Optional[dict] = None):
        self.generators = generators
        self.scorer = scorer
        self.cards = cards
        self.models = {c["name"]: ServedModel.from_card(c, (params_classes or {}).get(c["name"])) for c in cards}
        self.default_model = default_model
        self.max_n = max_n
        self.timeout = request_timeout_s
        self.reranking = reranking
        self._infos: Optional[dict[str, dict]] = None
        self._lock = asyncio.Lock()

    async def infos(self) -> dict[str, dict]:
        """Model descriptions, asked of each generator once (they do not change while serving)."""
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
        infos = await self.infos()
        return {"models": list(infos.values()), "default_model": self.default_model, "max_n": self.max_n,
                "reranking": self.reranking}

    async def generate(self, body: Any):
        start = time.perf_counter()
        deadline = start + self.timeout
        try:
            plan = resolve(body, self.models, default_model=self.default_model, max_n=self.max_n,
                           reranking=self.reranking)
        except RequestError as err:
            return error(err.status, err.message, err.field)
        if self._infos is None:
            try:
                await asyncio.wait_for(self.infos(), timeout=self.timeout)
            except Exception as err:  # noqa: BLE001 - generators that cannot describe themselves are not ready
                return error(503, f"models are not ready: {short(err)}", headers={"Retry-After": "5"})

        try:
            result = await self._call(self.generators[plan.model].generate.remote(plan.job), deadline)
            if "error" in result:
                return error(result["status"], result["error"])
            images, seeds = result["images"], list(result["seeds"])
            scores: list = [None] * plan.keep
            if plan.rerank_text is not None:
                ranked = await self._call(self.scorer.rerank.remote(plan.rerank_text, images, plan.keep), deadline)
                order = list(ranked["order"])
                images, seeds, scores = images[order], [seeds[i] for i in order], [float(s) for s in ranked["scores"]]
            else:
                images, seeds = images[:plan.keep], seeds[:plan.keep]
        except asyncio.TimeoutError:
            return error(504, f"generation did not finish within {self.timeout:g} s (serve.request_timeout_s)")
        except (BackPressureError, QueueFull):
            return error(503, "the server is busy: the model's queue is full (serve.max_queued_requests); retry shortly",
                         headers={"Retry-After": "1"})
        except DeploymentUnavailableError as err:
            return error(503, f"the model is unavailable: {short(err)}", headers={"Retry-After": "5"})
        except Exception as err:  # noqa: BLE001 - a failed replica call is a 500 with a message, not a traceback
            logger.exception("generate failed for %r", plan)
            return error(500, f"internal error: {short(err)}")

        run_id = self.models[plan.model].card["run_id"]
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
        # a few tiny PNGs encode faster here than a thread hand-off costs
        encoded = [png_base64(im) for im in images] if images[0].size * len(images) <= 65536 else \
            await asyncio.to_thread(lambda: [png_base64(im) for im in images])
        return JSONResponse({"model": plan.model, "run_id": run_id,
                             "images": [{"png_base64": b, "seed": s, "score": sc}
                                        for b, s, sc in zip(encoded, seeds, scores)],
                             "seed": plan.job.seed, "elapsed_ms": round((time.perf_counter() - start) * 1e3, 2)})

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


def make_api(front: Frontend) -> FastAPI:
    """The FastAPI app of one ingress replica."""
    api = FastAPI(title=TITLE, version="0.2.0", description=DESCRIPTION)

    @api.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = (exc.errors() or [{"loc": ("body",), "msg": "invalid request"}])[0]
        loc = [str(p) for p in first["loc"][1:]] or ["body"]
        return error(422, f"{loc[0]}: {first['msg']}", loc[0])

    @api.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error(exc.status_code, str(exc.detail), None, getattr(exc, "headers", None))

    @api.exception_handler(Exception)
    async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error on %s %s", request.method, request.url.path)
        return error(500, f"internal error: {short(exc)}")

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
              responses={**_ERRORS, 200: {"content": {"image/png": {}},
                                          "description": "JSON, or one PNG when format is png"}})
    async def generate(request: Request):
        raw = await request.body()
        try:
            body = json.loads(raw)
        except ValueError as err:  # JSONDecodeError and UnicodeDecodeError
            return error(422, f"malformed JSON body: {err}", "body")
        return await front.generate(body)

    def openapi() -> dict:
        if api.openapi_schema is None:
            schema = get_openapi(title=api.title, version=api.version, description=api.description,
                                 routes=api.routes)
            body, components = front.openapi_request()
            schema.setdefault("components", {}).setdefault("schemas", {}).update(components)
            schema["paths"]["/v1/generate"]["post"]["requestBody"] = {
                "required": True, "content": {"application/json": {"schema": body}}}
            api.openapi_schema = schema
        return api.openapi_schema

    api.openapi = openapi
    return api


@serve.deployment
@serve.ingress()
class Ingress:
    """The ingress deployment; its FastAPI app is built after the constructor (`__serve_build_asgi_app__`)."""

    def __init__(self, generators: dict[str, Any], scorer: Optional[Any], *, cards: list[dict], imports: list[str],
                 default_model: str, max_n: int, request_timeout_s: float, reranking: str):
        from raygen.serving.loading import import_modules

        import_modules(imports)  # the families of the served models: their params classes check requests here
        self.front = Frontend(generators, scorer, cards=cards, default_model=default_model, max_n=max_n,
                              request_timeout_s=request_timeout_s, reranking=reranking)

    def __serve_build_asgi_app__(self) -> FastAPI:
        return make_api(self.front)
