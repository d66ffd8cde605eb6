"""Tool-call syntax of each model family, read from the generated text.

A parser splits a finished text into its content and its calls, ``parse(text) ->
(content, [ParsedCall])``, and tells a stream how much of a partial text is surely
content (``content_prefix_len``: up to where a call might start). A call that does not
parse as JSON is not recognised and stays in the content, as the model wrote it. A
call's ``arguments`` are the raw text of its arguments object as the model wrote it (the
scanners of ``partial.py`` find it), so a stream that sends that text as it comes
(``reader()``, see ``readers.py``) sends exactly these arguments.

- ``hermes`` (Hermes, Qwen 2/2.5/3): ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``,
  one block per call, content around them.
- ``llama3_json`` (Llama 3.1+): the text is one JSON object ``{"name": ..., "parameters":
  {...}}`` (or several separated by ``;``), optionally after ``<|python_tag|>``.
- ``mistral``: ``[TOOL_CALLS]`` then a JSON array of ``{"name", "arguments"}`` (v3), or
  ``[TOOL_CALLS]name[ARGS]{...}`` per call (v11+).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from ferry.server.tool_calls import readers
from ferry.server.tool_calls.partial import ARGUMENT_KEYS, CallScanner, ValueSpan, skip

PARSERS = ("hermes", "llama3_json", "mistral")


@dataclass(frozen=True)
class ParsedCall:
    name: str
    arguments: str   # a JSON object, as text


def call_at(text: str, start: int) -> tuple[ParsedCall | None, int | None]:
    """The call object at ``text[start]`` and the index just after it (None, None when it
    is not closed); the call is None when the object is not a call."""
    scanner = CallScanner(start)
    scanner.feed(text)
    if scanner.end is None:
        return None, None
    return _call(scanner, text, start), scanner.end


def _call(scanner: CallScanner, text: str, start: int) -> ParsedCall | None:
    try:
        obj = json.loads(text[start:scanner.end])
    except ValueError:
        return None
    if not isinstance(obj, dict) or scanner.name is None:
        return None
    if scanner.arguments is not None:   # the raw object, as a stream sends it
        return ParsedCall(scanner.name, scanner.arguments_so_far(text))
    if scanner.arguments_is_string:     # some models write the arguments as a JSON string
        try:
            args = json.loads(next(obj[k] for k in ARGUMENT_KEYS
                                   if isinstance(obj.get(k), str)))
        except ValueError:
            return None
        return ParsedCall(scanner.name, json.dumps(args, ensure_ascii=False)) \
            if isinstance(args, dict) else None
    if any(k in obj for k in ARGUMENT_KEYS):
        return None   # arguments that are not an object
    return ParsedCall(scanner.name, "{}")


def object_at(text: str, start: int) -> tuple[str | None, int | None]:
    """The raw JSON object at ``text[start]`` and the index after it (None: not one)."""
    if start >= len(text) or text[start] != "{":
        return None, None
    span = ValueSpan(start)
    span.feed(text)
    if span.end is None:
        return None, None
    raw = text[start:span.end]
    try:
        return (raw, span.end) if isinstance(json.loads(raw), dict) else (None, None)
    except ValueError:
        return None, None


def array_calls(text: str, start: int) -> tuple[list[ParsedCall] | None, int | None]:
    """``[{call}, ...]`` at ``text[start]``: its calls (None if any is not one) and its end."""
    if start >= len(text) or text[start] != "[":
        return None, None
    calls, at = [], skip(text, start + 1)
    while at < len(text) and text[at] == "{":
        call, end = call_at(text, at)
        if call is None:
            return None, None
        calls.append(call)
        at = skip(text, end, ",")
    if at >= len(text) or text[at] != "]" or not calls:
        return None, None
    return calls, at + 1


def _held_suffix(text: str, marker: str) -> int:
    """Length of the longest end of ``text`` that is a start of ``marker``."""
    for size in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-size:]):
            return size
    return 0


class _MarkerParser:
    """Calls start at ``marker``; content before it streams."""

    marker = ""

    def content_prefix_len(self, text: str) -> int:
        at = text.find(self.marker)
        return at if at >= 0 else len(text) - _held_suffix(text, self.marker)


class HermesParser(_MarkerParser):
    marker = "<tool_call>"
    _block = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)

    def reader(self) -> readers.HermesReader:
        return readers.HermesReader()

    def parse(self, text: str) -> tuple[str, list[ParsedCall]]:
        calls, kept, last = [], [], 0
        for match in self._block.finditer(text):
            call, end = call_at(text, match.start(1))
            if call is None or end != match.end(1):
                continue   # not recognised: stays in the content
            kept.append(text[last:match.start()])
            last = match.end()
            calls.append(call)
        kept.append(text[last:])
        return "".join(kept).strip() if calls else text, calls


class Llama3JsonParser(_MarkerParser):
    marker = "<|python_tag|>"

    def reader(self) -> readers.Llama3Reader:
        return readers.Llama3Reader()

    def content_prefix_len(self, text: str) -> int:
        if not text.strip() or text.lstrip().startswith("{"):
            return 0   # may be a call: hold it
        return super().content_prefix_len(text)

    def parse(self, text: str) -> tuple[str, list[ParsedCall]]:
        at = text.find(self.marker)
        start = at + len(self.marker) if at >= 0 else 0
        calls = _call_sequence(text, start, separator=";")
        if calls is None:
            return text, []
        return text[:max(at, 0)].strip(), calls


class MistralParser(_MarkerParser):
    marker = "[TOOL_CALLS]"
    _named = re.compile(r"\s*([A-Za-z0-9_.\-]+)\s*\[ARGS\]\s*")

    def reader(self) -> readers.MistralReader:
        return readers.MistralReader()

    def parse(self, text: str) -> tuple[str, list[ParsedCall]]:
        at = text.find(self.marker)
        if at < 0:
            return text, []
        calls = self._parse_body(text, at)
        if calls is None:
            return text, []
        return text[:at].strip(), calls

    def _parse_body(self, text: str, at: int) -> list[ParsedCall] | None:
        start = skip(text, at + len(self.marker))
        if text.startswith("[", start):   # v3: one JSON array
            return array_calls(text, start)[0]
        calls = []   # v11: name[ARGS]{...} after each marker
        while at >= 0:
            match = self._named.match(text, at + len(self.marker))
            if match is None:
                return None
            args, end = object_at(text, match.end())
            if args is None:
                return None
            calls.append(ParsedCall(match.group(1), args))
            at = text.find(self.marker, end)
        return calls


def _call_sequence(text: str, start: int, separator: str) -> list[ParsedCall] | None:
    """``{...}; {...}`` from ``start`` to the end -> calls, or None when any part is not a
    call (or something else follows)."""
    calls, at = [], skip(text, start)
    while at < len(text):
        call, end = call_at(text, at) if text[at] == "{" else (None, None)
        if call is None:
            return None
        calls.append(call)
        at = skip(text, end, separator)
    return calls or None


def make_parser(name: str, chat_template: str | None = None):
    """The parser ``name`` (``auto``: from the chat template's tool-call syntax)."""
    if name == "auto":
        name = detect_family(chat_template or "")
    if name == "hermes":
        return HermesParser()
    if name == "llama3_json":
        return Llama3JsonParser()
    if name == "mistral":
        return MistralParser()
    raise ValueError(f"tool_call_parser must be auto or one of {PARSERS}, got {name!r}")


def detect_family(chat_template: str) -> str:
    """The family whose syntax the chat template shows; Hermes when it shows none."""
    if "[TOOL_CALLS]" in chat_template:
        return "mistral"
    if "<|python_tag|>" in chat_template or "ipython" in chat_template:
        return "llama3_json"
    return "hermes"
