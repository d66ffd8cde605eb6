"""A finished generation as an OpenAI assistant message: ``content`` and ``tool_calls``.

A call's ``arguments`` are the raw text of its arguments object as the model wrote it
(validated as JSON), the text a stream sends as it comes (``stream.py``).
"""
from __future__ import annotations

import json
import uuid
from typing import Any

from ferry.server.tool_calls.constraint import ToolMode
from ferry.server.tool_calls.parsers import ParsedCall, array_calls, object_at
from ferry.server.tool_calls.partial import skip


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def calls_of(text: str, mode: ToolMode, parser: Any) -> tuple[str | None, list[ParsedCall]]:
    """(content, calls) of a finished text. Required / named outputs are JSON by their
    grammar; an ``auto`` output goes through the family's parser."""
    if mode.kind == "named":
        try:
            json.loads(text)
        except ValueError:
            return text, []   # cut short by max_tokens: the partial text
        args, _ = object_at(text, skip(text, 0))
        return (None, [ParsedCall(mode.name, args)]) if args is not None else (text, [])
    if mode.kind == "required":
        try:
            json.loads(text)
        except ValueError:
            return text, []
        calls, _ = array_calls(text, skip(text, 0))
        return (None, calls) if calls else (text, [])
    if mode.kind == "auto":
        content, calls = parser.parse(text)
        return (content or None) if calls else text, calls
    return text, []


def tool_call_dicts(calls: list[ParsedCall], ids: list[str]) -> list[dict[str, Any]]:
    return [{"id": call_id, "type": "function",
             "function": {"name": call.name, "arguments": call.arguments}}
            for call, call_id in zip(calls, ids)]
