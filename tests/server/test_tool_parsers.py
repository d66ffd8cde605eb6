"""Tool-call parsers on recorded outputs of each family (texts as the models write them),
and the stream splitter that must give the same calls as the whole text."""
from __future__ import annotations

import json

import pytest

from ferry.outputs import CompletionOutput
from ferry.server.tool_calls.constraint import ToolMode, tool_constraint, tool_mode
from ferry.server.tool_calls.parsers import detect_family, make_parser
from ferry.server.tool_calls.stream import ToolCallStream

# (parser, recorded text, expected content, expected [(name, arguments dict)])
RECORDED = [
    ("hermes",   # Qwen2.5-7B-Instruct
     '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}'
     '\n</tool_call>', None, [("get_weather", {"city": "Paris", "unit": "celsius"})]),
    ("hermes",   # two parallel calls with text before them (Hermes-2-Pro)
     'Let me check both.\n<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n'
     '</tool_call>\n<tool_call>\n{"name": "mul", "arguments": {"a": 3, "b": 4}}\n</tool_call>',
     "Let me check both.", [("add", {"a": 1, "b": 2}), ("mul", {"a": 3, "b": 4})]),
    ("hermes",   # the stop token cut the closing tag (Qwen3 at EOS)
     '<tool_call>\n{"name": "search", "arguments": {"q": "ferry \\"llm\\""}}',
     None, [("search", {"q": 'ferry "llm"'})]),
    ("hermes", "The answer is 4.", "The answer is 4.", []),
    ("hermes", '<tool_call>\n{"name": "add", "arguments": {"a": 1,', None, None),   # broken
    ("llama3_json",   # Llama-3.1-8B-Instruct
     '{"name": "get_weather", "parameters": {"city": "San Francisco, CA"}}', None,
     [("get_weather", {"city": "San Francisco, CA"})]),
    ("llama3_json",
     '<|python_tag|>{"name": "add", "parameters": {"a": 1}}; {"name": "add", "parameters": '
     '{"a": 2}}', None, [("add", {"a": 1}), ("add", {"a": 2})]),
    ("llama3_json", "Hello! How can I help?", "Hello! How can I help?", []),
    ("mistral",   # Mistral-7B-Instruct-v0.3
     '[TOOL_CALLS] [{"name": "get_current_weather", "arguments": {"location": "Paris, FR", '
     '"format": "celsius"}}]', None,
     [("get_current_weather", {"location": "Paris, FR", "format": "celsius"})]),
    ("mistral",   # Mistral-Small-3.2 (v11 tokenizer)
     '[TOOL_CALLS]get_weather[ARGS]{"city": "Rome"}[TOOL_CALLS]get_time[ARGS]{"tz": "CET"}',
     None, [("get_weather", {"city": "Rome"}), ("get_time", {"tz": "CET"})]),
    ("mistral", "No tools needed.", "No tools needed.", []),
]


@pytest.mark.parametrize("name, text, content, calls", RECORDED)
def test_recorded_outputs(name, text, content, calls):
    got_content, got_calls = make_parser(name).parse(text)
    if calls is None:   # a call that does not parse stays in the content, untouched
        assert got_calls == [] and got_content == text
        return
    assert [(c.name, json.loads(c.arguments)) for c in got_calls] == calls
    assert (got_content or None) == content


@pytest.mark.parametrize("name, text, content, calls", RECORDED)
def test_streaming_gives_the_same_calls(name, text, content, calls):
    stream = ToolCallStream(ToolMode("auto"), make_parser(name))
    deltas = []
    for end in range(1, len(text)):   # one character at a time
        deltas += stream.deltas(CompletionOutput(0, text[:end], []))
    deltas += stream.deltas(CompletionOutput(0, text, [], finish_reason="stop"))
    streamed_content = "".join(d.get("content", "") for d in deltas)
    args: dict[int, str] = {}
    names: dict[int, str] = {}
    for d in deltas:
        for call in d.get("tool_calls", []):
            args[call["index"]] = args.get(call["index"], "") + call["function"]["arguments"]
            if call["function"].get("name"):
                names[call["index"]] = call["function"]["name"]
    expected_content, expected_calls = make_parser(name).parse(text)
    assert [args[i] for i in sorted(args)] == [c.arguments for c in expected_calls]
    assert [names[i] for i in sorted(names)] == [c.name for c in expected_calls]
    if not expected_calls:
        assert streamed_content == text
    else:   # never a recognised call in the content
        assert "tool_call" not in streamed_content and "TOOL_CALLS" not in streamed_content
    if expected_calls:
        assert stream.finish_reason(CompletionOutput(0, text, [], finish_reason="stop")) == "tool_calls"


def test_family_from_the_chat_template():
    assert detect_family("{% if tools %}<tool_call>{{ tool | tojson }}</tool_call>") == "hermes"
    assert detect_family("{{- '<|python_tag|>' }}") == "llama3_json"
    assert detect_family("[AVAILABLE_TOOLS] ... [TOOL_CALLS]") == "mistral"


TOOLS = [{"type": "function", "function": {"name": "add", "parameters": {
    "type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}}},
         {"type": "function", "function": {"name": "now"}}]


def test_tool_choice_modes_and_their_constraints():
    assert tool_mode(None, None).kind == "none"
    assert tool_mode(TOOLS, None).kind == "auto"
    assert tool_mode(TOOLS, {"type": "function", "function": {"name": "add"}}).name == "add"
    for bad in ["always", {"type": "function", "function": {"name": "sub"}}]:
        with pytest.raises(ValueError):
            tool_mode(TOOLS, bad)
    with pytest.raises(ValueError, match="needs a non-empty"):
        tool_mode([], "required")
    with pytest.raises(ValueError, match="twice"):
        tool_mode(TOOLS + TOOLS[:1], "auto")
    named = tool_constraint(TOOLS, ToolMode("named", "add"), None)
    assert named.json == TOOLS[0]["function"]["parameters"]
    required = tool_constraint(TOOLS, ToolMode("required"), False).json
    assert required["maxItems"] == 1 and len(required["items"]["anyOf"]) == 2
