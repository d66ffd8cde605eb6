"""Request bodies: validated JSON, and large ones kept off the event loop.

Validating a large JSON body takes seconds when it holds many values (150,000 chat
messages, millions of token ids), and pydantic holds the GIL for most of it, so a worker
thread of the server would still stall its event loop and engine thread. A body above
``PARSE_OFF_LOOP_BYTES`` is therefore first checked in a separate process
(:class:`LargeBodyCheck`): there it is validated and refused when it could not fit in the
context whatever its tokens (as :func:`context_length_error` decides for the tokenizer
pool). Only a body that passes, whose size the context then bounds, is validated in the
server, on a worker thread. The child imports the request schemas only (no torch).
"""
from __future__ import annotations

import asyncio
import multiprocessing
import os
import threading
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import TypeVar

from pydantic import BaseModel, ValidationError

from ferry.server.errors import APIError, validation_error
from ferry.server.protocol import (ChatCompletionRequest, CompletionRequest, TokenizeRequest,
                                   UnsupportedFieldError)

Model = TypeVar("Model", bound=BaseModel)

PARSE_OFF_LOOP_BYTES = 256 * 1024
CHECK_NICENESS = 10   # the checking process's CPU priority below the server's


def validate_body(body: bytes, model_cls: type[Model]) -> Model:
    """The body as ``model_cls``, checked for unsupported fields; ``APIError`` 400 if not."""
    try:
        parsed = model_cls.model_validate_json(body)
    except ValidationError as exc:
        raise validation_error(exc) from None
    check = getattr(parsed, "check_supported", None)
    if check is not None:
        try:
            check()
        except UnsupportedFieldError as exc:
            raise APIError(400, str(exc), param=exc.field, code="unsupported_parameter") from None
    return parsed


def context_length_error(max_model_len: int, max_prompt_chars: int, num_chars: int,
                         param: str) -> APIError | None:
    """The 400 for ``num_chars`` of text that cannot fit in the context, whatever its
    tokens (``max_prompt_chars`` 0: no check); None when it may fit."""
    if not max_prompt_chars or num_chars <= max_prompt_chars:
        return None
    return APIError(400, f"this model's maximum context length is {max_model_len} tokens, and "
                         f"no prompt of more than {max_prompt_chars} characters fits in it "
                         f"(this one has {num_chars}); shorten the prompt",
                    param=param, code="context_length_exceeded")


def _cannot_fit(parsed: BaseModel, max_model_len: int, max_prompt_chars: int) -> APIError | None:
    """Why a validated body could never fit in the context, or None."""
    if isinstance(parsed, CompletionRequest):
        for prompt in parsed.prompts():
            if isinstance(prompt, str):
                error = context_length_error(max_model_len, max_prompt_chars, len(prompt),
                                             "prompt")
                if error is not None:
                    return error
            elif len(prompt) > max_model_len:
                return APIError(400, f"this model's maximum context length is {max_model_len} "
                                     f"tokens; a prompt of {len(prompt)} token ids does not fit",
                                param="prompt", code="context_length_exceeded")
        return None
    if isinstance(parsed, (ChatCompletionRequest, TokenizeRequest)) and parsed.messages:
        chars = sum(len(m.to_template().get("content") or "") for m in parsed.messages)
        return context_length_error(max_model_len, max_prompt_chars, chars, "messages")
    if isinstance(parsed, TokenizeRequest) and parsed.prompt is not None:
        return context_length_error(max_model_len, max_prompt_chars, len(parsed.prompt),
                                    "prompt")
    return None


def _check_in_child(body: bytes, model_cls: type[BaseModel], max_model_len: int,
                    max_prompt_chars: int) -> tuple[int, str, str | None, str | None] | None:
    """Runs in the checking process: the refusal as plain data, or None to go on."""
    try:
        parsed = validate_body(body, model_cls)
    except APIError as exc:
        return exc.status, exc.message, exc.param, exc.code
    error = _cannot_fit(parsed, max_model_len, max_prompt_chars)
    return None if error is None else (error.status, error.message, error.param, error.code)


def _lower_priority() -> None:
    """The checking process yields the CPU to the server's threads (shared cores)."""
    try:
        os.nice(CHECK_NICENESS)
    except OSError:
        pass   # not allowed here: it still runs, at the server's priority


class LargeBodyCheck:
    """One checking process, started at the first large body (spawned: no fork of a
    process with threads), at a lower CPU priority (``CHECK_NICENESS``) so that on busy
    cores the server's other requests go first; ``shutdown()`` ends it."""

    def __init__(self, max_model_len: int, max_prompt_chars: int) -> None:
        self.max_model_len = max_model_len
        self.max_prompt_chars = max_prompt_chars
        self._pool: ProcessPoolExecutor | None = None
        self._lock = threading.Lock()

    async def check(self, body: bytes, model_cls: type[BaseModel]) -> None:
        """Raise the ``APIError`` the body gets, if validating it or its length refuses it."""
        loop = asyncio.get_running_loop()
        try:
            refusal = await loop.run_in_executor(self._executor(), _check_in_child, body,
                                                 model_cls, self.max_model_len,
                                                 self.max_prompt_chars)
        except BrokenProcessPool:
            # The child died (e.g. out of memory): start a new one next time; this body is
            # then validated in the server, as small ones are.
            with self._lock:
                self._pool = None
            return
        if refusal is not None:
            status, message, param, code = refusal
            raise APIError(status, message, param=param, code=code)

    def _executor(self) -> ProcessPoolExecutor:
        with self._lock:
            if self._pool is None:
                self._pool = ProcessPoolExecutor(
                    max_workers=1, mp_context=multiprocessing.get_context("spawn"),
                    initializer=_lower_priority)
            return self._pool

    def shutdown(self) -> None:
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)


async def parse_large_body(body: bytes, model_cls: type[Model],
                           check: LargeBodyCheck | None) -> Model:
    """A body above ``PARSE_OFF_LOOP_BYTES``: checked in the child (when ``check`` is
    given), then validated on a worker thread."""
    if check is not None:
        await check.check(body, model_cls)
    return await asyncio.to_thread(validate_body, body, model_cls)
