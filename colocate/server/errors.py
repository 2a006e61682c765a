"""Every error the server answers: JSON with a stable `code`, a status from the error's type, never a traceback."""

from __future__ import annotations

import http
import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from colocate.engine.core import EnginePausedError, PauseTimeoutError
from colocate.engine.memory_manager import ResumeOutOfMemoryError
from colocate.process import EngineInternalError, EngineProcessError
from colocate.weight_sync import UnknownLayoutError

log = logging.getLogger("colocate.server")
RETRY_AFTER_S = "1"


class ModelNotFoundError(LookupError):
    """A request names a model this server does not serve (OpenAI's model_not_found)."""


# Exception type -> (status, code); the most specific class in an error's MRO wins. The codes are part of
# the API: clients branch on them, so they never change meaning.
ERRORS: dict[type[Exception], tuple[int, str]] = {
    ValueError: (400, "invalid_request"),  # bad input (also UnicodeError): the message says which field and why
    UnknownLayoutError: (400, "unknown_layout"),  # a bucket names a layout this server does not hold: resend it
    PermissionError: (403, "forbidden"),  # a path outside the roots the operator allowed
    LookupError: (404, "not_found"),  # something the request names does not exist here
    ModelNotFoundError: (404, "model_not_found"),  # OpenAI routes: a model name this server does not serve
    RuntimeError: (409, "engine_state"),  # the engine's state refuses the call: paused, an update open, ...
    PauseTimeoutError: (409, "pause_timeout"),  # in-flight requests did not drain in time; the engine stays awake
    EnginePausedError: (503, "engine_paused"),  # retryable: paused longer than paused_wait_s
    ResumeOutOfMemoryError: (507, "out_of_memory"),  # the tags stay paused; retry once memory is free
    EngineProcessError: (502, "engine_process_exited"),  # the engine's child process is gone
    EngineInternalError: (500, "internal_error"),  # a bug in the engine process: its log has the traceback
}
# Statuses Starlette raises itself (routing, methods, bodies) -> their codes.
HTTP_CODES = {400: "invalid_request", 401: "unauthorized", 404: "not_found", 405: "method_not_allowed",
              413: "body_too_large", 415: "unsupported_media_type", 422: "validation_error"}


def error_response(status: int, code: str, message: str, kind: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    # Messages may quote request strings; a lone surrogate in one must not break the response.
    message = message.encode("utf-8", "backslashreplace").decode("utf-8")
    body = {"error": {"code": code, "type": kind or phrase(status), "message": message}}
    return JSONResponse(body, status_code=status, headers=headers)


def phrase(status: int) -> str:
    return http.HTTPStatus(status).phrase.replace(" ", "")


def classify(e: Exception) -> tuple[int, str]:
    """(status, code) of an error: its most specific class in ERRORS, else 500 internal_error."""
    return next((ERRORS[cls] for cls in type(e).__mro__ if cls in ERRORS), (500, "internal_error"))


def error_body(e: Exception) -> dict:
    """The JSON error of `e`, for where no status can be sent any more (a stream that already started)."""
    status, code = classify(e)
    if status == 500 and not isinstance(e, EngineInternalError):  # our bug: no internals to the client
        log.error("internal error in a streamed response", exc_info=e)
        message = f"internal error ({type(e).__name__}); see the server log"
    else:
        message = str(e) or type(e).__name__
    return {"error": {"code": code, "type": type(e).__name__, "message": message}}


def install(app: FastAPI, *, bad_request_paths: frozenset[str] = frozenset()) -> None:
    """Map engine errors, validation errors, HTTP errors and anything unexpected to JSON answers.

    A body that fails validation is 422 validation_error, except on `bad_request_paths` (the OpenAI
    routes), which answer 400 invalid_request as OpenAI does.
    """

    async def engine_error(request: Request, e: Exception) -> JSONResponse:
        status, code = classify(e)
        headers = {"Retry-After": RETRY_AFTER_S} if isinstance(e, EnginePausedError) else None
        return error_response(status, code, str(e) or type(e).__name__, type(e).__name__, headers)

    for cls in ERRORS:
        app.add_exception_handler(cls, engine_error)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError) -> JSONResponse:
        parts = [f"{'.'.join(str(p) for p in err.get('loc', ()))}: {err.get('msg', '')}" for err in e.errors()]
        status, code = (400, "invalid_request") if request.url.path in bad_request_paths else \
            (422, "validation_error")
        return error_response(status, code, "; ".join(parts) or "invalid request", "RequestValidationError")

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException) -> JSONResponse:
        return error_response(e.status_code, HTTP_CODES.get(e.status_code, "http_error"), str(e.detail),
                              headers=dict(e.headers or {}))

    @app.exception_handler(Exception)
    async def bug(request: Request, e: Exception) -> JSONResponse:
        # Our own bug: the log gets the traceback, the client a stable code and no internals.
        log.exception("internal error answering %s %s", request.method, request.url.path)
        return error_response(500, "internal_error", f"internal error ({type(e).__name__}); see the server log",
                              "InternalError")
