"""``stop_reason`` in the HTTP responses, as vLLM and its clients read it: null when the
model ended on EOS, the id when a ``stop_token_ids`` entry ended it (the bundled demo model,
whose answers end on EOS, served in-process)."""
from __future__ import annotations

import json

import pytest
from starlette.testclient import TestClient

from ferry.config import EngineConfig, ServerConfig
from ferry.llm import build_engine
from ferry.server.api_server import build_app

CHAT = {"messages": [{"role": "user", "content": "Reverse: hello"}], "max_tokens": 16,
        "temperature": 0}
RAW = {"prompt": "<|user|>Reverse: hello<|end|><|assistant|>", "max_tokens": 16,
       "temperature": 0}
END = 3   # the demo model's <|end|>, its EOS


@pytest.fixture(scope="module")
def client():
    engine = build_engine(EngineConfig.from_sources())
    with TestClient(build_app(engine, ServerConfig())) as test_client:
        yield test_client


def _final_chunk(client, path: str, body: dict) -> dict:
    """The streamed chunk that carries the finish reason."""
    with client.stream("POST", path, json={**body, "stream": True}) as resp:
        assert resp.status_code == 200
        chunks = [json.loads(line[6:]) for line in resp.iter_lines()
                  if line.startswith("data: {")]
    return next(c["choices"][0] for c in chunks if c["choices"] and
                c["choices"][0].get("finish_reason"))


@pytest.mark.parametrize("path, body", [("/v1/chat/completions", CHAT),
                                        ("/v1/completions", RAW)], ids=["chat", "completions"])
def test_eos_has_a_null_stop_reason_and_a_stop_token_id_its_id(client, path, body):
    choice = client.post(path, json=body).json()["choices"][0]
    text = choice["message"]["content"] if "message" in choice else choice["text"]
    assert (text, choice["finish_reason"], choice["stop_reason"]) == ("olleh", "stop", None)
    assert _final_chunk(client, path, body)["stop_reason"] is None
    asked = client.post(path, json={**body, "stop_token_ids": [END]}).json()["choices"][0]
    assert (asked["finish_reason"], asked["stop_reason"]) == ("stop", END)
    assert _final_chunk(client, path, {**body, "stop_token_ids": [END]})["stop_reason"] == END
