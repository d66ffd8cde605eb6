"""Streaming a chat choice when tools are in play: content while it surely is content,
then the calls as ``delta.tool_calls`` (index, id, name, argument fragments).

Calls are sent when the choice finishes (its text is then parsed exactly as the
non-streamed response parses it), so the fragments' concatenation always equals the
non-streamed ``arguments``. With ``auto``, text before where a call might start streams
as it comes.
"""
from __future__ import annotations

from typing import Any

from ferry.outputs import CompletionOutput
from ferry.server.tool_calls.constraint import ToolMode
from ferry.server.tool_calls.extract import call_deltas, calls_of, new_call_id


class ToolCallStream:
    """One choice's stream state; ``deltas(completion)`` -> the deltas to send now."""

    def __init__(self, mode: ToolMode, parser: Any) -> None:
        self.mode, self.parser = mode, parser
        self.sent = 0   # characters of the text sent as content
        self.num_calls = 0

    def deltas(self, completion: CompletionOutput) -> list[dict[str, Any]]:
        text = completion.text
        if not completion.finished:
            if self.mode.kind != "auto":
                return []   # required / named: JSON calls, sent whole at the end
            safe = self.parser.content_prefix_len(text)
            return self._content(text, safe)
        content, calls = calls_of(text, self.mode, self.parser)
        if not calls:
            return self._content(text, len(text))
        self.num_calls = len(calls)
        out = []
        if content and self.mode.kind == "auto" and content.startswith(text[:self.sent].strip()):
            # Content the parser kept beyond what was streamed (text after the calls).
            rest = content[len(text[:self.sent].strip()):]
            if rest.strip():
                out.append({"content": rest})
        return out + call_deltas(calls, [new_call_id() for _ in calls])

    def _content(self, text: str, upto: int) -> list[dict[str, Any]]:
        if upto <= self.sent:
            return []
        piece, self.sent = text[self.sent:upto], upto
        return [{"content": piece}]

    def finish_reason(self, completion: CompletionOutput) -> str | None:
        if completion.finish_reason == "stop" and self.num_calls:
            return "tool_calls"
        return completion.finish_reason
