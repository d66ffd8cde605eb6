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
