"""A finished generation as an OpenAI assistant message: ``content`` and ``tool_calls``.

Streams send the same calls: ``call_deltas`` cuts each call's ``arguments`` into
fragments whose concatenation is exactly the non-streamed ``arguments``.
"""
from __future__ import annotations

import json
import uuid
from typing import Any

from ferry.server.tool_calls.constraint import ToolMode
from ferry.server.tool_calls.parsers import ParsedCall

FRAGMENT_CHARS = 16


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def calls_of(text: str, mode: ToolMode, parser: Any) -> tuple[str | None, list[ParsedCall]]:
    """(content, calls) of a finished text. Required / named outputs are JSON by their
    grammar; an ``auto`` output goes through the family's parser."""
    if mode.kind == "named":
        try:
            args = json.loads(text)
        except ValueError:
            return text, []
        return None, [ParsedCall(mode.name, json.dumps(args, ensure_ascii=False))]
    if mode.kind == "required":
        try:
            calls = [ParsedCall(item["name"], json.dumps(item["parameters"], ensure_ascii=False))
                     for item in json.loads(text)]
        except (ValueError, TypeError, KeyError):
            return text, []   # cut short by max_tokens: the partial text
        return None, calls
    if mode.kind == "auto":
        content, calls = parser.parse(text)
        return (content or None) if calls else text, calls
    return text, []


def tool_call_dicts(calls: list[ParsedCall], ids: list[str]) -> list[dict[str, Any]]:
    return [{"id": call_id, "type": "function",
             "function": {"name": call.name, "arguments": call.arguments}}
            for call, call_id in zip(calls, ids)]


def call_deltas(calls: list[ParsedCall], ids: list[str]) -> list[dict[str, Any]]:
    """Stream deltas: per call one with its index, id, type and name (arguments ""), then
    argument fragments with the index only (as OpenAI streams them)."""
    deltas: list[dict[str, Any]] = []
    for index, (call, call_id) in enumerate(zip(calls, ids)):
        deltas.append({"tool_calls": [{"index": index, "id": call_id, "type": "function",
                                       "function": {"name": call.name, "arguments": ""}}]})
        args = call.arguments
        for start in range(0, len(args), FRAGMENT_CHARS):
            deltas.append({"tool_calls": [{"index": index, "function": {
                "arguments": args[start:start + FRAGMENT_CHARS]}}]})
    return deltas
