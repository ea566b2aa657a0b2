"""What every request passes before a route runs: the bearer token and the body-size limit.

A plain ASGI middleware (no Ray, no FastAPI), so the checks happen before the
body is read: a request with a `Content-Length` over the limit is refused with
413 without reading a byte of it, and a chunked body is counted as it arrives
and refused once it passes the limit. The token is opt-in: the app is given
the SHA-256 digest of the token, never the token itself (it travels to every
replica as a constructor argument), and a request's token is hashed and
compared with `hmac.compare_digest`, in constant time.

Errors use the shape of the route asked for: OpenAI's
`{"error": {"message", "type", "param", "code"}}` under `/v1/images/`,
raygen's `{"error", "field"}` elsewhere (`error_body`).
"""
from __future__ import annotations

import hashlib
import hmac
import json
from typing import Optional

#: routes that answer without a token: the playground page (it asks for the token itself), liveness
#: probes, and generated files (their 128-bit random names are the capability, as with a signed URL)
OPEN_PATHS = ("/", "/healthz")
OPEN_PREFIXES = ("/v1/files/",)
OPENAI_PREFIX = "/v1/images/"
DEFAULT_MAX_BODY_BYTES = 4 * 1024 * 1024


def token_digest(token: str) -> str:
    """The hex SHA-256 of a token: what the server keeps and compares against."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def read_token(path: str) -> str:
    """The token in a file (its first line, stripped); refuses an empty file."""
    from pathlib import Path

    text = Path(path).expanduser().read_text(encoding="utf-8").strip().splitlines()
    token = text[0].strip() if text else ""
    if len(token) < 8:
        raise ValueError(f"--token-file {path}: the token must be at least 8 characters on the first line")
    return token


def openai_error_type(status: int) -> str:
    if status == 401:
        return "authentication_error"
    if status == 429:
        return "rate_limit_error"
    if status >= 500:
        return "server_error"
    return "invalid_request_error"


def error_body(path: str, status: int, message: str, field: Optional[str] = None,
               code: Optional[str] = None) -> dict:
    if path.startswith(OPENAI_PREFIX):
        return {"error": {"message": message, "type": openai_error_type(status), "param": field, "code": code}}
    return {"error": message, "field": field}


class BodyTooLarge(Exception):
    pass


class Guard:
    """ASGI middleware: bearer token (when `token_sha256` is set) and `max_body_bytes`."""

    def __init__(self, app, *, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, token_sha256: Optional[str] = None):
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.digest = bytes.fromhex(token_sha256) if token_sha256 else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        headers = {k.lower(): v for k, v in scope.get("headers") or []}
        if self.digest is not None and path not in OPEN_PATHS and not path.startswith(OPEN_PREFIXES):
            if not self._authorized(headers.get(b"authorization", b"")):
                return await self._refuse(send, path, 401, "a valid bearer token is needed: send the header "
                                          "'Authorization: Bearer TOKEN' (the server's --token-file)",
                                          code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        length = headers.get(b"content-length")
        if length is not None:
            try:
                size = int(length)
            except ValueError:
                return await self._refuse(send, path, 400, "Content-Length is not a number", "body")
            if size > self.max_body_bytes:
                return await self._too_large(send, path)
            return await self.app(scope, receive, send)
        if scope.get("method") in ("GET", "HEAD", "OPTIONS", "DELETE"):
            return await self.app(scope, receive, send)

        # no length given (chunked): count the body as the route reads it
        seen = 0
        started = False

        async def counted_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_body_bytes:
                    raise BodyTooLarge()
            return message

        async def watched_send(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counted_receive, watched_send)
        except BodyTooLarge:
            if not started:
                await self._too_large(send, path)

    def _authorized(self, header: bytes) -> bool:
        scheme, _, token = header.decode("latin-1").partition(" ")
        given = hashlib.sha256(token.strip().encode("utf-8")).digest()
        # compare digests of equal length in constant time, whatever was sent
        ok = hmac.compare_digest(given, self.digest)
        return ok and scheme.lower() == "bearer"

    async def _too_large(self, send, path: str):
        limit = self.max_body_bytes
        shown = f"{limit / 2**20:g} MiB" if limit >= 2**20 else f"{limit} bytes"
        await self._refuse(send, path, 413, f"the request body is larger than the server's limit of {shown} "
                           "(max_body_bytes)", "body", code="request_too_large", headers={"Connection": "close"})

    async def _refuse(self, send, path: str, status: int, message: str, field: Optional[str] = None,
                      code: Optional[str] = None, headers: Optional[dict] = None):
        body = json.dumps(error_body(path, status, message, field, code)).encode()
        raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
        await send({"type": "http.response.start", "status": status, "headers": raw})
        await send({"type": "http.response.body", "body": body})
