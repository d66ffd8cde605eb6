"""Limits that protect the server: body size (413 before parsing), prompt length in
characters (400 before tokenizing), tokenization off the engine thread, the API key on
/tokenize and /detokenize, and the per-request time limit (504, KV freed)."""
from __future__ import annotations

import asyncio
import json
import statistics
import threading
import time

import httpx
import pytest
from ferry_server_process import MAX_MODEL_LEN

from ferry.server.body_limit import BodySizeLimit
from ferry.server.errors import APIError
from ferry.server.body_parsing import PARSE_OFF_LOOP_BYTES, LargeBodyCheck, validate_body
from ferry.server.protocol import ChatCompletionRequest, CompletionRequest
from ferry.server.serving_common import parse_body
from ferry.server.tokenization import PromptTokenizer, longest_token_chars

# Short, yet long enough that a huge body's own few milliseconds of client and kernel
# work on a small shared machine do not dominate its latency.
SHORT_CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}],
              "max_tokens": 16, "temperature": 0.0, "ignore_eos": True}
HUGE = 20 * 10**6  # bytes: past the default limit of 16 MiB
ROUNDS = 7


def _huge_body() -> bytes:
    """A well-formed completion request of about 20 MB (one long prompt)."""
    return json.dumps({"model": "tiny", "prompt": "a" * HUGE, "max_tokens": 2}).encode()


def _timed_chat(url: str, auth: dict) -> float:
    start = time.perf_counter()
    resp = httpx.post(f"{url}/v1/chat/completions", json=SHORT_CHAT, headers=auth, timeout=60)
    assert resp.status_code == 200, resp.text
    return time.perf_counter() - start


def _assert_413(resp: httpx.Response) -> None:
    assert resp.status_code == 413, resp.text[:500]
    error = resp.json()["error"]
    assert error["code"] == "request_too_large" and "max_request_body_bytes" in error["message"]


# ---------------------------------------------------------------------------- body size
def test_huge_bodies_are_413_at_once_and_other_requests_keep_their_latency(server, auth):
    body = _huge_body()
    _timed_chat(server.url, auth)  # warm up
    # Rounds alternate a short chat alone and one beside a huge body, and the medians are
    # compared: one chat's latency varies by 2x or more on a small, shared machine.
    alone, beside, refusals = [], [], []

    def send_huge() -> None:
        start = time.perf_counter()
        resp = httpx.post(f"{server.url}/v1/completions", content=body, timeout=60,
                          headers={**auth, "Content-Type": "application/json"})
        refusals.append((resp, time.perf_counter() - start))

    for _ in range(ROUNDS):
        alone.append(_timed_chat(server.url, auth))
        sender = threading.Thread(target=send_huge)
        sender.start()
        beside.append(_timed_chat(server.url, auth))  # while the huge body is on its way
        sender.join(60)
    assert len(refusals) == ROUNDS
    for resp, elapsed in refusals:
        _assert_413(resp)
        assert elapsed < 1.0, f"a 413 took {elapsed:.2f} s"
    assert statistics.median(beside) <= 2 * statistics.median(alone), (
        f"short chats took {[round(t * 1000) for t in beside]} ms beside a huge body, "
        f"{[round(t * 1000) for t in alone]} ms alone")


def _long_conversation() -> bytes:
    """A chat body of about 6 MB (under the limit): 150,000 short messages, whose validation
    takes seconds; their content is too long for the context (a 400 once validated)."""
    messages = [{"role": "user", "content": "ab"}] * 150_000
    return json.dumps({"model": "tiny", "messages": messages, "max_tokens": 2}).encode()


def test_a_large_body_is_parsed_off_the_event_loop_and_others_keep_their_latency(server, auth):
    body = _long_conversation()
    assert HUGE > len(body) > PARSE_OFF_LOOP_BYTES
    _timed_chat(server.url, auth)  # warm up
    alone, beside, answers = [], [], []

    def send_large() -> None:
        start = time.perf_counter()
        resp = httpx.post(f"{server.url}/v1/chat/completions", content=body, timeout=120,
                          headers={**auth, "Content-Type": "application/json"})
        answers.append((resp, time.perf_counter() - start))

    for _ in range(ROUNDS):
        alone.append(_timed_chat(server.url, auth))
        sender = threading.Thread(target=send_large)
        sender.start()
        time.sleep(0.3)                                 # its upload is done: being parsed
        beside.append(_timed_chat(server.url, auth))  # while the large body is parsed
        sender.join(120)
    assert len(answers) == ROUNDS
    for resp, _ in answers:
        assert resp.status_code == 400, resp.text[:300]
        assert resp.json()["error"]["code"] == "context_length_exceeded"
    # The large request itself is slow: on the event loop it would have stalled the chats.
    large = statistics.median(elapsed for _, elapsed in answers)
    assert large > 2 * statistics.median(alone), (
        f"the large body took only {large:.2f} s: too small to test the stall")
    assert statistics.median(beside) <= 2 * statistics.median(alone), (
        f"short chats took {[round(t * 1000) for t in beside]} ms beside a large body "
        f"({large:.2f} s), {[round(t * 1000) for t in alone]} ms alone")


def test_only_large_bodies_are_validated_on_a_worker_thread():
    from pydantic import BaseModel, model_validator

    threads = []

    class Body(BaseModel):
        text: str

        @model_validator(mode="after")
        def _where(self) -> "Body":
            threads.append(threading.current_thread())
            return self

    class FakeRequest:
        def __init__(self, body: bytes) -> None:
            self._body = body

        async def body(self) -> bytes:
            return self._body

    small = json.dumps({"text": "a"}).encode()
    large = json.dumps({"text": "a" * (PARSE_OFF_LOOP_BYTES + 1)}).encode()
    assert asyncio.run(parse_body(FakeRequest(small), Body)).text == "a"
    assert len(asyncio.run(parse_body(FakeRequest(large), Body)).text) > PARSE_OFF_LOOP_BYTES
    assert threads[0] is threading.main_thread() and threads[1] is not threading.main_thread()
    with pytest.raises(APIError) as info:                 # errors still become a 400
        asyncio.run(parse_body(FakeRequest(b'{"text": 3' + b" " * PARSE_OFF_LOOP_BYTES + b"}"),
                               Body))
    assert info.value.status == 400


def test_large_bodies_are_checked_in_another_process_as_the_server_would():
    check = LargeBodyCheck(max_model_len=10, max_prompt_chars=40)
    main_pid = __import__("os").getpid()

    async def refusal(body: dict, model_cls) -> APIError | None:
        try:
            await check.check(json.dumps(body).encode(), model_cls)
        except APIError as exc:
            return exc
        return None

    async def scenario():
        chat = {"messages": [{"role": "user", "content": "ab"}] * 21}   # 42 characters
        too_long = await refusal(chat, ChatCompletionRequest)
        fits = await refusal({"messages": chat["messages"][:20]}, ChatCompletionRequest)
        ids = await refusal({"prompt": [[1] * 10, [1] * 11]}, CompletionRequest)
        bad = {"prompt": "x", "max_tokens": -1}
        in_child = await refusal(bad, CompletionRequest)
        pid = await asyncio.get_running_loop().run_in_executor(check._executor(), _pid)
        return too_long, fits, ids, in_child, pid

    try:
        too_long, fits, ids, in_child, pid = asyncio.run(scenario())
    finally:
        check.shutdown()
    assert pid != main_pid
    assert too_long.status == 400 and too_long.code == "context_length_exceeded"
    assert "42" in too_long.message and too_long.param == "messages"
    assert fits is None
    assert ids.code == "context_length_exceeded" and "11 token ids" in ids.message
    with pytest.raises(APIError) as here:      # the child's 400 is the one the server gives
        validate_body(json.dumps({"prompt": "x", "max_tokens": -1}).encode(), CompletionRequest)
    assert (in_child.status, in_child.message, in_child.param, in_child.code) == (
        here.value.status, here.value.message, here.value.param, here.value.code)


def _pid() -> int:
    return __import__("os").getpid()


def test_a_declared_length_over_the_limit_is_refused_without_reading_the_body():
    reached_app = []

    async def app(scope, receive, send) -> None:
        reached_app.append(scope["path"])

    async def receive():
        raise AssertionError("the body must not be read")

    sent: list[dict] = []

    async def send(message) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/v1/completions",
             "headers": [(b"content-length", b"101")]}
    asyncio.run(BodySizeLimit(app, max_bytes=100)(scope, receive, send))
    assert not reached_app and sent[0]["status"] == 413
    assert json.loads(sent[1]["body"])["error"]["code"] == "request_too_large"


def test_chunked_body_is_counted_and_refused(server, auth):
    def chunks():  # no Content-Length: the server must count what streams in
        piece = b"a" * 2**20
        yield b'{"model": "tiny", "prompt": "'
        for _ in range(HUGE // len(piece)):
            yield piece
        yield b'"}'

    start = time.perf_counter()
    resp = httpx.post(f"{server.url}/v1/completions", content=chunks(), timeout=60,
                      headers={**auth, "Content-Type": "application/json"})
    elapsed = time.perf_counter() - start
    _assert_413(resp)
    assert elapsed < 1.0, f"the 413 took {elapsed:.2f} s"
    assert _timed_chat(server.url, auth) < 30  # and the server still serves


# ---------------------------------------------------------------------------- prompt length
class SpyTokenizer:
    """Counts encodes and the threads they ran on; copies are itself (so they count too)."""

    def __init__(self) -> None:
        self.calls = 0
        self.threads: set[str] = set()

    def get_vocab(self) -> dict[str, int]:
        return {"a": 0, "abcd": 1}  # the longest token: 4 characters

    def encode(self, text: str) -> list[int]:
        self.calls += 1
        self.threads.add(threading.current_thread().name)
        return [0] * len(text)

    def __deepcopy__(self, memo) -> "SpyTokenizer":
        return self


def test_prompt_longer_than_it_could_fit_is_refused_without_tokenizing():
    spy = SpyTokenizer()
    prompts = PromptTokenizer(spy, max_model_len=10, model_name="m")
    try:
        assert prompts.max_prompt_chars == 40
        with pytest.raises(APIError) as info:
            asyncio.run(prompts.encode("a" * 41))
        assert info.value.status == 400 and info.value.code == "context_length_exceeded"
        assert "40 characters" in info.value.message
        with pytest.raises(APIError):
            asyncio.run(prompts.encode_chat([{"role": "user", "content": "a" * 41}]))
        assert spy.calls == 0, "a prompt that cannot fit must not be tokenized"
        assert asyncio.run(prompts.encode("a" * 40)) == [0] * 40  # the bound itself fits
        assert spy.calls == 1
    finally:
        prompts.shutdown()


def test_tokenization_runs_on_the_tokenizer_pool_not_the_caller():
    spy = SpyTokenizer()
    prompts = PromptTokenizer(spy, max_model_len=10, model_name="m")
    try:
        asyncio.run(prompts.encode("abc"))
    finally:
        prompts.shutdown()
    assert spy.threads and all(name.startswith("ferry-tokenize") for name in spy.threads)


def test_server_refuses_a_prompt_too_long_in_characters(server, auth, server_model_dir):
    from transformers import AutoTokenizer

    longest = longest_token_chars(AutoTokenizer.from_pretrained(server_model_dir))
    prompt = "a" * (MAX_MODEL_LEN * longest + 1)
    for path, body in (("/v1/completions", {"model": "tiny", "prompt": prompt}),
                       ("/v1/chat/completions",
                        {"model": "tiny", "messages": [{"role": "user", "content": prompt}]}),
                       ("/tokenize", {"prompt": prompt})):
        resp = httpx.post(server.url + path, json=body, headers=auth, timeout=30)
        assert resp.status_code == 400, resp.text[:300]
        assert resp.json()["error"]["code"] == "context_length_exceeded"


# ---------------------------------------------------------------------------- API key
@pytest.mark.parametrize("path,body", [("/tokenize", {"prompt": "Hello"}),
                                       ("/detokenize", {"tokens": [1, 2]})])
def test_tokenize_and_detokenize_need_the_api_key(server, auth, path, body):
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        resp = httpx.post(server.url + path, json=body, headers=headers, timeout=10)
        assert resp.status_code == 401, resp.text
        assert resp.json()["error"]["code"] == "invalid_api_key"
    assert httpx.post(server.url + path, json=body, headers=auth, timeout=10).status_code == 200


# ---------------------------------------------------------------------------- time limit
@pytest.fixture(scope="module")
def timed_app(server_model_dir):
    """An in-process app over a real engine with a 0.5 s request time limit (one lifespan:
    its end shuts the engine and the tokenizer pool down)."""
    return _build_timed_app(server_model_dir)


def _build_timed_app(server_model_dir, timeout: float = 0.5):
    from ferry.config import EngineConfig, ServerConfig
    from ferry.llm import build_engine
    from ferry.server.api_server import build_app
    from ferry.server.async_engine import engine_executor

    config = EngineConfig.from_flat(model=str(server_model_dir), served_model_name="tiny",
                                    kv_cache_memory="32MiB",
                                    max_model_len=MAX_MODEL_LEN)
    executor = engine_executor()
    engine = executor.submit(build_engine, config).result()  # built where it will run
    return build_app(engine, ServerConfig(request_timeout_seconds=timeout), executor)


LONG = {"model": "tiny", "prompt": "Once upon a time", "max_tokens": 1900,
        "temperature": 0.0, "ignore_eos": True}


async def _timed_out_requests(app) -> tuple[httpx.Response, httpx.Response, float, float]:
    """A non-streaming and a streaming request that outlive the limit; then the KV usage."""
    state = app.state.ferry
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://ferry",
                                     timeout=60) as client:
            start = time.perf_counter()
            plain = await client.post("/v1/completions", json=LONG)
            elapsed = time.perf_counter() - start
            streamed = await client.post("/v1/completions", json={**LONG, "stream": True})
        usage = await state.engine.call(lambda engine: engine.get_stats().kv_cache_usage)
    return plain, streamed, elapsed, usage


def test_request_time_limit_aborts_and_frees_the_kv_cache(timed_app):
    plain, streamed, elapsed, usage = asyncio.run(_timed_out_requests(timed_app))
    assert plain.status_code == 504, plain.text[:300]
    error = plain.json()["error"]
    assert error["code"] == "request_timeout" and "request_timeout_seconds" in error["message"]
    assert 0.4 < elapsed < 5, f"the limit is 0.5 s; the request took {elapsed:.2f} s"
    events = [line[6:] for line in streamed.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    assert json.loads(events[-2])["error"]["code"] == "request_timeout"
    assert usage == 0, "the aborted requests' KV blocks must be freed"


async def _with_slow_tokenizer(app, cases: list[tuple[float, str, dict]]) -> list[
        tuple[httpx.Response, float, float]]:
    """For each (delay, path, body): one request while tokenizing and templating take
    ``delay`` seconds more; its answer and time, and the KV usage after it."""
    state = app.state.ferry
    prompts = state.prompts
    results = []

    def slowed(original, delay):
        async def slow(*args, **kwargs):
            await asyncio.sleep(delay)
            return await original(*args, **kwargs)
        return slow

    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://ferry",
                                     timeout=60) as client:
            for delay, path, body in cases:
                for name in ("encode", "encode_chat"):
                    setattr(prompts, name, slowed(getattr(type(prompts), name).__get__(prompts),
                                                  delay))
                start = time.perf_counter()
                resp = await client.post(path, json=body)
                elapsed = time.perf_counter() - start
                await asyncio.sleep(0.2)   # the abort reaches the engine
                usage = await state.engine.call(
                    lambda engine: engine.get_stats().kv_cache_usage)
                results.append((resp, elapsed, usage))
    return results


LONG_CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "Once upon a time"}],
             "max_tokens": 1900, "temperature": 0.0, "ignore_eos": True}


def test_request_time_limit_counts_tokenizing(server_model_dir):
    limit = 2.0   # seconds; margins of about a second either way, for a busy machine
    app = _build_timed_app(server_model_dir, timeout=limit)
    cases = [(delay, path, body) for path, body in (("/v1/completions", LONG),
                                                    ("/v1/chat/completions", LONG_CHAT))
             for delay in (2 * limit, 0.75 * limit)]
    for (delay, path, _), (resp, elapsed, usage) in zip(cases, asyncio.run(
            _with_slow_tokenizer(app, cases))):
        assert resp.status_code == 504, (path, delay, resp.text[:300])
        assert resp.json()["error"]["code"] == "request_timeout"
        assert usage == 0, "the aborted request's KV blocks must be freed"
        # At the limit from arrival: not after tokenizing (2x the limit), nor after a fresh
        # limit once tokenizing (0.75x) is done (1.75x).
        assert limit - 0.1 < elapsed < 1.4 * limit, (
            f"{path}: limit {limit} s, tokenizing {delay} s; the request took {elapsed:.2f} s")
