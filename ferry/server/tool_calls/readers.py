"""The calls of a growing text, as far as they are surely known: one reader per syntax.

``reader.calls(text)`` takes the whole text so far (each call a longer one: the text only
grows) and returns, per call whose name is known, its name and the raw text of its
arguments read so far. Nothing a reader returns changes later: the name is final and the
arguments only grow, up to the closing ``}`` of the arguments object and never past it
(what follows may be the call's closing syntax). Readers keep their place, so a step
reads only the new characters.

- ``HermesReader``: ``<tool_call>{"name", "arguments"}</tool_call>`` blocks.
- ``Llama3Reader``: ``{"name", "parameters"}`` objects separated by ``;``, the whole text
  or after ``<|python_tag|>``.
- ``MistralReader``: ``[TOOL_CALLS][{...}, ...]`` (v3) or ``[TOOL_CALLS]name[ARGS]{...}``.
- ``ArrayReader``: a JSON array of call objects (``tool_choice: required``).
- ``NamedReader``: the text is the arguments object of a known function (named choice).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from ferry.server.tool_calls.partial import CallScanner, ValueSpan, find_marker, skip


@dataclass(frozen=True)
class PartialCall:
    name: str
    arguments: str   # the raw arguments text so far: a prefix of the final one


class NamedArguments:
    """A call whose name is known from its syntax and whose arguments object is at ``start``."""

    def __init__(self, name: str, start: int) -> None:
        self.name, self.arguments = name, ValueSpan(start)
        self.failed = False

    @property
    def end(self) -> int | None:
        return self.arguments.end

    @property
    def done(self) -> bool:
        return self.arguments.end is not None

    @property
    def pos(self) -> int:
        return self.arguments.pos

    def feed(self, text: str) -> None:
        self.arguments.feed(text)

    def arguments_so_far(self, text: str) -> str:
        return self.arguments.text_so_far(text)


class _Reader:
    """Calls read one after another; ``_next_call`` finds where the next one starts."""

    def __init__(self) -> None:
        self._calls: list = []     # CallScanner or NamedArguments, in order
        self._at = 0               # where the search for the next call resumes
        self._stopped = False      # the syntax ended: no more calls

    def calls(self, text: str) -> list[PartialCall]:
        while not self._stopped:
            current = self._calls[-1] if self._calls else None
            if current is not None and not current.done:
                current.feed(text)
                if not current.done:
                    break
                self._at = current.end if current.end is not None else current.pos
                continue
            found = self._next_call(text)
            if found is None:
                break
            self._calls.append(found)
        return [PartialCall(c.name, c.arguments_so_far(text) or "")
                for c in self._calls if c.name is not None]

    def _next_call(self, text: str):
        """The next call's scanner (None to wait for more text or once ``_stopped``)."""
        raise NotImplementedError


class HermesReader(_Reader):
    marker = "<tool_call>"

    def _next_call(self, text: str):
        while True:
            at, self._at = find_marker(text, self.marker, self._at)
            if at < 0:
                return None
            start = skip(text, at + len(self.marker))
            if start >= len(text):
                return None
            self._at = start
            if text[start] == "{":
                return CallScanner(start)   # anything else is no call: look further


class _SequenceReader(_Reader):
    """Call objects after ``_begin`` (where the calls start), between ``separators``, up to
    ``closer`` (or any other character that cannot start a call)."""

    separators, closer = "", ""

    def __init__(self) -> None:
        super().__init__()
        self._begun = False

    def _begin(self, text: str) -> int | None:
        raise NotImplementedError

    def _next_call(self, text: str):
        if not self._begun:
            start = self._begin(text)
            if start is None:
                return None
            self._at, self._begun = start, True
        start = skip(text, self._at, self.separators)
        if start >= len(text):
            return None
        if text[start] != "{":
            self._stopped = True   # the closer, or not a call: either way the end
            return None
        return CallScanner(start)


class ArrayReader(_SequenceReader):
    """``[{call}, {call}, ...]`` from the text's first ``[``."""

    separators = ","

    def __init__(self, start: int = 0) -> None:
        super().__init__()
        self._from = start

    def _begin(self, text: str) -> int | None:
        start = skip(text, self._from)
        if start >= len(text):
            return None
        if text[start] != "[":
            self._stopped = True
            return None
        return start + 1


class Llama3Reader(_SequenceReader):
    marker = "<|python_tag|>"
    separators = ";"

    def __init__(self) -> None:
        super().__init__()
        self._search = 0

    def _begin(self, text: str) -> int | None:
        at, self._search = find_marker(text, self.marker, self._search)
        if at >= 0:
            return at + len(self.marker)
        start = skip(text, 0)
        # Not an object: content, after which a marker may still start calls.
        return start if start < len(text) and text[start] == "{" else None


class MistralReader(_Reader):
    marker = "[TOOL_CALLS]"
    _named = re.compile(r"\s*([A-Za-z0-9_.\-]+)\s*\[ARGS\]\s*")

    def __init__(self) -> None:
        super().__init__()
        self._array: ArrayReader | None = None

    def calls(self, text: str) -> list[PartialCall]:
        if self._array is None and not self._calls:
            at, self._at = find_marker(text, self.marker, self._at)
            start = skip(text, at + len(self.marker)) if at >= 0 else len(text)
            if start < len(text) and text[start] == "[":
                self._array = ArrayReader(start)   # v3: a JSON array after the marker
        if self._array is not None:
            return self._array.calls(text)
        return super().calls(text)

    def _next_call(self, text: str):
        at, self._at = find_marker(text, self.marker, self._at)
        if at < 0:
            return None
        match = self._named.match(text, at + len(self.marker))
        if match is None or match.end() >= len(text):
            return None   # the name or [ARGS] not written yet (or not this syntax)
        self._at = match.end()
        if text[match.end()] != "{":
            return None
        return NamedArguments(match.group(1), match.end())


class NamedReader(_Reader):
    """``tool_choice`` names the function: the whole text is its arguments object."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self._name = name

    def _next_call(self, text: str):
        start = skip(text, 0)
        if self._calls or start >= len(text):
            return None
        self._stopped = text[start] != "{"
        return None if self._stopped else NamedArguments(self._name, start)
