"""ASGI middleware in front of every route: the API key, the body size limit, and the request metrics."""

from __future__ import annotations

import hmac
import time

from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from colocate.server.errors import error_response, phrase
from colocate.server.metrics import ServerMetrics

# HTTP methods a metric label may carry; anything else (a client can send any token) counts as "other".
KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


class BodyTooLarge(HTTPException):
    def __init__(self, max_body_bytes: int) -> None:
        super().__init__(413, f"the request body is over max_body_bytes={max_body_bytes}")


class Guard:
    """Checks the API key and the body size before any parsing, and counts every request.

    `routes` are the paths metrics name (any other path counts as "other", so made-up paths and
    methods cannot grow the label set); `is_protected(path)` says which need the key.
    """

    def __init__(self, app: ASGIApp, *, api_key: str | None, max_body_bytes: int, metrics: ServerMetrics,
                 routes: frozenset[str], open_paths: frozenset[str]) -> None:
        self.app, self.api_key, self.max_body_bytes, self.metrics = app, api_key, max_body_bytes, metrics
        self.routes, self.open_paths = routes, open_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        route = scope["path"] if scope["path"] in self.routes else "other"
        method = scope["method"] if scope["method"] in KNOWN_METHODS else "other"
        status = 500  # if the app raises before answering, the outer error middleware answers 500
        is_started = False
        start = time.perf_counter()

        async def counted_send(message: Message) -> None:
            nonlocal status, is_started
            if message["type"] == "http.response.start":
                status, is_started = message["status"], True
            await send(message)

        num_received = 0

        async def limited_receive() -> Message:
            # Chunked bodies have no Content-Length: count what arrives.
            nonlocal num_received
            message = await receive()
            if message["type"] == "http.request":
                num_received += len(message.get("body", b""))
                if num_received > self.max_body_bytes:
                    raise BodyTooLarge(self.max_body_bytes)
            return message

        try:
            refusal = self._refusal(scope)
            if refusal is not None:
                await refusal(scope, receive, counted_send)
                return
            try:
                await self.app(scope, limited_receive, counted_send)
            except BodyTooLarge as e:
                if is_started:
                    raise
                await error_response(413, "body_too_large", e.detail)(scope, receive, counted_send)
        finally:
            self.metrics.requests.labels(route=route, method=method, status=str(status)).inc()
            self.metrics.request_seconds.labels(route=route).observe(time.perf_counter() - start)

    def _refusal(self, scope: Scope) -> JSONResponse | None:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        path = scope["path"]
        if self.api_key is not None and path not in self.open_paths:
            scheme, _, token = headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode("utf-8", "replace"),
                                                                     self.api_key.encode("utf-8")):
                return error_response(401, "unauthorized", "missing or wrong API key; send "
                                      "'Authorization: Bearer <key>'", phrase(401), {"WWW-Authenticate": "Bearer"})
        length = headers.get("content-length")
        if length is not None:
            if not length.isdigit():
                return error_response(400, "invalid_request", f"Content-Length {length!r} is not a number of bytes")
            if int(length) > self.max_body_bytes:
                return error_response(413, "body_too_large", f"the request body has {length} bytes, over "
                                                             f"max_body_bytes={self.max_body_bytes}")
        return None
