"""The attention debug trace in streamed responses: the chunk that finishes a choice
carries ``choices[i].debug_trace``, the same trace as ``GET /debug/trace/{id}`` and shaped
as in the non-streamed response; with n > 1 a choice that finished before the request did
gets it on a chunk of its own. Untraced streams carry none. Over HTTP on the demo model."""
from __future__ import annotations

import json

import pytest
from starlette.testclient import TestClient

from ferry.config import EngineConfig, ServerConfig
from ferry.llm import build_engine
from ferry.server.api_server import build_app
from ferry.server.trace_store import StreamedTraces

AUTH = {"Authorization": "Bearer k"}
CHAT = {"messages": [{"role": "user", "content": "Reverse: hello"}], "max_tokens": 8,
        "temperature": 0}


@pytest.fixture(scope="module")
def client():
    engine = build_engine(EngineConfig.from_flat(debug_trace="attention"))   # the demo model
    with TestClient(build_app(engine, ServerConfig(api_key="k"))) as test_client:
        yield test_client


def _stream(client, path: str, body: dict) -> list[dict]:
    response = client.post(path, json={**body, "stream": True}, headers=AUTH)
    assert response.status_code == 200, response.text
    events = [line[len("data: "):] for line in response.text.splitlines()
              if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


def _traced_choices(chunks: list[dict]) -> dict[int, list[dict]]:
    out: dict[int, list[dict]] = {}
    for chunk in chunks:
        for choice in chunk["choices"]:
            if "debug_trace" in choice:
                out.setdefault(choice["index"], []).append(choice)
    return out


def _stored(client, request_id: str) -> dict:
    response = client.get(f"/debug/trace/{request_id}", headers=AUTH)
    assert response.status_code == 200, response.text
    return response.json()["debug_trace"]


def test_a_streamed_chat_ends_with_the_trace(client):
    chunks = _stream(client, "/v1/chat/completions", {**CHAT, "debug_trace": True})
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == "olleh"
    [[choice]] = _traced_choices(chunks).values()
    assert choice["finish_reason"] == "stop" and choice is chunks[-1]["choices"][0]
    assert choice["debug_trace"] == _stored(client, chunks[0]["id"])
    plain = client.post("/v1/chat/completions", json={**CHAT, "debug_trace": True},
                        headers=AUTH).json()["choices"][0]["debug_trace"]
    assert choice["debug_trace"].keys() == plain.keys()
    assert (choice["debug_trace"]["positions"], choice["debug_trace"]["tokens"]) == \
        (plain["positions"], plain["tokens"])   # greedy: the same answer, traced alike


def test_an_untraced_stream_carries_no_trace(client):
    assert _traced_choices(_stream(client, "/v1/chat/completions", CHAT)) == {}


def test_every_sample_and_every_prompt_gets_its_own_trace(client):
    chunks = _stream(client, "/v1/chat/completions", {
        **CHAT, "n": 2, "temperature": 1.0, "seed": 3, "debug_trace": True})
    stored = _stored(client, chunks[0]["id"])
    traced = _traced_choices(chunks)
    assert sorted(traced) == [0, 1]
    for index, [choice] in traced.items():
        assert choice["debug_trace"] == stored["completions"][index]
        assert choice["finish_reason"] in ("stop", "length")
    prompts = ["<|user|>Uppercase: tree<|end|><|assistant|>",
               "<|user|>Reverse: abc<|end|><|assistant|>"]
    chunks = _stream(client, "/v1/completions", {"prompt": prompts, "max_tokens": 8,
                                                 "temperature": 0, "debug_trace": True})
    traced = _traced_choices(chunks)
    assert sorted(traced) == [0, 1]
    for index, [choice] in traced.items():   # /v1/completions: one request per prompt
        assert choice["debug_trace"] == _stored(client, f"{chunks[0]['id']}-{index}")
    assert traced[0][0]["debug_trace"] != traced[1][0]["debug_trace"]


def test_a_choice_finished_before_the_trace_gets_it_on_a_chunk_of_its_own():
    traces = StreamedTraces(blank={"delta": {}})
    early = {"index": 1, "delta": {"content": "x"}, "finish_reason": "length"}
    traces.on_choice({"index": 0, "delta": {"content": "a"}, "finish_reason": None}, None, 0)
    traces.on_choice(early, None, 1)            # finished; the request has not yet
    assert "debug_trace" not in early and traces.owed(None) == []
    trace = {"completions": [{"positions": [0]}, {"positions": [1]}]}
    last = {"index": 0, "delta": {}, "finish_reason": "stop"}
    traces.on_choice(last, trace, 0)
    assert last["debug_trace"] == {"positions": [0]}
    assert traces.owed(trace) == [{"index": 1, "delta": {}, "logprobs": None,
                                   "finish_reason": "length", "debug_trace": {"positions": [1]}}]
    assert traces.owed(trace) == []               # sent once
