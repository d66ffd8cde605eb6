"""One streamed request to an OpenAI-compatible server, timed token by token.

Every failure (no connection, an HTTP error, a body that is not an OpenAI stream, a dropped
connection, a timeout) becomes a ``RequestResult`` with ``success=False``, a short
``error_kind`` and a readable ``error``: a benchmark reports failures, it never crashes on one.
"""
from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

from ferry.bench.tokens import count_tokens

_MAX_ERROR_BODY = 300


@dataclass
class RequestSpec:
    """What to send: the endpoint decides between a ``prompt`` and a chat ``messages`` body."""

    url: str
    model: str
    prompt: str
    max_tokens: int
    chat: bool = False
    temperature: float = 0.0
    ignore_eos: bool = True
    extra_body: dict[str, Any] = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)
    timeout: float = 300.0

    def body(self) -> dict[str, Any]:
        body: dict[str, Any] = {"model": self.model, "max_tokens": self.max_tokens,
                                "temperature": self.temperature, "stream": True,
                                "stream_options": {"include_usage": True}}
        if self.chat:
            body["messages"] = [{"role": "user", "content": self.prompt}]
        else:
            body["prompt"] = self.prompt
        if self.ignore_eos:
            body["ignore_eos"] = True
        for key, value in self.extra_body.items():   # a null removes a default key
            if value is None:
                body.pop(key, None)
            else:
                body[key] = value
        return body


@dataclass
class RequestResult:
    """Timings of one request; times are seconds (``start_time`` from the run's start)."""

    success: bool = False
    error: str | None = None
    error_kind: str | None = None
    start_time: float = 0.0
    ttft: float | None = None
    latency: float | None = None
    itl: list[float] = field(default_factory=list)
    output_tokens: int = 0
    output_tokens_source: str = "none"     # usage | tokenizer | chunks
    server_prompt_tokens: int | None = None
    finish_reason: str | None = None
    output_chars: int = 0
    energy_joules: float | None = None     # the usage extension, where the server reports it

    def fail(self, kind: str, message: str) -> "RequestResult":
        self.success, self.error_kind, self.error = False, kind, message
        return self


class _Stream:
    """What the SSE events of one response said so far."""

    def __init__(self, chat: bool, start: float) -> None:
        self.chat, self.start = chat, start
        self.text_parts: list[str] = []
        self.token_times: list[float] = []     # chunks that carried text or token ids
        self.choice_times: list[float] = []    # every chunk with a choice (but chat role-only)
        self.usage: dict[str, Any] | None = None
        self.finish_reason: str | None = None
        self.done = False

    def feed(self, line: str) -> str | None:
        """Consume one line; returns an error message when the line is not a valid event."""
        line = line.strip()
        if not line or line.startswith(":") or line.split(":", 1)[0] in ("event", "id", "retry"):
            return None
        if not line.startswith("data:"):
            return f"not an SSE stream, got: {line[:_MAX_ERROR_BODY]!r}"
        data = line[5:].strip()
        if data == "[DONE]":
            self.done = True
            return None
        try:
            chunk = json.loads(data)
        except json.JSONDecodeError:
            return f"SSE data is not JSON: {data[:_MAX_ERROR_BODY]!r}"
        return self._chunk(chunk)

    def _chunk(self, chunk: Any) -> str | None:
        if not isinstance(chunk, dict):
            return f"SSE data is not a JSON object: {str(chunk)[:_MAX_ERROR_BODY]!r}"
        if "error" in chunk:
            return f"server error in stream: {_error_message(chunk)}"
        if isinstance(chunk.get("usage"), dict):
            self.usage = chunk["usage"]
        choices = chunk.get("choices")
        if choices is None and self.usage is None:
            return f"chunk has no 'choices': {json.dumps(chunk)[:_MAX_ERROR_BODY]}"
        if not choices:
            return None
        choice = choices[0] if isinstance(choices[0], dict) else {}
        now = time.perf_counter()
        if self.chat:
            delta = choice.get("delta") or {}
            text = "".join(str(delta.get(k) or "") for k in ("reasoning_content", "content"))
            role_only = set(delta) <= {"role", "content"} and not text and not choice.get(
                "finish_reason")
        else:
            text, role_only = str(choice.get("text") or ""), False
        if not role_only:
            self.choice_times.append(now)
        if text or choice.get("token_ids"):   # token_ids: the vLLM/ferry return_token_ids extra
            self.text_parts.append(text)
            self.token_times.append(now)
        self.finish_reason = choice.get("finish_reason") or self.finish_reason
        return None


def _error_message(body: Any) -> str:
    if isinstance(body, dict):
        err = body.get("error", body)
        if isinstance(err, dict) and "message" in err:
            return str(err["message"])[:_MAX_ERROR_BODY]
        return str(err)[:_MAX_ERROR_BODY]
    return str(body)[:_MAX_ERROR_BODY]


async def send_request(client: httpx.AsyncClient, spec: RequestSpec,
                       tokenizer: Any | None = None) -> RequestResult:
    """Send one streaming request and time it; never raises except on cancellation."""
    result = RequestResult()
    start = time.perf_counter()
    try:
        await asyncio.wait_for(_stream(client, spec, tokenizer, result, start), spec.timeout)
    except asyncio.TimeoutError:
        result.fail("timeout", f"no complete response within --timeout {spec.timeout:g} s")
    except httpx.ConnectError as exc:
        result.fail("connect", f"cannot connect to {spec.url}: {exc or type(exc).__name__}")
    except httpx.TimeoutException as exc:
        result.fail("timeout", f"{type(exc).__name__} talking to {spec.url}")
    except (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError) as exc:
        result.fail("disconnected", f"connection dropped: {exc or type(exc).__name__}")
    except httpx.HTTPError as exc:
        result.fail("http_error", f"{type(exc).__name__}: {exc}")
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        result.fail("error", f"{type(exc).__name__}: {exc}")
    if result.latency is None:
        result.latency = time.perf_counter() - start
    return result


async def _stream(client: httpx.AsyncClient, spec: RequestSpec, tokenizer: Any | None,
                  result: RequestResult, start: float) -> None:
    stream = _Stream(spec.chat, start)
    async with client.stream("POST", spec.url, json=spec.body(), headers=spec.headers) as resp:
        if resp.status_code != 200:
            body = (await resp.aread()).decode("utf-8", "replace")
            try:
                message = _error_message(json.loads(body))
            except json.JSONDecodeError:
                message = body[:_MAX_ERROR_BODY]
            result.fail(f"http_{resp.status_code}", f"HTTP {resp.status_code}: {message}")
            return
        async for line in resp.aiter_lines():
            problem = stream.feed(line)
            if problem:
                result.fail("invalid_response", problem)
                return
            if stream.done:
                break
    _finish(stream, result, tokenizer)


def _finish(stream: _Stream, result: RequestResult, tokenizer: Any | None) -> None:
    """Turn what the stream said into timings and token counts."""
    end = time.perf_counter()
    result.latency = end - stream.start
    result.finish_reason = stream.finish_reason
    usage = stream.usage or {}
    generated = usage.get("completion_tokens")
    # Tokens without text (special tokens the server skips) still count when usage says so;
    # then the chunks that carried no text time them.
    times = stream.token_times or (stream.choice_times if isinstance(generated, int)
                                   and generated > 0 else [])
    if not times:
        result.fail("no_tokens", "the stream ended without any generated text")
        return
    if not stream.done and stream.finish_reason is None:
        result.fail("disconnected", "the stream ended without [DONE] or a finish_reason")
        return
    result.ttft = times[0] - stream.start
    result.itl = [b - a for a, b in zip(times, times[1:])]
    text = "".join(stream.text_parts)
    result.output_chars = len(text)
    if isinstance(generated, int):
        result.output_tokens, result.output_tokens_source = usage["completion_tokens"], "usage"
    elif tokenizer is not None:
        result.output_tokens = count_tokens(tokenizer, text)
        result.output_tokens_source = "tokenizer"
    else:
        result.output_tokens, result.output_tokens_source = len(times), "chunks"
    if isinstance(usage.get("prompt_tokens"), int):
        result.server_prompt_tokens = usage["prompt_tokens"]
    if isinstance(usage.get("energy_joules"), (int, float)):
        result.energy_joules = float(usage["energy_joules"])
    result.success = True
