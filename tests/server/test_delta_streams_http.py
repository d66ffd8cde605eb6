"""Streams are built from DELTA outputs: their chunks must add up to the plain answer.

The plain (non-streamed) answer is built from the request's one final cumulative output,
the stream from what each step added; both run the same seeded batch (n=2) on a tiny
random Llama at temperature 1, whose byte tokens split multi-byte characters. Text,
token ids, logprobs (with top alternatives), finish and stop reasons and usage must be
equal, with stop strings across tokens, ``include_stop_str_in_output`` and ``echo``.
"""
from __future__ import annotations

import json

import pytest
from ferry_server_process import MAX_MODEL_LEN
from starlette.testclient import TestClient

from ferry.config import EngineConfig, ServerConfig
from ferry.llm import build_engine
from ferry.server.api_server import build_app
from ferry.server.async_engine import engine_executor

PROMPTS = ["Once upon a time", "The capital of France is", "Numbers: 1 2 3"]
SAMPLED = {"model": "tiny", "n": 2, "temperature": 1.0, "max_tokens": 32, "ignore_eos": True,
           "return_token_ids": True}


@pytest.fixture(scope="module")
def client(server_model_dir):
    config = EngineConfig.from_flat(model=str(server_model_dir), served_model_name="tiny",
                                    kv_cache_memory="32MiB", max_model_len=MAX_MODEL_LEN)
    executor = engine_executor()
    engine = executor.submit(build_engine, config).result()   # built where it will run
    with TestClient(build_app(engine, ServerConfig(), executor)) as test_client:
        yield test_client


def answer(client, path: str, body: dict) -> dict:
    response = client.post(path, json=body)
    assert response.status_code == 200, response.text
    return response.json()


def stream(client, path: str, body: dict) -> list[dict]:
    """The stream's chunks (its data events before [DONE])."""
    response = client.post(path, json={**body, "stream": True})
    assert response.status_code == 200, response.text
    events = [line[len("data: "):] for line in response.text.splitlines()
              if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


def stop_across_tokens(text: str) -> str:
    """Three characters from the middle of ``text``: with byte tokens of 1-3 characters,
    they span tokens."""
    middle = len(text) // 2
    return text[middle:middle + 3]


def by_index(chunks: list[dict]) -> dict[int, list[dict]]:
    choices: dict[int, list[dict]] = {}
    for chunk in chunks:
        for choice in chunk["choices"]:
            choices.setdefault(choice["index"], []).append(choice)
    return choices


@pytest.mark.parametrize("prompt_index", range(len(PROMPTS)))
@pytest.mark.parametrize("variant", ["logprobs", "include_stop", "echo"])
def test_completion_stream_adds_up_to_the_answer(client, prompt_index, variant):
    body = {**SAMPLED, "prompt": PROMPTS[prompt_index], "seed": 11 + prompt_index}
    if variant != "echo":
        body["logprobs"] = 2
    probe = answer(client, "/v1/completions", body)   # also warms the prefix cache
    body["stop"] = [stop_across_tokens(probe["choices"][0]["text"]), "never-in-the-text"]
    body["include_stop_str_in_output"] = variant == "include_stop"
    body["echo"] = variant == "echo"
    body["stream_options"] = {"include_usage": True, "continuous_usage_stats": True}
    full = answer(client, "/v1/completions", {k: v for k, v in body.items()
                                              if k != "stream_options"})
    chunks = stream(client, "/v1/completions", body)

    streamed = by_index(chunks)
    assert sorted(streamed) == [0, 1]
    for choice in full["choices"]:
        parts = streamed[choice["index"]]
        assert "".join(p["text"] for p in parts) == choice["text"]
        assert sum((p["token_ids"] for p in parts), []) == choice["token_ids"]
        assert parts[-1]["finish_reason"] == choice["finish_reason"]
        assert parts[-1]["stop_reason"] == choice["stop_reason"]
        assert all(p["finish_reason"] is None for p in parts[:-1])
        if variant == "echo":
            assert choice["text"].startswith(PROMPTS[prompt_index])
        else:
            for key in ("tokens", "token_logprobs", "top_logprobs"):
                assert sum((p["logprobs"][key] for p in parts), []) == choice["logprobs"][key]
    assert full["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == full["usage"]
    counts = [c["usage"]["completion_tokens"] for c in chunks]
    assert counts == sorted(counts)   # continuous usage only grows


@pytest.mark.parametrize("prompt_index", range(len(PROMPTS)))
def test_chat_stream_adds_up_to_the_answer(client, prompt_index):
    body = {**SAMPLED, "messages": [{"role": "user", "content": PROMPTS[prompt_index]}],
            "seed": 5 + prompt_index, "logprobs": True, "top_logprobs": 2}
    probe = answer(client, "/v1/chat/completions", body)
    body["stop"] = [stop_across_tokens(probe["choices"][0]["message"]["content"])]
    body["include_stop_str_in_output"] = prompt_index % 2 == 1
    full = answer(client, "/v1/chat/completions", body)
    chunks = stream(client, "/v1/chat/completions",
                    {**body, "stream_options": {"include_usage": True}})

    streamed = by_index(chunks)
    assert sorted(streamed) == [0, 1]
    for choice in full["choices"]:
        parts = streamed[choice["index"]]
        assert parts[0]["delta"] == {"role": "assistant", "content": ""}
        parts = parts[1:]
        assert "".join(p["delta"].get("content", "") for p in parts) == \
            choice["message"]["content"]
        assert sum((p["token_ids"] for p in parts), []) == choice["token_ids"]
        assert sum((p["logprobs"]["content"] for p in parts), []) == choice["logprobs"]["content"]
        assert parts[-1]["finish_reason"] == choice["finish_reason"]
        assert parts[-1]["stop_reason"] == choice["stop_reason"]
    assert full["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["usage"] == full["usage"]
