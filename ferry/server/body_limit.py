"""A request-body size limit, enforced before anything parses the body.

A pure ASGI middleware: a ``Content-Length`` over the limit is answered 413 at once, without
reading a byte of the body; a body without one (chunked) is counted as it streams in, and
the read that crosses the limit raises a 413 ``APIError`` in the handler reading it, so at
most the limit is ever held in memory. Either way the connection is closed after the
answer, so the rest of the body is never read.
"""
from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from starlette.requests import Request

from ferry.server.errors import APIError, ErrorHook, error_response

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


def body_too_large(max_bytes: int) -> APIError:
    # "Connection: close": the server then closes the connection after the answer instead
    # of reading (and discarding) the rest of the body to keep it alive.
    return APIError(413, f"the request body is larger than the server's limit of {max_bytes} "
                         "bytes (max_request_body_bytes)", code="request_too_large",
                    headers={"Connection": "close"})


class BodySizeLimit:
    """Answers 413 (OpenAI's error body) to HTTP requests whose body exceeds ``max_bytes``.

    ``on_error`` sees each refusal made here (the server counts it in its metrics).
    """

    def __init__(self, app: ASGIApp, max_bytes: int | Callable[[], int],
                 on_error: ErrorHook | None = None) -> None:
        """``max_bytes``: the limit, or a function giving it per request (a config hot
        reload changes it)."""
        self.app = app
        self._max_bytes = max_bytes
        self.on_error = on_error

    @property
    def max_bytes(self) -> int:
        return self._max_bytes() if callable(self._max_bytes) else self._max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.max_bytes:
            # Refused before reading a byte of the body.
            await self._refuse(scope, receive, send)
            return
        await self.app(scope, self._counting(receive), send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        error = body_too_large(self.max_bytes)
        if self.on_error is not None:
            self.on_error(Request(scope), error)
        await error_response(error)(scope, receive, send)

    def _counting(self, receive: Receive) -> Receive:
        """``receive`` that raises 413 once the body read so far passes the limit (a
        chunked body, or one longer than its ``Content-Length`` claimed)."""
        received = 0

        async def counted() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise body_too_large(self.max_bytes)
            return message

        return counted


def _content_length(scope: Scope) -> int | None:
    """The declared body length; None when absent or unreadable (the count then decides)."""
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None
