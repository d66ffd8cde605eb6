"""``priority`` over HTTP: a more urgent request preempts streaming low-priority ones.

A real ``ferry serve`` (tiny random Llama, float32, 4-token blocks) with a KV cache just
large enough for three low-priority streams (400-token prompts, 120 greedy tokens each).
Once they stream, a request with a smaller ``priority`` arrives whose prompt does not fit
in the blocks left: it must preempt a stream (by swap or by recompute, per server) and get
its first token before any stream ends; FCFS would make it wait for one to finish. The
streams then finish with exactly the tokens they produce alone, the swap/recompute counter
of that mode moved, and the KV cache is empty again. Invalid ``priority`` values get a 400
in the OpenAI error format on both endpoints.
"""
from __future__ import annotations

import random
import threading
import time

import httpx
import pytest

from ferry_server_process import metric, scrape, start_server
from test_engine_e2e import _budget_for_blocks

BLOCKS = 392            # 3 streams x (100 prompt + 30 output blocks) + 2
LOW_PROMPT, LOW_TOKENS = 400, 120
HIGH_PROMPT, HIGH_TOKENS = 400, 8   # 101+ blocks: more than the streams leave free
LOW, HIGH = 10, -5


@pytest.fixture(scope="module", params=["swap", "recompute"])
def priority_server(request, server_model_dir):
    mode = request.param
    args = ["--model", str(server_model_dir), "--served-model-name", "tiny", "--dtype", "float32",
            "--block-size", "4", "--kv-cache-memory", str(_budget_for_blocks(str(server_model_dir), BLOCKS)),
            "--scheduling-policy", "priority", "--preemption-mode", mode, "--swap-space", "0.05",
            "--short-prompt-threshold", "512", "--max-num-seqs", "8"]
    proc = start_server(args)
    yield mode, proc
    proc.stop()


def _client(url: str):
    import openai
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", timeout=120, max_retries=0)


def _prompt(seed: int, length: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 250) for _ in range(length)]


def _body(priority: int) -> dict:
    return {"priority": priority, "ignore_eos": True, "return_token_ids": True}


def _alone(client, prompt: list[int]) -> list[int]:
    """Greedy tokens of ``prompt`` with the server otherwise idle (no preemption)."""
    out = client.completions.create(model="tiny", prompt=prompt, max_tokens=LOW_TOKENS,
                                    temperature=0, extra_body=_body(LOW))
    return list(out.choices[0].token_ids)


class Stream(threading.Thread):
    """One streamed completion; records its tokens and when the first and last arrived."""

    def __init__(self, client, prompt, priority, max_tokens):
        super().__init__(daemon=True)
        self.args = (client, prompt, priority, max_tokens)
        self.tokens: list[int] = []
        self.first_at = self.done_at = None
        self.error: BaseException | None = None

    def run(self) -> None:
        client, prompt, priority, max_tokens = self.args
        try:
            stream = client.completions.create(model="tiny", prompt=prompt, max_tokens=max_tokens,
                                               temperature=0, stream=True,
                                               extra_body=_body(priority))
            for chunk in stream:
                ids = getattr(chunk.choices[0], "token_ids", None) if chunk.choices else None
                if ids:
                    self.first_at = self.first_at or time.monotonic()
                    self.tokens.extend(ids)
            self.done_at = time.monotonic()
        except BaseException as exc:   # re-raised by the test
            self.error = exc


def test_urgent_request_preempts_streams_which_still_finish_right(priority_server):
    mode, server = priority_server
    client = _client(server.url)
    prompts = [_prompt(seed, LOW_PROMPT) for seed in range(3)]
    expected = [_alone(client, p) for p in prompts]
    before = metric(scrape(server.url), "llm_preemptions_total", mode=mode)

    lows = [Stream(client, p, LOW, LOW_TOKENS) for p in prompts]
    for s in lows:
        s.start()
    deadline = time.monotonic() + 60
    while any(len(s.tokens) < 4 for s in lows) and time.monotonic() < deadline:
        assert not any(s.done_at for s in lows), "a stream ended before the others started"
        time.sleep(0.005)
    high = Stream(client, _prompt(99, HIGH_PROMPT), HIGH, HIGH_TOKENS)
    high.start()
    for s in [high, *lows]:
        s.join(timeout=120)
        assert not s.is_alive() and s.error is None, s.error or server.output()

    assert len(high.tokens) == HIGH_TOKENS
    assert high.first_at < min(s.done_at for s in lows), "the urgent request waited for a stream"
    assert [s.tokens for s in lows] == expected   # preempted streams lost nothing
    values = scrape(server.url)
    assert metric(values, "llm_preemptions_total", mode=mode) > before
    assert metric(values, "llm_kv_cache_usage_ratio") == 0.0
    assert metric(values, "llm_swapped_blocks") == 0.0


def test_priority_is_accepted_on_both_endpoints(priority_server):
    _, server = priority_server
    client = _client(server.url)
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                          max_tokens=3, extra_body={"priority": -3})
    assert chat.choices[0].finish_reason in ("length", "stop")
    text = client.completions.create(model="tiny", prompt="hi", max_tokens=3,
                                     extra_body={"priority": 2**31 - 1})
    assert text.choices[0].finish_reason in ("length", "stop")


@pytest.mark.parametrize("value", ["1", 1.5, True, None, 2**31, -(2**31) - 1, 10**30])
@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_invalid_priority_is_a_400_in_the_openai_format(priority_server, path, value):
    _, server = priority_server
    body = {"model": "tiny", "max_tokens": 2, "priority": value}
    body.update({"prompt": "hi"} if path == "/v1/completions"
                else {"messages": [{"role": "user", "content": "hi"}]})
    response = httpx.post(server.url + path, json=body, timeout=30)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and "priority" in (error.get("param") or error["message"])


def test_a_request_the_whole_cache_cannot_hold_is_a_400_that_says_so(priority_server):
    _, server = priority_server       # 392 blocks of 4 tokens, max_model_len 2048
    body = {"model": "tiny", "prompt": _prompt(5, 1000), "max_tokens": 1000}
    response = httpx.post(server.url + "/v1/completions", json=body, timeout=30)
    assert response.status_code == 400, response.text
    assert "KV blocks" in response.json()["error"]["message"]


def test_without_max_tokens_a_small_cache_still_serves(priority_server):
    """No max_tokens: the output may fill what the KV cache holds, not be refused for it."""
    _, server = priority_server
    client = _client(server.url)
    long_message = [{"role": "user", "content": "hello world " * 200}]   # ~1,400 tokens
    chat = client.chat.completions.create(model="tiny", messages=long_message,
                                          extra_body={"priority": 1})
    assert chat.choices[0].finish_reason in ("length", "stop")
    assert chat.usage.prompt_tokens + chat.usage.completion_tokens <= BLOCKS * 4
