"""Streaming a chat choice when tools are in play: content while it surely is content,
then the calls as ``delta.tool_calls``, as OpenAI streams them.

Per call, a first delta with its index, id, type and name (``arguments: ""``) as soon as
the name is known, then the raw text of its arguments as the model writes it (the
family's reader, ``readers.py``, says what is surely arguments: never what may still be
the call's closing syntax). When the choice finishes, its text is parsed exactly as the
non-streamed response parses it and what the stream has not sent yet follows, so the
fragments' concatenation equals the non-streamed ``arguments``.

A call cut short (``max_tokens``) keeps what was sent of it: the non-streamed response
leaves such a text in ``content``, a stream cannot take it back (and sends no call syntax
as content).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ferry.outputs import CompletionOutput
from ferry.server.tool_calls import readers
from ferry.server.tool_calls.constraint import ToolMode
from ferry.server.tool_calls.extract import calls_of, new_call_id


@dataclass
class _SentCall:
    name: str
    arguments: str = ""   # what was sent of them


def call_reader(mode: ToolMode, parser: Any):
    """The reader of a choice's calls as they are written (None: no calls)."""
    if mode.kind == "named":
        return readers.NamedReader(mode.name)
    if mode.kind == "required":
        return readers.ArrayReader()
    if mode.kind == "auto":
        return parser.reader()
    return None


class ToolCallStream:
    """One choice's stream state; ``deltas(completion)`` -> the deltas to send now.
    ``completion.text`` is the whole text so far (the route asks for CUMULATIVE outputs)."""

    def __init__(self, mode: ToolMode, parser: Any) -> None:
        self.mode, self.parser = mode, parser
        self.reader = call_reader(mode, parser)
        self.sent = 0   # characters of the text sent as content
        self.calls: list[_SentCall] = []
        self.num_calls = 0   # calls of the finished text

    def deltas(self, completion: CompletionOutput) -> list[dict[str, Any]]:
        text = completion.text
        if not completion.finished:
            out = []
            if self.mode.kind == "auto":
                out = self._content(text, self.parser.content_prefix_len(text))
            if self.reader is not None:
                out += self._call_deltas(self.reader.calls(text))
            return out
        content, calls = calls_of(text, self.mode, self.parser)
        self.num_calls = len(calls)
        if not calls:
            # Without a call started, the rest is content; else it is the cut call's text.
            return [] if self.calls else self._content(text, len(text))
        cut = completion.finish_reason == "length" or len(self.calls) > len(calls)
        return self._content_after_calls(text, content, cut) + self._call_deltas(calls)

    def _call_deltas(self, calls: list) -> list[dict[str, Any]]:
        """Deltas for what ``calls`` (name, arguments so far) add to what was sent."""
        out = []
        for index, call in enumerate(calls):
            if index == len(self.calls):
                self.calls.append(_SentCall(call.name))
                out.append({"tool_calls": [{"index": index, "id": new_call_id(),
                                            "type": "function",
                                            "function": {"name": call.name, "arguments": ""}}]})
            sent = self.calls[index]
            if len(call.arguments) > len(sent.arguments) and \
                    call.arguments.startswith(sent.arguments):
                piece, sent.arguments = call.arguments[len(sent.arguments):], call.arguments
                out.append({"tool_calls": [{"index": index, "function": {"arguments": piece}}]})
        return out

    def _content_after_calls(self, text: str, content: str | None,
                             cut: bool) -> list[dict[str, Any]]:
        """Content the parser kept beyond what was streamed (text after the calls). When
        the text ends inside a call (``cut``: max_tokens, or a call the stream started
        that did not parse), that call's syntax is not content: the stream held it or
        already sent it as a call."""
        streamed = text[:self.sent].strip()
        if self.mode.kind != "auto" or not content or not content.startswith(streamed):
            return []
        rest = content[len(streamed):]
        at = rest.rfind(self.parser.marker) if cut else -1
        rest = rest[:at] if at >= 0 else rest
        return [{"content": rest}] if rest.strip() else []

    def _content(self, text: str, upto: int) -> list[dict[str, Any]]:
        if upto <= self.sent:
            return []
        piece, self.sent = text[self.sent:upto], upto
        return [{"content": piece}]

    def finish_reason(self, completion: CompletionOutput) -> str | None:
        if completion.finish_reason == "stop" and self.num_calls:
            return "tool_calls"
        return completion.finish_reason
