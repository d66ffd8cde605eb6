"""Structured output over HTTP with the real ``openai`` SDK against the shared ``ferry
serve`` (tiny random Llama, temperature 1.0: only the mask makes the outputs valid)."""
from __future__ import annotations

import json
import re

import openai
import pytest

jsonschema = pytest.importorskip("jsonschema")
pytest.importorskip("xgrammar")

NAME = {"type": "string", "maxLength": 8}
SCHEMAS = [
    {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]},
    {"type": "object", "properties": {"name": NAME, "age": {"type": "integer", "minimum": 0,
                                                            "maximum": 120}},
     "required": ["name", "age"], "additionalProperties": False},
    {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]}},
     "required": ["color"]},
    {"type": "object", "properties": {"tags": {"type": "array", "items": NAME, "minItems": 1,
                                               "maxItems": 3}}, "required": ["tags"]},
    {"type": "object", "properties": {"point": {
        "type": "object", "properties": {"x": {"type": "integer", "minimum": -5, "maximum": 5},
                                         "y": {"type": "integer", "minimum": -5, "maximum": 5}},
        "required": ["x", "y"], "additionalProperties": False}}, "required": ["point"]},
    {"type": "object", "properties": {"ok": {"type": "boolean"}, "why": {"type": "null"}},
     "required": ["ok", "why"]},
    {"type": "object", "properties": {"value": {"anyOf": [{"type": "integer", "minimum": 0,
                                                           "maximum": 9},
                                                          {"type": "boolean"}]}},
     "required": ["value"]},
    {"type": "array", "items": {"type": "integer", "minimum": 1, "maximum": 3},
     "minItems": 2, "maxItems": 4},
    {"type": "object", "properties": {"kind": {"const": "user"}, "id": {"type": "integer",
                                                                        "minimum": 1,
                                                                        "maximum": 999}},
     "required": ["kind", "id"]},
    {"type": "object", "properties": {"items": {"type": "array", "maxItems": 2, "items": {
        "type": "object", "properties": {"sku": NAME, "qty": {"type": "integer", "minimum": 1,
                                                              "maximum": 9}},
        "required": ["sku", "qty"], "additionalProperties": False}}}, "required": ["items"]},
    {"type": "string", "maxLength": 5},
    {"type": "integer", "minimum": 10, "maximum": 20},
    {"enum": ["alpha", "beta", 3, None]},
    {"type": "object", "properties": {"code": {"type": "string", "pattern": "^[A-Z]{3}[0-9]{2}$"}},
     "required": ["code"]},
    {"type": "object", "properties": {"level": {"type": "integer", "exclusiveMinimum": 0,
                                                "exclusiveMaximum": 4}},
     "required": ["level"], "additionalProperties": False},
    {"type": "object", "$defs": {"leaf": {"type": "object", "properties": {"v": {"enum": [1, 2]}},
                                          "required": ["v"], "additionalProperties": False}},
     "properties": {"left": {"$ref": "#/$defs/leaf"}, "right": {"$ref": "#/$defs/leaf"}},
     "required": ["left", "right"], "additionalProperties": False},
    {"type": "object", "properties": {"when": {"type": "string", "format": "date"}},
     "required": ["when"]},
    {"type": "object", "properties": {"matrix": {"type": "array", "maxItems": 2, "items": {
        "type": "array", "maxItems": 2, "items": {"type": "integer", "minimum": 0,
                                                  "maximum": 9}}}},
     "required": ["matrix"]},
    {"type": "object", "properties": {"status": {"oneOf": [{"const": "done"},
                                                           {"const": "todo"}]},
                                      "note": NAME}, "required": ["status"]},
    {"type": "object", "properties": {"user": {"type": "object", "properties": {
        "name": NAME, "roles": {"type": "array", "items": {"enum": ["admin", "dev"]},
                                "maxItems": 2}}, "required": ["name", "roles"],
        "additionalProperties": False}, "active": {"type": "boolean"}},
     "required": ["user", "active"], "additionalProperties": False},
]
MESSAGES = [{"role": "user", "content": "Answer in JSON."}]


def _chat(client, **kwargs):
    kwargs.setdefault("temperature", 1.0)
    kwargs.setdefault("max_tokens", 300)
    return client.chat.completions.create(model="tiny", messages=MESSAGES, **kwargs)


def test_twenty_schemas_validate(client):
    assert len(SCHEMAS) == 20
    for index, schema in enumerate(SCHEMAS):
        response = _chat(client, seed=index, response_format={
            "type": "json_schema", "json_schema": {"name": f"s{index}", "schema": schema,
                                                   "strict": True}})
        choice = response.choices[0]
        assert choice.finish_reason == "stop", (index, choice.message.content)
        jsonschema.validate(json.loads(choice.message.content), schema)


def test_json_object_and_text(client):
    # A random model at temperature 1.0 may stay inside a JSON string past max_tokens (the
    # grammar allows any length): every output the grammar ended must be an object, and
    # some of a few seeds must end.
    choices = [_chat(client, seed=seed, response_format={"type": "json_object"}).choices[0]
               for seed in range(4)]
    ended = [c for c in choices if c.finish_reason == "stop"]
    assert ended, [c.message.content[:40] for c in choices]
    for choice in ended:
        assert isinstance(json.loads(choice.message.content), dict)
    assert _chat(client, seed=3, max_tokens=5, response_format={"type": "text"}).choices[0]


def test_regex_and_choice_on_both_routes(client):
    regex = r"[a-z]{2}\d{3}"
    chat = _chat(client, seed=1, extra_body={"structured_outputs": {"regex": regex}})
    assert re.fullmatch(regex, chat.choices[0].message.content)
    completion = client.completions.create(
        model="tiny", prompt="Pick one:", temperature=1.0, max_tokens=20, seed=2,
        extra_body={"structured_outputs": {"choice": ["cat", "dog", "bird"]}})
    assert completion.choices[0].text in ("cat", "dog", "bird")


def test_ebnf_grammar(client):
    grammar = 'root ::= "(" num ("+" num)* ")"\nnum ::= [1-9]'
    text = _chat(client, seed=4, max_tokens=40,
                 extra_body={"structured_outputs": {"grammar": grammar}}).choices[0]
    assert text.finish_reason == "length" or re.fullmatch(r"\([1-9](\+[1-9])*\)",
                                                          text.message.content)


def test_length_ends_with_the_partial_text(client):
    choice = _chat(client, seed=0, max_tokens=4, response_format={
        "type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMAS[1]}}).choices[0]
    assert choice.finish_reason == "length" and choice.message.content.startswith('{"')


@pytest.mark.parametrize("extra, words", [
    ({"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "integer", "minimum": 5, "maximum": 1}}}},
     "minimum|maximum|range"),
    ({"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "object", "properties": {"a": {"not": {}}}}}}},
     "not"),
    ({"structured_outputs": {"regex": "(?<=a)b"}}, "regex"),
    ({"structured_outputs": {"choice": []}}, "choice"),
    ({"structured_outputs": {"json": {}, "regex": "a"}}, "exactly one"),
    ({"structured_outputs": {"grammar": "root ::= "}}, "grammar"),
    ({"structured_outputs": {"regex": "a"}, "response_format": {"type": "json_object"}},
     "one constraint"),
], ids=["empty-range", "unsupported-keyword", "bad-regex", "empty-choice", "two-kinds",
        "empty-grammar", "two-constraints"])
def test_constraints_that_cannot_be_honoured_are_400(client, extra, words):
    with pytest.raises(openai.BadRequestError) as info:
        _chat(client, extra_body=extra)
    assert re.search(words, str(info.value), re.IGNORECASE), str(info.value)


def test_mixed_batch_leaves_free_requests_unchanged(client):
    """n free requests with seeds, alone and then concurrently beside constrained ones."""
    import concurrent.futures as cf

    def free(seed):
        return client.completions.create(model="tiny", prompt="Once upon a time",
                                         temperature=1.0, max_tokens=16, seed=seed).choices[0].text

    def constrained(seed):
        return _chat(client, seed=seed, response_format={
            "type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMAS[9]}})

    alone = [free(s) for s in range(3)]
    with cf.ThreadPoolExecutor(6) as pool:
        jobs = [pool.submit(constrained, 50 + s) for s in range(3)]
        mixed = [pool.submit(free, s) for s in range(3)]
        for job in jobs:
            jsonschema.validate(json.loads(job.result().choices[0].message.content), SCHEMAS[9])
        assert [m.result() for m in mixed] == alone


def test_sdk_parse_with_a_pydantic_model(client):
    from pydantic import BaseModel, Field

    class Pet(BaseModel):
        name: str = Field(max_length=8)
        legs: int = Field(ge=0, le=8)
        kind: str = Field(pattern="^(cat|dog)$")

    completion = client.beta.chat.completions.parse(
        model="tiny", messages=MESSAGES, response_format=Pet, temperature=1.0, max_tokens=200,
        seed=5)
    pet = completion.choices[0].message.parsed
    assert isinstance(pet, Pet) and 0 <= pet.legs <= 8 and pet.kind in ("cat", "dog")
