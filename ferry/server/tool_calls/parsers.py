"""Tool-call syntax of each model family, read from the generated text.

A parser splits a finished text into its content and its calls, ``parse(text) ->
(content, [ParsedCall])``, and tells a stream how much of a partial text is surely
content (``content_prefix_len``: up to where a call might start). A call that does not
parse as JSON is not recognised and stays in the content, as the model wrote it.

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

PARSERS = ("hermes", "llama3_json", "mistral")


@dataclass(frozen=True)
class ParsedCall:
    name: str
    arguments: str   # a JSON object, as text


def _call(obj: Any, args_keys: tuple[str, ...] = ("arguments", "parameters")) -> ParsedCall | None:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = next((obj[k] for k in args_keys if k in obj), {})
    if isinstance(args, str):   # some models write the arguments as a JSON string
        try:
            args = json.loads(args)
        except ValueError:
            return None
    if not isinstance(args, dict):
        return None
    return ParsedCall(obj["name"], json.dumps(args, ensure_ascii=False))


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

    def parse(self, text: str) -> tuple[str, list[ParsedCall]]:
        calls, kept, last = [], [], 0
        for match in self._block.finditer(text):
            try:
                call = _call(json.loads(match.group(1)))
            except ValueError:
                call = None
            if call is None:
                continue   # not recognised: stays in the content
            kept.append(text[last:match.start()])
            last = match.end()
            calls.append(call)
        kept.append(text[last:])
        return "".join(kept).strip() if calls else text, calls


class Llama3JsonParser(_MarkerParser):
    marker = "<|python_tag|>"

    def content_prefix_len(self, text: str) -> int:
        if not text.strip() or text.lstrip().startswith("{"):
            return 0   # may be a call: hold it
        return super().content_prefix_len(text)

    def parse(self, text: str) -> tuple[str, list[ParsedCall]]:
        head, _, body = text.partition(self.marker)
        if not _:
            head, body = "", text
        calls = _json_sequence(body.strip(), separator=";")
        if calls is None:
            return text, []
        return head.strip(), calls


class MistralParser(_MarkerParser):
    marker = "[TOOL_CALLS]"
    _named = re.compile(r"\s*([A-Za-z0-9_.\-]+)\s*\[ARGS\]")

    def parse(self, text: str) -> tuple[str, list[ParsedCall]]:
        head, found, body = text.partition(self.marker)
        if not found:
            return text, []
        calls = self._parse_body(body)
        if calls is None:
            return text, []
        return head.strip(), calls

    def _parse_body(self, body: str) -> list[ParsedCall] | None:
        stripped = body.strip()
        if stripped.startswith("["):
            try:
                value, _ = json.JSONDecoder().raw_decode(stripped)
            except ValueError:
                return None
            calls = [_call(item) for item in value] if isinstance(value, list) else [None]
            return None if not calls or None in calls else calls
        calls = []
        for part in body.split(self.marker):
            match = self._named.match(part)
            if match is None:
                return None
            try:
                args, _ = json.JSONDecoder().raw_decode(part[match.end():].lstrip())
            except ValueError:
                return None
            call = _call({"name": match.group(1), "arguments": args})
            if call is None:
                return None
            calls.append(call)
        return calls or None


def _json_sequence(text: str, separator: str) -> list[ParsedCall] | None:
    """``{...}; {...}`` -> calls, or None when any part is not a call."""
    decoder, calls, at = json.JSONDecoder(), [], 0
    while at < len(text):
        try:
            value, end = decoder.raw_decode(text, at)
        except ValueError:
            return None
        call = _call(value)
        if call is None:
            return None
        calls.append(call)
        at = end
        while at < len(text) and (text[at].isspace() or text[at] == separator):
            at += 1
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
