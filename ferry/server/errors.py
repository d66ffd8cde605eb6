"""OpenAI's error body (``{"error": {"message", "type", "param", "code"}}``) for every failure.

Every handler here turns an exception into a 4xx/5xx JSON response, so a bad request never
reaches the engine and never takes the server down.
"""
from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

logger = logging.getLogger(__name__)

_TYPE_BY_STATUS = {400: "invalid_request_error", 401: "invalid_request_error",
                   404: "invalid_request_error", 405: "invalid_request_error",
                   413: "invalid_request_error", 429: "rate_limit_error",
                   503: "service_unavailable_error"}


class APIError(Exception):
    """An error the API answers with OpenAI's body and ``status``."""

    def __init__(self, status: int, message: str, *, param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}


def error_body(status: int, message: str, param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    error_type = _TYPE_BY_STATUS.get(status, "server_error" if status >= 500 else
                                     "invalid_request_error")
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


def error_response(error: APIError) -> JSONResponse:
    return JSONResponse(error_body(error.status, error.message, error.param, error.code),
                        status_code=error.status, headers=error.headers)


def sse_error_event(error: APIError) -> str:
    """An error inside a stream that already sent its 200 header."""
    body = error_body(error.status, error.message, error.param, error.code)
    return f"data: {json.dumps(body)}\n\n"


def validation_error(exc: ValidationError | RequestValidationError) -> APIError:
    """Pydantic's list of problems -> one readable 400 naming the first bad field."""
    errors = exc.errors()
    if not errors:
        return APIError(400, "invalid request body")
    first = errors[0]
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = loc[0] if loc else None
    if first.get("type") == "json_invalid":
        return APIError(400, f"the request body is not valid JSON: {first.get('msg')}",
                        code="invalid_json")
    if not loc:
        why = _clean(first.get("msg", ""))
        return APIError(400, f"the request body must be a JSON object ({why})",
                        code="invalid_value")
    if first.get("type") == "extra_forbidden":
        return APIError(400, f"unrecognized request argument supplied: {'.'.join(loc)}",
                        param=param, code="unknown_parameter")
    same_field = [e for e in errors if [str(p) for p in e.get("loc", ()) if p != "body"][:1]
                  == loc[:1]]
    message = f"invalid value for '{param}': {_clean(first.get('msg', 'invalid value'))}"
    if len(same_field) > 1:  # a union: every alternative failed
        message = f"invalid value for '{param}': it does not match any accepted type"
    if "input" in first and len(same_field) == 1:
        message += f" (got {_short(first['input'])})"
    return APIError(400, message, param=param, code="invalid_value")


def _clean(msg: str) -> str:
    return msg.removeprefix("Value error, ")


def _short(value: Any) -> str:
    text = json.dumps(value) if _is_jsonable(value) else repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _is_jsonable(value: Any) -> bool:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True


ErrorHook = Callable[[Request, APIError], None]


def install_error_handlers(app: FastAPI, on_error: ErrorHook | None = None) -> None:
    """Route every error the framework or the handlers raise to OpenAI's body.

    ``on_error`` sees each error answered (the server counts them in its metrics).
    """

    def respond(request: Request, error: APIError) -> JSONResponse:
        if on_error is not None:
            on_error(request, error)
        return error_response(error)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return respond(request, exc)

    @app.exception_handler(RequestValidationError)
    async def _request_validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return respond(request, validation_error(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else "request failed"
        if exc.status_code == 404:
            message = (f"no route {request.method} {request.url.path}; see /v1/models, "
                       "/v1/completions, /v1/chat/completions")
        return respond(request, APIError(exc.status_code, message, headers=exc.headers))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("internal error while serving a request")
        return respond(request, APIError(500, f"internal server error: {type(exc).__name__}"))
