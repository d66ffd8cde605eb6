"""Load shedding (503 + Retry-After past max_waiting_requests) and the SIGTERM drain."""
from __future__ import annotations

import asyncio
import json
import signal
import threading
import time

import httpx
import pytest
from ferry_server_process import metric, scrape, start_server

LONG = {"model": "tiny", "prompt": "Once upon a time", "temperature": 0.0, "ignore_eos": True}


@pytest.fixture(scope="module")
def small_server(server_model_dir):
    """One sequence at a time and room for two waiting: easy to overload."""
    proc = start_server(["--model", str(server_model_dir), "--served-model-name", "tiny",
                         "--kv-cache-memory", "32MiB", "--max-num-seqs", "1",
                         "--max-waiting-requests", "2", "--shutdown-grace-seconds", "60"])
    yield proc
    proc.stop()


async def _burst(url: str, count: int) -> list[httpx.Response]:
    async with httpx.AsyncClient(timeout=120) as client:
        return await asyncio.gather(*(
            client.post(f"{url}/v1/completions", json={**LONG, "max_tokens": 64})
            for _ in range(count)))


def test_overload_answers_503_with_retry_after(small_server):
    before = metric(scrape(small_server.url), "llm_requests_total", status="rejected")
    responses = asyncio.run(_burst(small_server.url, 12))
    codes = [r.status_code for r in responses]
    assert set(codes) <= {200, 503} and 200 in codes and 503 in codes, codes
    for resp in responses:
        if resp.status_code == 503:
            assert int(resp.headers["Retry-After"]) >= 1
            assert resp.json()["error"]["code"] == "server_overloaded"
        else:
            assert resp.json()["usage"]["completion_tokens"] == 64
    after = metric(scrape(small_server.url), "llm_requests_total", status="rejected")
    assert after - before == codes.count(503)


def _stream_in_background(url: str, max_tokens: int) -> tuple[threading.Thread, dict]:
    """Start a streaming request; ``state['first']`` is set once a token arrived."""
    state: dict = {"first": threading.Event(), "text": "", "finish": None, "error": None}

    def run() -> None:
        try:
            with httpx.stream("POST", f"{url}/v1/completions", timeout=120,
                              json={**LONG, "max_tokens": max_tokens, "stream": True,
                                    "stream_options": {"include_usage": True}}) as resp:
                for line in resp.iter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    state["error_event"] = chunk.get("error") or state.get("error_event")
                    for choice in chunk.get("choices", []):
                        state["text"] += choice["text"]
                        state["finish"] = choice["finish_reason"] or state["finish"]
                        state["first"].set()
                    state["usage"] = chunk.get("usage") or state.get("usage")
        except Exception as exc:  # noqa: BLE001 - reported by the test
            state["error"] = exc
        finally:
            state["first"].set()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, state


def _wait_draining(url: str, timeout: float = 10.0) -> None:
    """Until /health says the server drains (the signal reached its handler)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        resp = httpx.get(f"{url}/health", timeout=5)
        if resp.status_code == 503 and resp.json() == {"status": "draining"}:
            return
        time.sleep(0.02)
    raise AssertionError("the server did not start draining")


def test_sigterm_finishes_in_flight_requests_then_exits_0(small_server):
    # 1900 tokens (the 2,048-token context allows it): the request must still be running
    # after the drain checks below, and a decode step of the tiny model is well under 1 ms
    thread, state = _stream_in_background(small_server.url, max_tokens=1900)
    assert state["first"].wait(60), "no token arrived"
    assert state["error"] is None
    small_server.send_signal(signal.SIGTERM)
    _wait_draining(small_server.url)
    # The listener stays open while draining: new work gets 503 with Retry-After, not
    # "connection refused", and the request in flight is still running.
    for path, body in (("/v1/completions", {**LONG, "max_tokens": 2}),
                       ("/v1/chat/completions", {"model": "tiny", "max_tokens": 2,
                                                 "messages": [{"role": "user", "content": "Hi"}]})):
        resp = httpx.post(small_server.url + path, json=body, timeout=10)
        assert resp.status_code == 503, resp.text
        assert int(resp.headers["Retry-After"]) >= 1
        assert resp.json()["error"]["code"] == "server_unavailable"
    assert thread.is_alive(), "the request in flight should still be running"
    thread.join(120)
    assert not thread.is_alive()
    assert state["error"] is None, state["error"]
    assert state["finish"] == "length" and state["usage"]["completion_tokens"] == 1900
    assert small_server.wait_exit(timeout=60) == 0


def test_sigterm_aborts_what_outlives_the_grace_period(server_model_dir):
    # Four streams of 1900 tokens need 1900 decode steps: far more than the 0.25 s grace
    # period even on a fast machine (a tiny model's step is a fraction of a millisecond).
    proc = start_server(["--model", str(server_model_dir), "--served-model-name", "tiny",
                         "--kv-cache-memory", "32MiB", "--shutdown-grace-seconds", "0.25"])
    try:
        streams = [_stream_in_background(proc.url, max_tokens=1900) for _ in range(4)]
        for _, state in streams:
            assert state["first"].wait(60), "no token arrived"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait_exit(timeout=60) == 0
        for thread, state in streams:
            thread.join(30)
            assert state["finish"] is None, "the request should have been cut short"
            assert state["error"] is None and state["error_event"]["code"] == "server_unavailable"
    finally:
        proc.stop()
