"""Tool-call parsers on recorded outputs of each family (texts as the models write them),
and the stream splitter that must give the same calls as the whole text."""
from __future__ import annotations

import json
import re

import pytest

from ferry.engine.detokenizer import IncrementalDetokenizer
from ferry.outputs import CompletionOutput
from ferry.sampling_params import SamplingParams
from ferry.server.tool_calls.constraint import ToolMode, tool_constraint, tool_mode
from ferry.server.tool_calls.extract import calls_of
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


HOWS = ["chars", "words", "tokens"]


@pytest.fixture(scope="module")
def tokenizer():
    from tiny_models import make_tokenizer
    return make_tokenizer()


def _detokenized(text: str, tokenizer) -> list[str]:
    """The text as the engine shows it: the tokenizer's ids fed one at a time through the
    incremental detokenizer (a step may show nothing, e.g. half a character)."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer, [], SamplingParams(skip_special_tokens=False))
    pieces = []
    for token_id in ids:
        detok.update([token_id])
        pieces.append(detok.take_new_text())
    detok.finish()
    pieces[-1] += detok.take_new_text()
    assert len(ids) > 1
    return pieces


def _pieces(text: str, how: str, tokenizer=None) -> list[str]:
    """The text as a stream sees it grow: a character at a time, in word-like pieces (a
    word with the space before it, or one punctuation mark), or token by token."""
    if how == "chars":
        return list(text)
    if how == "tokens":
        return _detokenized(text, tokenizer)
    return re.findall(r"\s*\w+|\s*[^\w\s]|\s+", text)


def _stream(stream: ToolCallStream, text: str, how: str, tokenizer, finish: str = "stop"):
    """(deltas before the finish, deltas of the finished output)."""
    running, pieces = [], _pieces(text, how, tokenizer)
    assert "".join(pieces) == text
    grown = ""
    for piece in pieces[:-1]:
        grown += piece
        running += stream.deltas(CompletionOutput(0, grown, []))
    return running, stream.deltas(CompletionOutput(0, text, [], finish_reason=finish))


def _calls(deltas) -> tuple[dict[int, str], dict[int, str], dict[int, int]]:
    """(arguments, names, number of argument fragments) per call index."""
    args: dict[int, str] = {}
    names: dict[int, str] = {}
    fragments: dict[int, int] = {}
    for d in deltas:
        for call in d.get("tool_calls", []):
            index, function = call["index"], call["function"]
            if "name" in function:   # the first delta of a call: its header
                assert index not in names and call["id"].startswith("call_")
                assert call["type"] == "function" and function["arguments"] == ""
                names[index] = function["name"]
                continue
            assert index in names, "arguments before the call's name"
            args[index] = args.get(index, "") + function["arguments"]
            fragments[index] = fragments.get(index, 0) + 1
    return args, names, fragments


@pytest.mark.parametrize("how", HOWS)
@pytest.mark.parametrize("name, text, content, calls", RECORDED)
def test_streaming_gives_the_same_calls(name, text, content, calls, how, tokenizer):
    stream = ToolCallStream(ToolMode("auto"), make_parser(name))
    running, last = _stream(stream, text, how, tokenizer)
    deltas = running + last
    streamed_content = "".join(d.get("content", "") for d in deltas)
    args, names, fragments = _calls(deltas)
    expected_content, expected_calls = make_parser(name).parse(text)
    assert "tool_call" not in streamed_content and "TOOL_CALLS" not in streamed_content \
        and "python_tag" not in streamed_content
    if calls is None:   # a call cut short: what was sent of it stays, nothing as content
        assert streamed_content == "" and list(names.values()) == ["add"]
        assert '{"a": 1,'.startswith(args.get(0, ""))
        return
    assert [args.get(i, "") for i in sorted(names)] == [c.arguments for c in expected_calls]
    assert [names[i] for i in sorted(names)] == [c.name for c in expected_calls]
    if not expected_calls:
        assert streamed_content == text
        return
    assert streamed_content.strip() == (expected_content or "")
    # The arguments came as the model wrote them, not in one piece at the end.
    running_args, _, running_fragments = _calls(running)
    for index, call in enumerate(expected_calls):
        assert running_fragments[index] > 1
        assert call.arguments.startswith(running_args[index])
    assert stream.finish_reason(CompletionOutput(0, text, [], finish_reason="stop")) == "tool_calls"


# What the grammar of a required / named choice makes a model write (recorded from the
# tiny random model at temperature 1.0; whitespace as the grammar let it come).
CONSTRAINED = [
    (ToolMode("required"), '[{"name": "add", "parameters": {"a": 12, "b": 34}}, '
                           '{"name": "weather", "parameters": {"city": "Oslo"}}]'),
    (ToolMode("required"), '[ {"name":"add","parameters":{ "a":7,"b" :0 } } ]'),
    (ToolMode("named", "add"), '{"a": 1, "b": {"nested": [1, "}", "\\\\"]}}'),
]


@pytest.mark.parametrize("how", HOWS)
@pytest.mark.parametrize("mode, text", CONSTRAINED, ids=["required-2", "required-1", "named"])
def test_streaming_constrained_calls_gives_the_same_arguments(mode, text, how, tokenizer):
    stream = ToolCallStream(mode, None)
    running, last = _stream(stream, text, how, tokenizer)
    assert not [d for d in running + last if "content" in d]
    args, names, _ = _calls(running + last)
    _, expected = calls_of(text, mode, None)
    assert [args[i] for i in sorted(args)] == [c.arguments for c in expected]
    assert [names[i] for i in sorted(names)] == [c.name for c in expected]
    assert [json.loads(args[i]) for i in sorted(args)]   # raw, and still JSON
    running_args, _, running_fragments = _calls(running)
    assert all(running_fragments[i] > 1 for i in range(len(expected)))
    assert all(expected[i].arguments.startswith(running_args[i]) for i in range(len(expected)))


SECOND_CALL_CUT = [   # max_tokens ends the text inside a later call, before or after its name
    'Checking.\n<tool_call>\n{"name": "add", "arguments": {"a": 1}}\n</tool_call>\n'
    '<tool_call>\n{"name": "mul", "arguments": {"a": 3,',
    '<tool_call>\n{"name": "add", "arguments": {"a": 1}}\n</tool_call>\n<tool_call>\n{"na',
]


@pytest.mark.parametrize("how", HOWS)
@pytest.mark.parametrize("text", SECOND_CALL_CUT, ids=["after-name", "before-name"])
def test_a_later_call_cut_by_max_tokens_sends_no_call_syntax_as_content(text, how, tokenizer):
    stream = ToolCallStream(ToolMode("auto"), make_parser("hermes"))
    running, last = _stream(stream, text, how, tokenizer, finish="length")
    deltas = running + last
    streamed_content = "".join(d.get("content", "") for d in deltas)
    args, names, _ = _calls(deltas)
    assert "tool_call" not in streamed_content and "{" not in streamed_content
    assert streamed_content.strip() == ("Checking." if text.startswith("Checking") else "")
    assert names[0] == "add" and json.loads(args[0]) == {"a": 1}
    if 1 in names:   # the cut call keeps what was sent of it
        assert names[1] == "mul" and '{"a": 3,'.startswith(args.get(1, ""))
    assert stream.finish_reason(CompletionOutput(0, text, [], finish_reason="length")) \
        == "length"


def test_arguments_are_the_raw_text_the_model_wrote():
    _, calls = make_parser("hermes").parse('<tool_call>{"name": "f", "arguments": {"x":1,  '
                                           '"y": "\\u00e9"}}</tool_call>')
    assert calls[0].arguments == '{"x":1,  "y": "\\u00e9"}'
    _, calls = make_parser("hermes").parse(   # arguments as a JSON string: decoded
        '<tool_call>{"name": "f", "arguments": "{\\"x\\": 1}"}</tool_call>')
    assert json.loads(calls[0].arguments) == {"x": 1}


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
