"""Finished attention traces kept for ``GET /debug/trace/{request_id}``.

The engine attaches a traced request's trace to its finished output; the server keeps the
last ``MAX_TRACES`` of them for ``RETENTION_SECONDS`` (a trace of a long answer is large:
bounded per request by ``debug_trace_max_tokens``). Ids are the engine's request ids: a
chat completion's ``id``, or ``{id}-{prompt index}`` for /v1/completions.
"""
from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

RETENTION_SECONDS = 600.0
MAX_TRACES = 256


class TraceStore:
    def __init__(self, retention_seconds: float = RETENTION_SECONDS,
                 max_traces: int = MAX_TRACES,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.retention_seconds = retention_seconds
        self.max_traces = max_traces
        self._clock = clock
        self._traces: OrderedDict[str, tuple[float, dict]] = OrderedDict()

    def put(self, request_id: str, trace: dict) -> None:
        self._traces[request_id] = (self._clock(), trace)
        self._traces.move_to_end(request_id)
        self._expire()

    def get(self, request_id: str) -> dict | None:
        self._expire()
        entry = self._traces.get(request_id)
        return entry[1] if entry else None

    def _expire(self) -> None:
        now = self._clock()
        while self._traces and (len(self._traces) > self.max_traces or
                                now - next(iter(self._traces.values()))[0] >
                                self.retention_seconds):
            self._traces.popitem(last=False)


def completion_trace(trace: dict | None, index: int) -> Any:
    """The trace of completion ``index`` of a request (``n > 1`` keeps one per index)."""
    if trace is None or "completions" not in trace:
        return trace
    completions = trace["completions"]
    return completions[index] if index < len(completions) else None


class StreamedTraces:
    """A traced request's trace in its SSE stream, shaped as in the non-streamed response
    (``choices[i].debug_trace``): on the chunk that finishes choice i when the trace is
    ready by then (always with n = 1: the engine attaches it to the request's last output),
    else, for a choice that finished before the request did (n > 1), on a chunk of its own
    when the request finishes, with an empty delta and the choice's ``finish_reason``
    repeated. Untraced streams are unchanged."""

    def __init__(self, blank: dict[str, Any]) -> None:
        self._blank = blank                               # the empty delta of a chunk's choice
        self._owed: dict[int, tuple[int, str | None]] = {}   # choice -> (completion, finish)

    def on_choice(self, choice: dict[str, Any], trace: dict | None, completion: int) -> None:
        """``choice``: a chunk's choice for completion ``completion`` of a request whose
        output carries ``trace`` (None until the request finishes); it finishes the
        choice when its ``finish_reason`` is set."""
        if choice.get("finish_reason") is None:
            return
        if trace is not None:
            choice["debug_trace"] = completion_trace(trace, completion)
        else:
            self._owed[choice["index"]] = (completion, choice.get("finish_reason"))

    def owed(self, trace: dict | None) -> list[dict[str, Any]]:
        """The choices still owed their trace, once ``trace`` (the request's) is there."""
        if trace is None or not self._owed:
            return []
        choices = [{"index": index, **self._blank, "logprobs": None, "finish_reason": finish,
                    "debug_trace": completion_trace(trace, completion)}
                   for index, (completion, finish) in sorted(self._owed.items())]
        self._owed.clear()
        return choices
