"""Local HTTP servers for the bench tests: a well-behaved OpenAI-compatible fake and a
deliberately broken one. Both listen on 127.0.0.1 in a background thread.

The fake streams ``max_tokens`` chunks of one word each (one "token"), after
``first_delay`` seconds and then every ``token_delay`` seconds, and reports ``usage``
(prompt tokens = whitespace words of the prompt) when asked with ``stream_options``.
It serves ``/v1/models`` and a ``/metrics`` page whose counters grow with each request.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
import time

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.routing import Route


def _free_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


class FakeOpenAIServer:
    """Starlette app in a uvicorn thread; ``requests`` records every request body and
    ``max_in_flight`` the most streams open at once (the server's own count)."""

    def __init__(self, first_delay: float = 0.02, token_delay: float = 0.005,
                 model: str = "fake-model", usage: bool = True, tokenize: bool = False,
                 empty_text: bool = False, max_model_len: int | None = None) -> None:
        self.first_delay, self.token_delay, self.model = first_delay, token_delay, model
        # With ``max_model_len``: /v1/models reports it (as vLLM and ferry do), and a request
        # longer than it gets ferry's 400.
        self.max_model_len = max_model_len
        self.usage = usage
        self.empty_text = empty_text   # tokens whose text is empty (skipped special tokens)
        # With ``tokenize``: a /tokenize route, and every prompt counts one extra "BOS" token.
        self.bos = 1 if tokenize else 0
        self.requests: list[dict] = []
        self.energy = 100.0
        self.hits, self.queries = 0, 0
        self.in_flight = self.max_in_flight = 0
        routes = [Route("/v1/completions", self._completions, methods=["POST"]),
                  Route("/v1/chat/completions", self._chat, methods=["POST"]),
                  Route("/v1/models", self._models), Route("/metrics", self._metrics)]
        if tokenize:
            routes.append(Route("/tokenize", self._tokenize, methods=["POST"]))
        self.app = Starlette(routes=routes)

    async def _models(self, request: Request) -> JSONResponse:
        card = {"id": self.model, "object": "model"}
        if self.max_model_len:
            card["max_model_len"] = self.max_model_len
        return JSONResponse({"object": "list", "data": [card]})

    async def _tokenize(self, request: Request) -> JSONResponse:
        body = await request.json()
        return JSONResponse({"count": len(body["prompt"].split()) + self.bos})

    async def _metrics(self, request: Request) -> PlainTextResponse:
        ratio = self.hits / self.queries if self.queries else 0.0
        labels = f'model="{self.model}",quant_type="none",gpu_vendor="cpu"'
        text = (f"# TYPE llm_kv_cache_hit_ratio gauge\nllm_kv_cache_hit_ratio{{{labels}}} {ratio}\n"
                f"# TYPE llm_energy_joules counter\nllm_energy_joules_total{{{labels}}} "
                f"{self.energy}\n")
        return PlainTextResponse(text)

    async def _completions(self, request: Request) -> StreamingResponse:
        return await self._stream(request, chat=False)

    async def _chat(self, request: Request) -> StreamingResponse:
        return await self._stream(request, chat=True)

    async def _stream(self, request: Request, chat: bool) -> StreamingResponse:
        body = await request.json()
        self.requests.append(body)
        prompt = body["messages"][-1]["content"] if chat else body["prompt"]
        prompt_tokens = len(prompt.split()) + self.bos
        if self.max_model_len and prompt_tokens + body["max_tokens"] > self.max_model_len:
            return JSONResponse({"error": {
                "message": f"this model's maximum context length is {self.max_model_len} "
                           f"tokens, but the request asks for {prompt_tokens + body['max_tokens']}",
                "type": "invalid_request_error", "param": None,
                "code": "context_length_exceeded"}}, status_code=400)
        self.queries += prompt_tokens
        self.hits += prompt_tokens // 2
        self.energy += 1.5
        include_usage = self.usage and (body.get("stream_options") or {}).get("include_usage")

        async def events():
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            try:
                async for event in tokens():
                    yield event
            finally:
                self.in_flight -= 1

        async def tokens():
            if chat:  # role-only first chunk, as OpenAI sends: not a token
                yield _sse({"choices": [{"index": 0, "delta": {"role": "assistant"}}]})
            await asyncio.sleep(self.first_delay)
            n = body["max_tokens"]
            for i in range(n):
                if i:
                    await asyncio.sleep(self.token_delay)
                finish = "length" if i == n - 1 else None
                piece = "" if self.empty_text else f" w{i}"
                choice = ({"index": 0, "delta": {"content": piece}, "finish_reason": finish}
                          if chat else {"index": 0, "text": piece, "finish_reason": finish})
                yield _sse({"id": "x", "object": "chunk", "choices": [choice]})
            if include_usage:
                yield _sse({"choices": [], "usage": {"prompt_tokens": prompt_tokens,
                                                     "completion_tokens": n,
                                                     "total_tokens": prompt_tokens + n}})
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj)}\n\n"


@contextlib.contextmanager
def run_fake_server(**kwargs):
    """Yield ``(base_url, FakeOpenAIServer)`` while it serves in a thread."""
    fake = FakeOpenAIServer(**kwargs)
    sock = _free_socket()
    config = uvicorn.Config(fake.app, log_level="error", lifespan="off")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}", fake
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


# ------------------------------------------------------------------ the broken server
BROKEN_MODES = ("close_at_once", "http_500", "html_page", "not_json", "drop_mid_stream",
                "never_answer", "no_choices")


async def _broken_handler(mode: str, writer: asyncio.StreamWriter) -> None:
    sse = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
           b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n")

    def chunk(data: bytes) -> bytes:
        return f"{len(data):x}\r\n".encode() + data + b"\r\n"

    if mode == "http_500":
        body = b'{"error": {"message": "boom", "type": "internal"}}'
        writer.write(b"HTTP/1.1 500 Internal Server Error\r\nContent-Type: application/json\r\n"
                     + f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body)
    elif mode == "html_page":
        body = b"<html><body>hello</body></html>"
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\n"
                     + f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body)
    elif mode == "not_json":
        writer.write(sse + chunk(b"data: this is not json\n\n") + b"0\r\n\r\n")
    elif mode == "drop_mid_stream":
        writer.write(sse + chunk(b'data: {"choices": [{"index": 0, "text": " a"}]}\n\n'))
        await writer.drain()
        await asyncio.sleep(0.05)
    elif mode == "no_choices":
        writer.write(sse + chunk(b'data: {"hello": "world"}\n\n') + chunk(b"data: [DONE]\n\n")
                     + b"0\r\n\r\n")
    elif mode == "never_answer":
        await asyncio.sleep(3600)
    await writer.drain()
    writer.close()


@contextlib.contextmanager
def run_broken_server():
    """Yield a base URL whose n-th POST misbehaves as ``BROKEN_MODES[n % 7]``."""
    loop = asyncio.new_event_loop()
    counter = {"n": 0}

    async def handle(reader, writer):
        with contextlib.suppress(Exception, asyncio.CancelledError):
            head = await reader.readuntil(b"\r\n\r\n")  # the body does not matter
            if not head.startswith(b"POST /v1/"):  # /v1/models, /metrics, /tokenize: 404
                writer.write(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n"
                             b"Connection: close\r\n\r\n")
                await writer.drain()
                writer.close()
                return
            mode = BROKEN_MODES[counter["n"] % len(BROKEN_MODES)]
            counter["n"] += 1
            await _broken_handler(mode, writer)

    sock = _free_socket()
    server = loop.run_until_complete(asyncio.start_server(handle, sock=sock))
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        async def stop():
            server.close()
            for task in asyncio.all_tasks():
                if task is not asyncio.current_task():
                    task.cancel()
        asyncio.run_coroutine_threadsafe(stop(), loop).result(timeout=5)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=5)
