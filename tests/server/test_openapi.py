"""/openapi.json is a valid OpenAPI document that tells the truth: request bodies for every
POST route, the status codes the server really answers (no 422), OpenAI's error body, and
/metrics as text."""
from __future__ import annotations

import time

import httpx
import pytest

POST_ROUTES = {"/v1/completions": "CompletionRequest",
               "/v1/chat/completions": "ChatCompletionRequest",
               "/tokenize": "TokenizeRequest", "/detokenize": "DetokenizeRequest"}
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
