"""Tool calling over HTTP with the real ``openai`` SDK against the shared ``ferry serve``
(tiny random model at temperature 1.0: required / named calls are valid only because the
grammar built from the tools' schemas makes them so)."""
from __future__ import annotations

import json

import openai
import pytest

jsonschema = pytest.importorskip("jsonschema")

ADD = {"type": "object", "additionalProperties": False, "required": ["a", "b"],
       "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99},
                      "b": {"type": "integer", "minimum": 0, "maximum": 99}}}
CITY = {"type": "object", "additionalProperties": False, "required": ["city"],
        "properties": {"city": {"enum": ["Paris", "Rome", "Oslo"]}}}
TOOLS = [{"type": "function", "function": {"name": "add", "description": "Add two numbers",
                                           "parameters": ADD}},
         {"type": "function", "function": {"name": "weather", "parameters": CITY}}]
SCHEMAS = {"add": ADD, "weather": CITY}
MESSAGES = [{"role": "user", "content": "What is 12+34?"}]
NAMED_ADD = {"type": "function", "function": {"name": "add"}}


def _chat(client, **kwargs):
    kwargs.setdefault("temperature", 1.0)
    kwargs.setdefault("max_tokens", 200)
    return client.chat.completions.create(model="tiny", messages=MESSAGES, tools=TOOLS, **kwargs)


def _check_calls(calls, names=None):
    assert calls
    for call in calls:
        assert call.type == "function" and call.id.startswith("call_")
        assert names is None or call.function.name in names
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


@pytest.mark.parametrize("seed", range(3))
def test_required_gives_valid_calls(client, seed):
    choice = _chat(client, seed=seed, tool_choice="required").choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    _check_calls(choice.message.tool_calls)


def test_required_without_parallel_calls_gives_one(client):
    choice = _chat(client, seed=4, tool_choice="required", parallel_tool_calls=False).choices[0]
    assert len(choice.message.tool_calls) == 1
    _check_calls(choice.message.tool_calls)


@pytest.mark.parametrize("seed", range(3))
def test_named_gives_that_function(client, seed):
    choice = _chat(client, seed=seed, tool_choice=NAMED_ADD).choices[0]
    assert choice.finish_reason == "tool_calls"
    assert [c.function.name for c in choice.message.tool_calls] == ["add"]
    _check_calls(choice.message.tool_calls)


def test_auto_with_a_model_that_writes_no_call_is_content(client):
    choice = _chat(client, seed=1, tool_choice="auto", max_tokens=12).choices[0]
    assert choice.message.tool_calls is None and choice.finish_reason in ("stop", "length")
    assert isinstance(choice.message.content, str)


def test_none_is_plain_text(client):
    choice = _chat(client, seed=1, tool_choice="none", max_tokens=6,
                   extra_body={"ignore_eos": True}).choices[0]
    assert choice.message.tool_calls is None and choice.finish_reason == "length"


@pytest.mark.parametrize("tool_choice", ["required", NAMED_ADD], ids=["required", "named"])
def test_streamed_fragments_concatenate_to_the_non_streamed_arguments(client, tool_choice):
    whole = _chat(client, seed=9, tool_choice=tool_choice).choices[0].message.tool_calls
    stream = _chat(client, seed=9, tool_choice=tool_choice, stream=True,
                   stream_options={"include_usage": True, "continuous_usage_stats": True})
    args: dict[int, str] = {}
    names: dict[int, str] = {}
    fragments: dict[int, set[int]] = {}   # per call: the output lengths its fragments came at
    finish = None
    for chunk in stream:
        for choice in chunk.choices:
            finish = choice.finish_reason or finish
            for call in choice.delta.tool_calls or []:
                if call.function.name:   # the call's first delta: its name, no arguments
                    assert call.id.startswith("call_") and call.function.arguments == ""
                    names[call.index] = call.function.name
                elif call.function.arguments:
                    args[call.index] = args.get(call.index, "") + call.function.arguments
                    fragments.setdefault(call.index, set()).add(chunk.usage.completion_tokens)
    assert finish == "tool_calls"
    # The arguments came as the model wrote them, over several steps, not at the end.
    assert all(len(fragments[i]) > 1 for i in names)
    assert [args[i] for i in sorted(args)] == [c.function.arguments for c in whole]
    assert [names[i] for i in sorted(names)] == [c.function.name for c in whole]
    for index, name in names.items():   # the concatenation parses and fits the tool
        jsonschema.validate(json.loads(args[index]), SCHEMAS[name])


def test_a_tool_conversation_is_accepted(client):
    messages = MESSAGES + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "add", "arguments": "{\"a\": 12, \"b\": 34}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "46"}]
    response = client.chat.completions.create(model="tiny", messages=messages, tools=TOOLS,
                                              max_tokens=4, temperature=0.0)
    assert response.choices[0].message.role == "assistant"


@pytest.mark.parametrize("kwargs, words", [
    (dict(tool_choice={"type": "function", "function": {"name": "sub"}}), "not in 'tools'"),
    (dict(tools=[{"type": "function", "function": {"name": ""}}], tool_choice="auto"), "name"),
    (dict(tool_choice="required", response_format={"type": "json_object"}), "one constraint"),
], ids=["unknown-name", "empty-name", "two-constraints"])
def test_bad_tool_requests_are_400(client, kwargs, words):
    kwargs = {"tools": TOOLS, **kwargs}
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=4, **kwargs)
    assert words in str(info.value)
