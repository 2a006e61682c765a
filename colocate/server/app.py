"""The FastAPI app: generate, pause, resume and update weights over HTTP; health, memory and metrics."""

from __future__ import annotations

import hmac
import http
import time
from collections.abc import Callable
from typing import Any, TypeVar

import anyio
import anyio.to_thread
from fastapi import Body, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from colocate.engine import Engine
from colocate.engine.core import EnginePausedError, PauseTimeoutError
from colocate.engine.memory_manager import ResumeOutOfMemoryError
from colocate.model import Tokenizer, resolve_config
from colocate.server.metrics import CONTENT_TYPE, ServerMetrics
from colocate.process import EngineProcess, EngineProcessError
from colocate.process.service import EngineService
from colocate.server.schemas import (CompletionRequest, GenerateOutput, GenerateRequest, IpcBucketUpdate, IpcUpdate,
                                     PauseRequest,
                                     ResumeRequest, SafetensorsUpdate, UpdateWeightsRequest, completion_response)
from colocate.weight_sync import device_uuid

__all__ = ["create_app"]
T = TypeVar("T")
RETRY_AFTER_S = "1"
# Calls that may wait long (generate, while paused) and control calls get separate thread
# pools: a /resume must never wait for a thread behind requests that are waiting for it.
MAX_CONCURRENT_GENERATE = 256
MAX_CONCURRENT_CONTROL = 4
MAX_CONCURRENT_STATUS = 8
_ROUTES = ("/generate", "/v1/completions", "/v1/models", "/pause", "/resume", "/update_weights",
           "/update_weights/abort", "/health", "/memory", "/metrics")
_PROTECTED = ("/generate", "/pause", "/resume", "/update_weights", "/update_weights/abort")
# Exception type -> status code; the most specific class in an error's MRO wins.
_STATUS: dict[type[Exception], int] = {
    ValueError: 400,  # bad input (also UnicodeError): the message says which field and why
    RuntimeError: 409,  # the engine's state refuses the call: weights paused, an update open, weights unwritten
    PauseTimeoutError: 409,  # in-flight requests did not drain in time; the engine stays awake
    EnginePausedError: 503,  # retryable: paused longer than paused_wait_s
    ResumeOutOfMemoryError: 507,  # the tags stay paused; retry once memory is free
    EngineProcessError: 502,  # the engine's child process is gone
}


def create_app(engine: Engine | EngineProcess, *, api_key: str | None = None, max_body_bytes: int = 64 << 20,
               model_name: str | None = None) -> FastAPI:
    """An HTTP front for `engine` (in this process or its child, from `launch_engine`).

    >>> app = create_app(Engine(EngineConfig(model="tiny")), api_key="secret")
    >>> uvicorn.run(app, host="127.0.0.1", port=30000)      # or `colocate serve`
    With `api_key`, /generate, /v1/*, /pause, /resume and /update_weights need the header
    `Authorization: Bearer <api_key>` (401 otherwise). /health, /memory, /metrics and the
    OpenAPI docs stay open: they report state and change nothing. Bodies over
    `max_body_bytes` get 413. Every error is JSON: {"error": {"type": ..., "message": ...}}.
    """
    metrics = ServerMetrics(engine.memory_status)
    tokenizer: Tokenizer | None = (engine.tokenizer if hasattr(engine, "tokenizer")
                                   else resolve_config(engine.config.model)[1])
    service = None if isinstance(engine, EngineProcess) else EngineService(engine)
    model_name = model_name or engine.config.model
    started = int(time.time())
    limiters: dict[str, anyio.CapacityLimiter] = {}

    async def run(pool: str, fn: Callable[[], T]) -> T:
        # Created on first use, inside the event loop: anyio 3 limiters cannot be made outside one.
        if pool not in limiters:
            limiters[pool] = anyio.CapacityLimiter({"generate": MAX_CONCURRENT_GENERATE,
                                                    "control": MAX_CONCURRENT_CONTROL,
                                                    "status": MAX_CONCURRENT_STATUS}[pool])
        return await anyio.to_thread.run_sync(fn, limiter=limiters[pool])

    app = FastAPI(title="colocate", version="0.1.0", description=create_app.__doc__)
    app.add_middleware(_Guard, api_key=api_key, max_body_bytes=max_body_bytes, metrics=metrics)
    _add_error_handlers(app)

    @app.post("/generate", response_model=GenerateOutput | list[GenerateOutput])
    async def generate(body: GenerateRequest) -> Any:
        """Generate for one prompt (answers an object) or a list (answers a list). Concurrent requests
        join one batch. While the engine is paused this waits for /resume, up to paused_wait_s, then 503."""
        def call() -> Any:
            prompts, is_batched = body.prompts()
            outs = engine.generate(prompts, body.sampling_params.to_params())
            metrics.observe_outputs(outs)
            results = [GenerateOutput.from_output(out) for out in outs]
            return results if is_batched else results[0]
        return await run("generate", call)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest) -> dict[str, Any]:
        """The OpenAI completions subset: prompt, max_tokens, temperature, top_p, n, stop, logprobs, seed."""
        def call() -> dict[str, Any]:
            prompts, params = body.to_engine()
            outs = engine.generate(prompts, params)
            metrics.observe_outputs(outs)
            return completion_response(body, outs, model=model_name, tokenizer=tokenizer)
        return await run("generate", call)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list",
                "data": [{"id": model_name, "object": "model", "created": started, "owned_by": "colocate"}]}

    @app.post("/pause")
    async def pause(body: PauseRequest | None = None) -> dict[str, Any]:
        """engine.release_memory: free the device memory of `tags` (default all); returns its report."""
        body = body or PauseRequest()
        return await run("control", lambda: _timed(
            lambda: engine.release_memory(body.tags, weights_to=body.weights_to, mode=body.mode,
                                          timeout_s=body.timeout_s).to_dict(),
            lambda outcome: metrics.pauses.labels(outcome=outcome).inc(), metrics.pause_seconds))

    @app.post("/resume")
    async def resume(body: ResumeRequest | None = None) -> dict[str, Any]:
        """engine.resume_memory: take device memory back for `tags` (default all); returns its report."""
        body = body or ResumeRequest()
        return await run("control", lambda: _timed(lambda: engine.resume_memory(body.tags).to_dict(),
                                                   lambda outcome: metrics.resumes.labels(outcome=outcome).inc(),
                                                   metrics.resume_seconds))

    @app.post("/update_weights")
    async def update_weights(body: UpdateWeightsRequest = Body(...)) -> dict[str, Any]:
        """Copy new weights in place: {"format": "ipc", "manifest": {...}} (every bucket exported by a process
        on this host, in one request), {"format": "ipc_bucket", "message": {...}} (one bucket of a
        double-buffered update, as `colocate.weight_sync.BucketSender` sends them), or
        {"format": "safetensors", "path": ...}. Everything is validated before the first copy: a
        refused update changes nothing."""
        json_side = engine if service is None else service  # the engine's JSON calls, in its process or here
        if isinstance(body, IpcUpdate):
            def call() -> dict[str, Any]:
                return json_side.update_weights_from_manifest(_with_version(body.manifest, body.version))
        elif isinstance(body, IpcBucketUpdate):
            def call() -> dict[str, Any]:
                return json_side.import_bucket(body.message)
        else:
            assert isinstance(body, SafetensorsUpdate), f"{type(body)=}"

            def call() -> dict[str, Any]:
                try:
                    return engine.update_weights_from_disk(body.path, version=body.version)
                except (OSError, KeyError) as e:  # unreadable files, a malformed index
                    raise ValueError(f"cannot read the checkpoint at {body.path!r}: {e!r}") from e

        def count(outcome: str) -> None:
            metrics.weight_updates.labels(format=body.format, outcome=outcome).inc()

        return await run("control", lambda: _timed(call, count,
                                                   metrics.weight_update_seconds.labels(format=body.format)))

    @app.post("/update_weights/abort")
    async def abort_update() -> dict[str, Any]:
        """Close a bucketed update that is open; the engine refuses to generate until a complete one arrives."""
        json_side = engine if service is None else service
        await run("control", json_side.abort_weight_update)
        return {"aborted": True}

    uuid = device_uuid(engine.config.torch_device)  # where a producer must put its IPC buckets

    @app.get("/health")
    async def health() -> dict[str, Any]:
        """State per tag, whether every tag is awake, and the weights' version."""
        status = await run("status", engine.memory_status)
        return {"status": "ok", "model": model_name, "state": status["state"], "is_awake": status["is_awake"],
                "weights_version": status["weights_version"], "dtype": engine.config.dtype,
                "device_uuid": uuid}

    @app.get("/memory")
    async def memory() -> dict[str, Any]:
        """engine.memory_status(): bytes per tag on device and host, states, the device's free and total."""
        return await run("status", engine.memory_status)

    @app.get("/metrics")
    async def prometheus() -> Response:
        """Prometheus text; the engine's gauges are read at each scrape."""
        return Response(await run("status", metrics.render), media_type=CONTENT_TYPE)

    return app


def _timed(fn: Callable[[], T], count: Callable[[str], None], histogram: Any) -> T:
    """Run fn, counting it by outcome ("ok" or the error's type) and timing it when it succeeds."""
    start = time.perf_counter()
    try:
        result = fn()
    except Exception as e:
        count(type(e).__name__)
        raise
    count("ok")
    histogram.observe(time.perf_counter() - start)
    return result


def _with_version(manifest: dict[str, Any], version: int | None) -> dict[str, Any]:
    """The manifest with the body's version where it names none; two different versions are refused."""
    if version is None:
        return manifest
    if manifest.get("version") is None:
        return {**manifest, "version": version}
    if manifest["version"] != version:
        raise ValueError(f"the body says version={version} but the manifest says {manifest['version']!r}; "
                         "send one, or the same in both")
    return manifest


# -- errors -------------------------------------------------------------------------------
def _error(status: int, kind: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    # Messages may quote request strings; a lone surrogate in one must not break the response.
    message = message.encode("utf-8", "backslashreplace").decode("utf-8")
    return JSONResponse({"error": {"type": kind, "message": message}}, status_code=status, headers=headers)


def _phrase(status: int) -> str:
    return http.HTTPStatus(status).phrase.replace(" ", "")


def _add_error_handlers(app: FastAPI) -> None:
    async def engine_error(request: Request, e: Exception) -> JSONResponse:
        status = next(_STATUS[cls] for cls in type(e).__mro__ if cls in _STATUS)
        headers = {"Retry-After": RETRY_AFTER_S} if isinstance(e, EnginePausedError) else None
        return _error(status, type(e).__name__, str(e) or type(e).__name__, headers)

    for cls in _STATUS:
        app.add_exception_handler(cls, engine_error)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError) -> JSONResponse:
        parts = [f"{'.'.join(str(p) for p in err.get('loc', ()))}: {err.get('msg', '')}" for err in e.errors()]
        return _error(422, "RequestValidationError", "; ".join(parts) or "invalid request")

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException) -> JSONResponse:
        return _error(e.status_code, _phrase(e.status_code), str(e.detail),
                      dict(e.headers or {}))


class _BodyTooLarge(HTTPException):
    def __init__(self, max_body_bytes: int) -> None:
        super().__init__(413, f"the request body is over max_body_bytes={max_body_bytes}")


class _Guard:
    """ASGI middleware: the API key, the body size limit, and the request counters, before any parsing."""

    def __init__(self, app: ASGIApp, *, api_key: str | None, max_body_bytes: int, metrics: ServerMetrics) -> None:
        self.app = app
        self.api_key = api_key
        self.max_body_bytes = max_body_bytes
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        route = scope["path"] if scope["path"] in _ROUTES else "other"
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
                    raise _BodyTooLarge(self.max_body_bytes)
            return message

        try:
            refusal = self._refusal(scope)
            if refusal is not None:
                await refusal(scope, receive, counted_send)
                return
            try:
                await self.app(scope, limited_receive, counted_send)
            except _BodyTooLarge as e:
                if is_started:
                    raise
                await _error(413, _phrase(413), e.detail)(scope, receive, counted_send)
        finally:
            self.metrics.requests.labels(route=route, method=scope["method"], status=str(status)).inc()
            self.metrics.request_seconds.labels(route=route).observe(time.perf_counter() - start)

    def _refusal(self, scope: Scope) -> JSONResponse | None:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        path = scope["path"]
        if self.api_key is not None and (path in _PROTECTED or path.startswith("/v1/")):
            scheme, _, token = headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode("utf-8", "replace"),
                                                                     self.api_key.encode("utf-8")):
                return _error(401, _phrase(401), "missing or wrong API key; send 'Authorization: Bearer <key>'",
                              {"WWW-Authenticate": "Bearer"})
        length = headers.get("content-length")
        if length is not None:
            if not length.isdigit():
                return _error(400, _phrase(400), f"Content-Length {length!r} is not a number of bytes")
            if int(length) > self.max_body_bytes:
                return _error(413, _phrase(413), f"the request body has {length} bytes, over "
                                                      f"max_body_bytes={self.max_body_bytes}")
        return None
