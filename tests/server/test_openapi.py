"""/openapi.json is a valid OpenAPI document that tells the truth: request bodies for every
POST route, the status codes the server really answers (no 422), OpenAI's error body, and
/metrics as text."""
from __future__ import annotations

import json
import time

import httpx
import pytest

POST_ROUTES = {"/v1/completions": "CompletionRequest",
               "/v1/chat/completions": "ChatCompletionRequest",
               "/tokenize": "TokenizeRequest", "/detokenize": "DetokenizeRequest",
               "/v1/load_lora_adapter": "LoadLoRAAdapterRequest",
               "/v1/unload_lora_adapter": "UnloadLoRAAdapterRequest"}
BODYLESS_POST_ROUTES = {"/admin/reload"}   # re-reads the server's own config file
ERROR_REF = "#/components/schemas/ErrorResponse"


@pytest.fixture(scope="module")
def document(server) -> dict:
    resp = httpx.get(f"{server.url}/openapi.json", timeout=10)
    assert resp.status_code == 200
    return resp.json()


def _resolve(document: dict, ref: str) -> dict:
    assert ref.startswith("#/components/schemas/"), ref
    return document["components"]["schemas"][ref.rsplit("/", 1)[1]]


def _operations(document: dict):
    for path, item in document["paths"].items():
        for method, operation in item.items():
            yield path, method, operation


@pytest.mark.timeout(60)
def test_the_document_is_valid_openapi(document):
    from openapi_spec_validator import validate

    start = time.perf_counter()
    validate(document)
    assert time.perf_counter() - start < 10, "validating the document should take seconds"


def test_every_post_route_publishes_its_request_body(document):
    posts = {path for path, method, _ in _operations(document) if method == "post"}
    assert posts == set(POST_ROUTES) | BODYLESS_POST_ROUTES
    for path in BODYLESS_POST_ROUTES:
        assert "requestBody" not in document["paths"][path]["post"]
    for path, model in POST_ROUTES.items():
        body = document["paths"][path]["post"]["requestBody"]
        assert body["required"] is True
        ref = body["content"]["application/json"]["schema"]["$ref"]
        assert ref.endswith("/" + model)
        assert _resolve(document, ref)["properties"], f"{model} has no properties"
    completion = _resolve(document, "#/components/schemas/CompletionRequest")
    assert "prompt" in completion["required"] and "max_tokens" in completion["properties"]


def test_no_bogus_422_and_the_real_error_codes_use_the_openai_body(document):
    for path, method, operation in _operations(document):
        assert "422" not in operation["responses"], f"{method.upper()} {path} documents 422"
        for code, response in operation["responses"].items():
            if code.startswith(("4", "5")) and path != "/health":
                schema = response["content"]["application/json"]["schema"]
                assert schema == {"$ref": ERROR_REF}, (path, code, schema)
    schemas = document["components"]["schemas"]
    assert "HTTPValidationError" not in schemas
    assert set(schemas["ErrorResponse"]["properties"]) == {"error"}
    paths = document["paths"]
    assert {"200", "401", "404"} <= set(paths["/v1/models/{model_id}"]["get"]["responses"])
    for path in ("/v1/completions", "/v1/chat/completions"):
        assert {"200", "400", "401", "404", "413", "503"} <= set(paths[path]["post"]["responses"])
    for path in ("/tokenize", "/detokenize"):
        assert {"200", "400", "401", "413"} <= set(paths[path]["post"]["responses"])


def test_metrics_is_documented_as_text(document, server):
    content = document["paths"]["/metrics"]["get"]["responses"]["200"]["content"]
    assert set(content) == {"text/plain"}
    served = httpx.get(f"{server.url}/metrics", timeout=10).headers["content-type"]
    assert served.startswith("text/plain")


def _validator(document: dict, ref: str):
    """A JSON Schema validator for one component, resolving refs inside the document."""
    from jsonschema import Draft202012Validator

    return Draft202012Validator({"$ref": ref, "components": document["components"]})


def _sse_data(text: str) -> list[str]:
    return [line[len("data: "):] for line in text.splitlines() if line.startswith("data: ")]


GENERATIONS = {
    "/v1/completions": ("CompletionResponse", "CompletionStreamResponse",
                        {"prompt": "hello there", "max_tokens": 5, "n": 2, "logprobs": 2,
                         "return_token_ids": True}),
    "/v1/chat/completions": ("ChatCompletionResponse", "ChatCompletionStreamResponse",
                             {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5,
                              "n": 2, "logprobs": True, "top_logprobs": 2,
                              "return_token_ids": True}),
}


@pytest.mark.parametrize("path", sorted(GENERATIONS))
def test_generation_200_publishes_the_json_and_event_stream_bodies(document, path):
    model, chunk, _ = GENERATIONS[path]
    content = document["paths"][path]["post"]["responses"]["200"]["content"]
    assert content["application/json"]["schema"] == {"$ref": f"#/components/schemas/{model}"}
    schemas = document["components"]["schemas"]
    assert {"id", "object", "created", "model", "choices", "usage"} <= set(
        schemas[model]["required"])
    data = content["text/event-stream"]["schema"]["properties"]["data"]["anyOf"]
    assert {"const": "[DONE]"}.items() <= data[0].items()
    refs = {r["$ref"] for r in data[1]["contentSchema"]["anyOf"]}
    assert refs == {f"#/components/schemas/{chunk}", ERROR_REF}
    assert "choices" in schemas[chunk]["required"]


@pytest.mark.parametrize("path", sorted(GENERATIONS))
def test_real_answers_match_the_published_schemas(document, server, auth, path):
    """Non-streamed and streamed answers (n=2, logprobs, token ids, usage) validate against
    the document; a schema that disagreed with the handlers would fail here."""
    model, chunk, body = GENERATIONS[path]
    resp = httpx.post(f"{server.url}{path}", json=body, headers=auth, timeout=60)
    assert resp.status_code == 200, resp.text
    _validator(document, f"#/components/schemas/{model}").validate(resp.json())
    assert len(resp.json()["choices"]) == 2

    streamed = dict(body, stream=True, stream_options={"include_usage": True})
    resp = httpx.post(f"{server.url}{path}", json=streamed, headers=auth, timeout=60)
    assert resp.status_code == 200 and resp.headers["content-type"].startswith(
        "text/event-stream")
    events = _sse_data(resp.text)
    assert events[-1] == "[DONE]" and len(events) > 3
    chunk_validator = _validator(document, f"#/components/schemas/{chunk}")
    chunks = [json.loads(data) for data in events[:-1]]
    for payload in chunks:
        chunk_validator.validate(payload)
    streamed_tokens = sum(len(c.get("token_ids") or []) for p in chunks for c in p["choices"])
    assert chunks[-1]["usage"]["completion_tokens"] == streamed_tokens > 0


def test_the_published_schemas_reject_a_wrong_body(document):
    """The schemas are not vacuous: a body missing its choices or with a text that is not
    a string fails them."""
    import jsonschema

    validator = _validator(document, "#/components/schemas/CompletionResponse")
    good = {"id": "x", "object": "text_completion", "created": 1, "model": "m",
            "system_fingerprint": None,
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
            "choices": [{"index": 0, "text": "a", "logprobs": None, "finish_reason": "length",
                         "stop_reason": None}]}
    validator.validate(good)
    with pytest.raises(jsonschema.ValidationError):
        validator.validate({k: v for k, v in good.items() if k != "choices"})
    with pytest.raises(jsonschema.ValidationError):
        validator.validate(dict(good, choices=[dict(good["choices"][0], text=3)]))
