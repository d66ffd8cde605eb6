"""Clients that leave mid-request get their requests aborted and their KV blocks freed.

Honesty check without timing: every request asks for far more tokens than the polling
window allows; if aborts did not work, the engine would generate all of them before
``llm_requests_running`` dropped to 0, so the generated-token count tells the difference.
"""
from __future__ import annotations

import asyncio
import time

import httpx
from ferry_server_process import MAX_MODEL_LEN, metric, scrape

NUM_CLIENTS = 16
MAX_TOKENS = MAX_MODEL_LEN - 64
SETTLE_TIMEOUT_S = 60.0


def _long_request(stream: bool) -> dict:
    return {"model": "tiny", "prompt": "Once upon a time", "max_tokens": MAX_TOKENS,
            "temperature": 0.0, "ignore_eos": True, "stream": stream}


async def _stream_then_leave(client: httpx.AsyncClient, url: str, auth: dict) -> int:
    """Read two SSE events, then close the connection mid-stream."""
    events = 0
    async with client.stream("POST", f"{url}/v1/completions", json=_long_request(True),
                             headers=auth) as resp:
        assert resp.status_code == 200
        async for line in resp.aiter_lines():
            if line.startswith("data: "):
                events += 1
                if events >= 2:
                    break
    return events


async def _storm(url: str, auth: dict) -> None:
    limits = httpx.Limits(max_connections=NUM_CLIENTS * 2)
    async with httpx.AsyncClient(timeout=60, limits=limits) as client:
        results = await asyncio.gather(*(_stream_then_leave(client, url, auth)
                                         for _ in range(NUM_CLIENTS)))
    assert results == [2] * NUM_CLIENTS


def _wait_idle(url: str) -> dict[str, float]:
    deadline = time.monotonic() + SETTLE_TIMEOUT_S
    while True:
        values = scrape(url)
        if (metric(values, "llm_requests_running") == 0
                and metric(values, "llm_requests_waiting") == 0
                and metric(values, "llm_kv_cache_usage_ratio") == 0):
            return values
        assert time.monotonic() < deadline, f"not idle after {SETTLE_TIMEOUT_S} s: {values}"
        time.sleep(0.1)


def test_disconnect_storm_aborts_and_frees_kv(server, auth):
    before = _wait_idle(server.url)
    asyncio.run(_storm(server.url, auth))
    after = _wait_idle(server.url)
    generated = (metric(after, "llm_generation_tokens_total")
                 - metric(before, "llm_generation_tokens_total"))
    assert generated < NUM_CLIENTS * MAX_TOKENS / 4, "requests ran on after their clients left"
    aborted = (metric(after, "llm_requests_total", status="aborted")
               - metric(before, "llm_requests_total", status="aborted"))
    assert aborted == NUM_CLIENTS
    assert metric(after, "llm_requests_total", status="ok") == \
        metric(before, "llm_requests_total", status="ok")


def test_non_streaming_client_timeout_aborts(server, auth):
    before = _wait_idle(server.url)
    for _ in range(3):
        try:
            httpx.post(f"{server.url}/v1/completions", json=_long_request(False), headers=auth,
                       timeout=httpx.Timeout(10, read=0.3))
        except httpx.ReadTimeout:
            pass
        else:
            raise AssertionError("the long request should not finish within the read timeout")
    after = _wait_idle(server.url)
    generated = (metric(after, "llm_generation_tokens_total")
                 - metric(before, "llm_generation_tokens_total"))
    # Without aborts all 3 x MAX_TOKENS would be generated before the server went idle.
    assert generated < 3 * MAX_TOKENS / 2
    assert metric(after, "llm_requests_total", status="aborted") == \
        metric(before, "llm_requests_total", status="aborted") + 3
