"""An OpenAPI document that says what the server really does.

The POST handlers read their bodies themselves (strict parsing, OpenAI's 400 instead of
FastAPI's 422), so FastAPI sees no body parameter: each route declares its request model
with :func:`json_body`, its answer with :func:`ok` or :func:`generated` (JSON or
server-sent events) and its real status codes with :func:`error_responses`, and
:func:`install_openapi` adds the request models to the components and drops the 422
entries FastAPI adds for path parameters (the server never answers 422).
"""
from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from ferry.server.protocol import ErrorResponse

_REF = "#/components/schemas/{model}"

_WHY = {400: "The request is invalid (OpenAI's error body names the parameter)",
        401: "Missing or invalid API key",
        404: "Unknown model",
        413: "The request body is larger than max_request_body_bytes",
        503: "Draining for shutdown, or the waiting queue is full (see Retry-After)",
        504: "The request ran past request_timeout_seconds and was aborted"}


def json_body(model: type[BaseModel]) -> dict[str, Any]:
    """``openapi_extra`` declaring ``model`` as the route's required JSON body."""
    return {"requestBody": {"required": True, "content": {"application/json": {
        "schema": {"$ref": _REF.format(model=model.__name__)}}}}}


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """``responses=`` entries: each of ``codes`` answers OpenAI's error body."""
    return {code: {"model": ErrorResponse, "description": _WHY[code]} for code in codes}


def ok(model: type[BaseModel], description: str = "Successful Response") -> dict[int, Any]:
    """The 200 entry of ``responses=`` for a JSON body of ``model``."""
    return {200: {"model": model, "description": description}}


def generated(model: type[BaseModel], chunk: type[BaseModel]) -> dict[int, Any]:
    """The 200 entry of a generation route: a JSON body of ``model``, or with ``"stream":
    true`` server-sent events whose data is a ``chunk`` (or an error body), then [DONE].

    Before OpenAPI 3.2 an event stream's schema can only describe one event: here its
    fields, ``data`` being JSON (``contentSchema``) or the literal ``[DONE]``. ``chunk``
    must be among the models given to :func:`install_openapi`.
    """
    data = {"anyOf": [
        {"const": "[DONE]", "description": "The last event of every stream"},
        {"type": "string", "contentMediaType": "application/json",
         "contentSchema": {"anyOf": [{"$ref": _REF.format(model=chunk.__name__)},
                                     {"$ref": _REF.format(model=ErrorResponse.__name__)}]},
         "description": f"A {chunk.__name__} as JSON, or an error body when the request "
                        "fails after the stream began (followed by [DONE])"}]}
    event = {"type": "object", "required": ["data"],
             "properties": {"data": data, "event": {"type": "string"}, "id": {"type": "string"}}}
    return {200: {"model": model,
                  "description": "The completion; with \"stream\": true, its chunks as "
                                 "server-sent events (`data: <chunk>`), ending with "
                                 "`data: [DONE]`",
                  "content": {"text/event-stream": {"schema": event}}}}


def install_openapi(app: FastAPI, request_models: list[type[BaseModel]]) -> None:
    """``app.openapi()`` (``/openapi.json``): FastAPI's document, plus ``request_models``
    (request bodies, stream chunks: models no route's ``response_model`` names) as
    components, minus the 422 responses. Built once, on first request."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            document = get_openapi(title=app.title, version=app.version, routes=app.routes,
                                   description=app.description)
            _add_components(document, request_models)
            _drop_validation_errors(document)
            app.openapi_schema = document
        return app.openapi_schema

    app.openapi = openapi


def _add_components(document: dict[str, Any], models: list[type[BaseModel]]) -> None:
    """The models' JSON schemas (and those they use) under ``components.schemas``."""
    _, definitions = models_json_schema([(m, "validation") for m in models],
                                        ref_template=_REF)
    schemas = document.setdefault("components", {}).setdefault("schemas", {})
    for name, schema in definitions.get("$defs", {}).items():
        schemas.setdefault(name, schema)


def _drop_validation_errors(document: dict[str, Any]) -> None:
    """Remove FastAPI's 422 responses and their schemas: errors here are 400s."""
    for path_item in document.get("paths", {}).values():
        for operation in path_item.values():
            operation.get("responses", {}).pop("422", None)
    schemas = document.get("components", {}).get("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)
