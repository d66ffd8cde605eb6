"""Bad requests get a 4xx with OpenAI's error body, and the server keeps serving; the API key
is enforced on /v1 routes only."""
from __future__ import annotations

import httpx
import openai
import pytest
from ferry_server_process import API_KEY, MAX_MODEL_LEN, metric, scrape

OK_COMPLETION = {"model": "tiny", "prompt": "Hello", "max_tokens": 2}
OK_CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}


def _with(base: dict, **changes) -> dict:
    body = dict(base)
    for key, value in changes.items():
        if value is _DROP:
            body.pop(key)
        else:
            body[key] = value
    return body


_DROP = object()
# A tool-calling exchange: the assistant asks for a tool, the tool answers.
TOOL_TURNS = [
    {"role": "user", "content": "What is 12+34?"},
    {"role": "assistant", "content": None,
     "tool_calls": [{"id": "call_1", "type": "function",
                     "function": {"name": "add", "arguments": "{\"a\": 12, \"b\": 34}"}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "46"},
]
C, CHAT = "/v1/completions", "/v1/chat/completions"

# (id, path, body (dict or raw text), status, expected "param" or None to skip the check)
BAD_REQUESTS = [
    ("invalid-json", C, "{not json", 400, None),
    ("empty-body", C, "", 400, None),
    ("not-an-object", C, "[1, 2]", 400, None),
    ("missing-prompt", C, _with(OK_COMPLETION, prompt=_DROP), 400, "prompt"),
    ("max-tokens-string", C, _with(OK_COMPLETION, max_tokens="5"), 400, "max_tokens"),
    ("max-tokens-float", C, _with(OK_COMPLETION, max_tokens=2.5), 400, "max_tokens"),
    ("temperature-string", C, _with(OK_COMPLETION, temperature="hot"), 400, "temperature"),
    ("stream-string", C, _with(OK_COMPLETION, stream="yes"), 400, "stream"),
    ("prompt-number", C, _with(OK_COMPLETION, prompt=5), 400, "prompt"),
    ("stop-number", C, _with(OK_COMPLETION, stop=5), 400, "stop"),
    ("temperature-negative", C, _with(OK_COMPLETION, temperature=-0.1), 400, "temperature"),
    ("temperature-too-high", C, _with(OK_COMPLETION, temperature=2.5), 400, "temperature"),
    ("top-p-zero", C, _with(OK_COMPLETION, top_p=0), 400, "top_p"),
    ("top-p-above-one", C, _with(OK_COMPLETION, top_p=1.5), 400, "top_p"),
    ("n-zero", C, _with(OK_COMPLETION, n=0), 400, "n"),
    ("max-tokens-zero", C, _with(OK_COMPLETION, max_tokens=0), 400, "max_tokens"),
    ("presence-penalty", C, _with(OK_COMPLETION, presence_penalty=3), 400, "presence_penalty"),
    ("frequency-penalty", C, _with(OK_COMPLETION, frequency_penalty=-3), 400,
     "frequency_penalty"),
    ("logprobs-too-many", C, _with(OK_COMPLETION, logprobs=21), 400, "logprobs"),
    ("top-k-negative", C, _with(OK_COMPLETION, top_k=-5), 400, "top_k"),
    ("min-p", C, _with(OK_COMPLETION, min_p=2), 400, "min_p"),
    ("repetition-penalty", C, _with(OK_COMPLETION, repetition_penalty=0), 400,
     "repetition_penalty"),
    ("min-tokens-over-max", C, _with(OK_COMPLETION, min_tokens=5), 400, None),
    ("empty-prompt", C, _with(OK_COMPLETION, prompt=""), 400, None),
    ("empty-prompt-list", C, _with(OK_COMPLETION, prompt=[]), 400, "prompt"),
    ("token-out-of-vocab", C, _with(OK_COMPLETION, prompt=[1, 10**6]), 400, None),
    ("beyond-context", C, _with(OK_COMPLETION, max_tokens=MAX_MODEL_LEN), 400, None),
    ("prompt-beyond-context", C, _with(OK_COMPLETION, prompt=[5] * (MAX_MODEL_LEN + 1)), 400,
     None),
    ("unknown-field", C, _with(OK_COMPLETION, max_token=5), 400, "max_token"),
    ("logit-bias", C, _with(OK_COMPLETION, logit_bias={"5": 10}), 400, "logit_bias"),
    ("unknown-model", C, _with(OK_COMPLETION, model="gpt-17"), 404, "model"),
    ("chat-messages-string", CHAT, _with(OK_CHAT, messages="hi"), 400, "messages"),
    ("chat-messages-empty", CHAT, _with(OK_CHAT, messages=[]), 400, "messages"),
    ("chat-bad-role", CHAT, _with(OK_CHAT, messages=[{"role": "wizard", "content": "x"}]), 400,
     "messages"),
    ("chat-top-logprobs-range", CHAT, _with(OK_CHAT, logprobs=True, top_logprobs=21), 400,
     "top_logprobs"),
    ("chat-top-logprobs-alone", CHAT, _with(OK_CHAT, top_logprobs=2), 400, None),
    ("chat-max-completion-tokens", CHAT, _with(OK_CHAT, max_completion_tokens=-1), 400,
     "max_completion_tokens"),
    ("chat-beyond-context", CHAT, _with(OK_CHAT, max_tokens=MAX_MODEL_LEN), 400, None),
    ("chat-tool-choice-unknown", CHAT, _with(OK_CHAT, tools=[{"type": "function", "function": {
        "name": "f"}}], tool_choice={"type": "function", "function": {"name": "g"}}), 400, None),
    ("chat-unknown-model", CHAT, _with(OK_CHAT, model="nope"), 404, "model"),
    ("chat-null-content", CHAT, _with(OK_CHAT, messages=[{"role": "user", "content": None}]),
     400, "messages"),
    ("chat-user-tool-calls", CHAT, _with(OK_CHAT, messages=[dict(TOOL_TURNS[1], role="user", content="x")]),
     400, "messages.0.tool_calls"),
    ("no-such-route", "/v1/embeddings", OK_COMPLETION, 404, None),
]


def _post(url: str, path: str, body, headers: dict) -> httpx.Response:
    if isinstance(body, str):
        return httpx.post(url + path, content=body, timeout=30,
                          headers={**headers, "Content-Type": "application/json"})
    return httpx.post(url + path, json=body, timeout=30, headers=headers)


def _assert_openai_error(resp: httpx.Response, status: int) -> dict:
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    return error


@pytest.mark.parametrize("path,body,status,param", [r[1:] for r in BAD_REQUESTS],
                         ids=[r[0] for r in BAD_REQUESTS])
def test_bad_request_gets_openai_error(server, auth, path, body, status, param):
    error = _assert_openai_error(_post(server.url, path, body, auth), status)
    if param is not None:
        assert error["param"] == param, error


def test_server_keeps_serving_and_counts_errors_after_bad_requests(server, auth):
    before = metric(scrape(server.url), "llm_requests_total", status="error")
    for _, path, body, status, _ in BAD_REQUESTS[:5]:
        assert _post(server.url, path, body, auth).status_code == status
    assert metric(scrape(server.url), "llm_requests_total", status="error") == before + 5
    assert _post(server.url, C, OK_COMPLETION, auth).status_code == 200
    assert _post(server.url, CHAT, OK_CHAT, auth).status_code == 200
    assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200


def test_wrong_method_is_405(server, auth):
    _assert_openai_error(httpx.get(f"{server.url}/v1/completions", headers=auth, timeout=10),
                         405)


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"},
                                     {"Authorization": API_KEY},
                                     {"Authorization": f"Basic {API_KEY}"}],
                         ids=["missing", "wrong-key", "no-scheme", "basic-scheme"])
def test_api_key_is_required_on_v1_routes(server, headers):
    _assert_openai_error(httpx.get(f"{server.url}/v1/models", headers=headers, timeout=10), 401)
    _assert_openai_error(_post(server.url, C, OK_COMPLETION, headers), 401)
    _assert_openai_error(_post(server.url, CHAT, OK_CHAT, headers), 401)


def test_api_key_accepted_and_open_routes_stay_open(server, auth):
    assert httpx.get(f"{server.url}/v1/models", headers=auth, timeout=10).status_code == 200
    for path in ("/health", "/metrics", "/version"):
        assert httpx.get(server.url + path, timeout=10).status_code == 200


def test_openai_sdk_raises_authentication_error_for_a_wrong_key(server):
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="nope", timeout=30,
                           max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        client.completions.create(model="tiny", prompt="Hi", max_tokens=2)


def test_openai_sdk_raises_bad_request_for_bad_values(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="tiny", prompt="Hi", max_tokens=2, temperature=9)
    assert "temperature" in str(info.value)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])


@pytest.mark.parametrize("messages", [TOOL_TURNS, TOOL_TURNS[:2],
                                      [{"role": "tool", "content": "46"}]],
                         ids=["tool-message", "assistant-tool-calls", "tool-message-alone"])
def test_tool_turns_are_accepted(server, auth, messages):
    for path in (CHAT, "/tokenize"):
        body = ({"messages": messages} if path == "/tokenize"
                else _with(OK_CHAT, messages=messages))
        assert _post(server.url, path, body, auth).status_code == 200


def test_null_content_is_refused_like_openai(server, auth):
    body = _with(OK_CHAT, messages=[{"role": "system", "content": "be brief"},
                                    {"role": "user", "content": None}])
    error = _assert_openai_error(_post(server.url, CHAT, body, auth), 400)
    assert "content" in error["message"] and "null" in error["message"], error
