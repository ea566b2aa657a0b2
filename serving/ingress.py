"""The HTTP front door: FastAPI routes, error bodies, and fan-out to the model deployments.

Every error leaves as JSON `{"error": "...", "field": "..."}`: validation
problems as 4xx naming the field, a full queue as 503, a slow generation as
504, and anything unexpected as a 500 with a one-line message (the traceback
goes to the replica log, not to the client).
"""
# No `from __future__ import annotations`: FastAPI must see the real body type of the routes
# Serve wraps, or it takes `req` for a query parameter.
import asyncio
import logging
import time
from pathlib import Path
from typing import Any, Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from ray import serve
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from starlette.exceptions import HTTPException as StarletteHTTPException

from raygen.serving.images import grid, png_base64, png_bytes
from raygen.serving.requests import RequestError, resolve
from raygen.serving.schema import (
    ErrorBody,
    GenerateRequest,
    GenerateResponse,
    HealthResponse,
    ModelsResponse,
)

logger = logging.getLogger("ray.serve")

PAGE = (Path(__file__).parent / "static" / "index.html").read_text(encoding="utf-8")

api = FastAPI(
    title="raygen",
    version="0.1.0",
    description="Generate images with models trained by raygen. `POST /v1/generate` with JSON; "
                "`GET /v1/models` lists the models, their classes and sampling options.",
)

# Serve freezes (pickles) the FastAPI app when the ingress class is decorated: every
# helper a route or handler uses must be defined above the class.
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


@api.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    first = errors[0] if errors else {"loc": ("body",), "msg": "invalid request", "type": "value_error"}
    loc = list(first["loc"][1:]) if first["loc"] and first["loc"][0] in ("body", "query", "path", "header") \
        else list(first["loc"])
    if first["type"] == "json_invalid":
        detail = (first.get("ctx") or {}).get("error", "")
        return error(422, f"malformed JSON body{': ' + str(detail) if detail else ''}", "body")
    if not loc or not isinstance(loc[0], str):
        return error(422, f"the body must be a JSON object of request fields: {first['msg']}", "body")
    field = loc[0]
    branches = [e for e in errors if e["loc"][:2] == first["loc"][:2]]
    if len(branches) > 1:  # a union such as label: int | str failed on every branch
        kinds = " or ".join(str(e["loc"][2]) for e in branches if len(e["loc"]) > 2)
        message = f"{field} must be {kinds}"
    else:
        message = f"{field}: {first['msg']}"
    if "input" in first and not isinstance(first["input"], (dict, list)) and first["type"] != "missing":
        message += f" (got {first['input']!r})"
    return error(422, message, field)


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    return error(exc.status_code, str(exc.detail), None, getattr(exc, "headers", None))


@api.exception_handler(Exception)
async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
    logger.exception("unhandled error on %s %s", request.method, request.url.path)
    return error(500, f"internal error: {short(exc)}")


@serve.deployment
@serve.ingress(api)
class Ingress:
    def __init__(self, generators: dict[str, Any], scorer: Optional[Any], *, default_model: str, max_n: int,
                 request_timeout_s: float, reranking: str):
        self.generators = generators
        self.scorer = scorer
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

    @api.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def playground(self) -> HTMLResponse:
        return HTMLResponse(PAGE)

    @api.get("/healthz", response_model=HealthResponse, responses={503: {"model": ErrorBody}})
    async def healthz(self):
        try:
            infos = await asyncio.wait_for(self.infos(), timeout=10.0)
        except Exception as err:  # noqa: BLE001 - any failure here means "not ready"
            return error(503, f"models are not ready: {short(err)}")
        return {"status": "ok", "models": list(infos), "reranking": self.reranking}

    @api.get("/v1/models", response_model=ModelsResponse)
    async def models(self):
        infos = await self.infos()
        return {"models": list(infos.values()), "default_model": self.default_model, "max_n": self.max_n,
                "reranking": self.reranking}

    @api.post("/v1/generate", response_model=GenerateResponse,
              responses={**_ERRORS, 200: {"content": {"image/png": {}},
                                          "description": "JSON, or one PNG when format is png"}})
    async def generate(self, req: GenerateRequest):
        start = time.perf_counter()
        deadline = start + self.timeout
        try:
            infos = await asyncio.wait_for(self.infos(), timeout=self.timeout)
        except Exception as err:  # noqa: BLE001 - generators that cannot describe themselves are not ready
            return error(503, f"models are not ready: {short(err)}", headers={"Retry-After": "5"})
        try:
            plan = resolve(req, infos, default_model=self.default_model, max_n=self.max_n, reranking=self.reranking)
        except RequestError as err:
            return error(err.status, err.message, err.field)

        try:
            result = await self._call(self.generators[plan.model].generate.remote(plan.job), deadline)
            if "error" in result:
                return error(result["status"], result["error"])
            images = result["images"]
            scores: list = [None] * plan.keep
            if plan.rerank_text is not None:
                ranked = await self._call(self.scorer.rerank.remote(plan.rerank_text, images, plan.keep), deadline)
                images, scores = images[ranked["order"]], [float(s) for s in ranked["scores"]]
            else:
                images = images[:plan.keep]
        except asyncio.TimeoutError:
            return error(504, f"generation did not finish within {self.timeout:g} s (serve.request_timeout_s)")
        except BackPressureError:
            return error(503, "the server is busy: the model's queue is full (serve.max_queued_requests); retry shortly",
                         headers={"Retry-After": "1"})
        except DeploymentUnavailableError as err:
            return error(503, f"the model is unavailable: {short(err)}", headers={"Retry-After": "5"})
        except Exception as err:  # noqa: BLE001 - a failed replica call is a 500 with a message, not a traceback
            logger.exception("generate failed for %r", plan)
            return error(500, f"internal error: {short(err)}")

        info = infos[plan.model]
        if plan.format == "png":
            body = await asyncio.to_thread(lambda: png_bytes(images[0] if len(images) == 1 else grid(images)))
            headers = {"X-Raygen-Model": plan.model, "X-Raygen-Seed": str(plan.job.seed),
                       "X-Raygen-Elapsed-Ms": f"{(time.perf_counter() - start) * 1e3:.1f}"}
            if info["run_id"]:
                headers["X-Raygen-Run-Id"] = info["run_id"]
            if plan.rerank_text is not None:
                headers["X-Raygen-Scores"] = ",".join(f"{s:.6g}" for s in scores)
            return Response(body, media_type="image/png", headers=headers)
        encoded = await asyncio.to_thread(lambda: [png_base64(im) for im in images])
        return {"model": plan.model, "run_id": info["run_id"],
                "images": [{"png_base64": b, "score": s} for b, s in zip(encoded, scores)],
                "seed": plan.job.seed, "elapsed_ms": round((time.perf_counter() - start) * 1e3, 2)}

    @staticmethod
    async def _call(response, deadline: float):
        """Await a deployment call within what is left of the request's time; cancel it when time is up."""
        try:
            return await asyncio.wait_for(_await(response), max(deadline - time.perf_counter(), 0.001))
        except asyncio.TimeoutError:
            response.cancel()  # frees the replica's slot instead of finishing work nobody waits for
            raise
