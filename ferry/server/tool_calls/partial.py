"""Reading a tool call's JSON while it is still being written.

A stream must send a call's ``arguments`` as the model writes them, and every fragment it
sends must stay a prefix of the final ``arguments``. The scanners here read JSON text one
character at a time and say where a value's raw text starts and ends; they keep their
place, so each step reads only the new characters. The finished response takes its
``arguments`` from the same scanners (the raw text of the arguments object as the model
wrote it), which is what makes the streamed fragments' concatenation equal it.

They check structure only (strings, escapes, nesting); ``json.loads`` of the finished text
is what decides whether a call is recognised.
"""
from __future__ import annotations

import json

ARGUMENT_KEYS = ("arguments", "parameters")


class ValueSpan:
    """The raw extent of one JSON object or array starting at ``start`` (its ``{`` / ``[``)."""

    def __init__(self, start: int) -> None:
        self.start = start
        self.pos = start          # next character to read
        self.end: int | None = None   # just after the closing bracket, once read
        self._depth = 0
        self._in_string = False
        self._escape = False

    def feed(self, text: str) -> None:
        while self.end is None and self.pos < len(text):
            self._read(text[self.pos])
            self.pos += 1
            if self._depth == 0:
                self.end = self.pos

    def _read(self, char: str) -> None:
        if self._in_string:
            if self._escape:
                self._escape = False
            elif char == "\\":
                self._escape = True
            elif char == '"':
                self._in_string = False
        elif char == '"':
            self._in_string = True
        elif char in "{[":
            self._depth += 1
        elif char in "}]":
            self._depth -= 1

    def text_so_far(self, text: str) -> str:
        return text[self.start:self.end if self.end is not None else self.pos]


class CallScanner:
    """One ``{"name": ..., "arguments": {...}}`` object starting at ``start`` (its ``{``).

    ``name`` is set once the name string is complete; ``arguments`` is the span of the
    first arguments / parameters value that is an object (``arguments_is_string`` when the
    model wrote them as a JSON string instead, which cannot stream); ``end`` is set once
    the call object closes; ``failed`` when the text is not such an object.
    """

    def __init__(self, start: int) -> None:
        self.pos = start
        self.end: int | None = None
        self.failed = False
        self.name: str | None = None
        self.arguments: ValueSpan | None = None
        self.arguments_is_string = False
        self._opened = False
        self._expect = "key"      # key | colon | value | comma | literal
        self._key: str | None = None
        self._string: list[str] | None = None   # a top-level string being read
        self._escape = False
        self._nested: ValueSpan | None = None   # a nested value being read

    @property
    def done(self) -> bool:
        return self.end is not None or self.failed

    def feed(self, text: str) -> None:
        while not self.done and self.pos < len(text):
            if self._nested is not None:
                self._nested.feed(text)
                self.pos = self._nested.pos
                if self._nested.end is None:
                    return
                self._nested, self._expect = None, "comma"
                continue
            self._read(text, text[self.pos])
            self.pos += 1

    def _read(self, text: str, char: str) -> None:
        if self._string is not None:
            self._read_string(char)
        elif char.isspace():
            return
        elif not self._opened:
            self._opened = char == "{"
            self.failed = not self._opened
        elif self._expect == "key":
            if char == '"':
                self._start_string()
            else:
                self._close_or_fail(char)
        elif self._expect == "colon":
            self._expect, self.failed = "value", char != ":"
        elif self._expect == "value":
            self._start_value(char)
        elif char == ",":
            self._expect = "key"
        elif char == "}":
            self.end = self.pos + 1
        elif self._expect != "literal":
            self.failed = True

    def _start_value(self, char: str) -> None:
        wants_arguments = self._key in ARGUMENT_KEYS and not self._has_arguments()
        if char == '"':
            self.arguments_is_string = self.arguments_is_string or wants_arguments
            self._start_string()
        elif char in "{[":
            self._nested = ValueSpan(self.pos)
            if char == "{" and wants_arguments:
                self.arguments = self._nested
        else:
            self._expect = "literal"

    def _has_arguments(self) -> bool:
        return self.arguments is not None or self.arguments_is_string

    def _start_string(self) -> None:
        self._string, self._escape = [], False

    def _read_string(self, char: str) -> None:
        if self._escape:
            self._escape = False
        elif char == "\\":
            self._escape = True
        elif char == '"':
            try:
                self._end_string(json.loads('"' + "".join(self._string) + '"'))
            except ValueError:   # a bad escape: not JSON
                self.failed = True
            return
        self._string.append(char)

    def _end_string(self, value: str) -> None:
        self._string = None
        if self._expect == "key":
            self._key, self._expect = value, "colon"
            return
        if self._key == "name" and self.name is None:
            self.name = value
        self._expect = "comma"

    def _close_or_fail(self, char: str) -> None:
        if char == "}":
            self.end = self.pos + 1
        else:
            self.failed = True

    def arguments_so_far(self, text: str) -> str | None:
        """The arguments' raw text read so far (a prefix of the final one), if any."""
        return self.arguments.text_so_far(text) if self.arguments is not None else None


def skip(text: str, at: int, chars: str = "") -> int:
    """The first index from ``at`` that is neither whitespace nor one of ``chars``."""
    while at < len(text) and (text[at].isspace() or text[at] in chars):
        at += 1
    return at


def find_marker(text: str, marker: str, at: int) -> tuple[int, int]:
    """(index of ``marker`` in ``text`` from ``at`` or -1, where the next search may start):
    a text that only grows is searched once, not from the start every step."""
    found = text.find(marker, at)
    if found >= 0:
        return found, found
    return -1, max(at, len(text) - len(marker) + 1)
