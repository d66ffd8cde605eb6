"""Admission rules of the waiting queue: the fast lane, the age bound, the reserve, and
per-request predicates.

- Fast lane: a request whose uncached prompt has at most ``short_prompt_threshold``
  tokens is admitted in a pass before the running requests' long prefill chunks and
  before long waiting prompts, so it waits behind at most the one step in flight.
- No head-of-line blocking: a request that cannot be admitted now (too few blocks, a
  predicate says no, its token still in flight) does not stop the ones behind it.
- Age bound: each step in which a request is passed over and one behind it is admitted
  counts a bypass; once a request has ``max_queue_bypasses`` of them, nothing behind it is
  admitted before it is (the old head-of-line order, for that request only).
- Reserve: ``reserved_blocks_for_priority`` blocks stay free for requests more urgent
  than the default (``priority < 0``), so such a request starts at once.
- Predicates: callables ``request -> bool`` that must all allow a request (e.g. a LoRA
  adapter slot being free); a refused request simply waits, like one short of blocks.
Pure Python.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable

from ferry.request import Request

AdmissionPredicate = Callable[[Request], bool]

# Waiting requests looked at per pass at most: a long queue of requests that cannot start
# must not make every step scan all of it.
MAX_CANDIDATES_PER_PASS = 64


class AdmissionPolicy:
    """The rules above, as questions the scheduler asks about one waiting request."""

    def __init__(self, short_prompt_threshold: int, max_queue_bypasses: int,
                 reserved_blocks: int, predicates: Iterable[AdmissionPredicate] = ()) -> None:
        self.short_prompt_threshold = short_prompt_threshold
        self.max_queue_bypasses = max_queue_bypasses
        self.reserved_blocks = reserved_blocks
        self.predicates: list[AdmissionPredicate] = list(predicates)
        self._passed_over: list[Request] = []

    def add_predicate(self, predicate: AdmissionPredicate) -> None:
        """One more condition every admission must meet."""
        self.predicates.append(predicate)

    def in_fast_lane(self, num_new_tokens: int) -> bool:
        """A request with this many tokens to compute rides the fast lane."""
        return num_new_tokens <= max(self.short_prompt_threshold, 1)

    def allows(self, request: Request) -> bool:
        return all(predicate(request) for predicate in self.predicates)

    def blocks_behind(self, request: Request) -> bool:
        """True once ``request`` was passed over often enough to hold up the queue."""
        return request.num_bypasses >= self.max_queue_bypasses

    def reserve_for(self, request: Request) -> int:
        """Free blocks an admission of ``request`` must leave untouched."""
        return 0 if request.priority < 0 else self.reserved_blocks

    # ------------------------------------------------------------------ bypass counting
    def passed_over(self, request: Request) -> None:
        """``request`` was not admitted in this pass; counted if one behind it is."""
        self._passed_over.append(request)

    def admitted(self, request: Request) -> None:
        """``request`` was admitted: every request passed over before it was bypassed."""
        for skipped in self._passed_over:
            if skipped is not request:
                skipped.num_bypasses += 1
        self._passed_over.clear()

    def end_pass(self) -> None:
        self._passed_over.clear()
