"""The engine's structured-output state: which requests wait for their grammar, each
constrained request's matcher, and the bitmasks of a step.

Pure Python: the compiler and matchers come in through the ``ferry.structured_output``
interface (``GrammarCompiler``), built by ``ferry.llm.build_engine``; this module never
imports a backend (xgrammar imports torch).

The rules:
- a constrained request is held here, out of the scheduler, until its grammar compiled
  (on the compiler's thread pool); others keep running meanwhile. A compile error ends
  the request (the server compiles first, so it answers 400 before this);
- after each step the request's new tokens advance its matcher; before each step the
  matcher fills the request's row of the step's bitmask (numpy int32), which travels in
  ``SchedulerOutput.grammar_bitmask`` to the runner's sampler;
- a constrained request that verifies drafts gets one mask row per sampled position:
  the matcher advances through the drafts to fill them, then rolls back (the step's
  tokens advance it for real). Rows after a draft the grammar forbids copy the row before:
  that draft cannot be sampled, so those rows are thrown away; with async scheduling their mask waits for their token in flight, which the
  engine collects while the next step's forward pass runs (``Engine.step``; on an
  executor that cannot defer sampling, before scheduling, as
  ``SamplingParams.reads_output_tokens`` says).
"""
from __future__ import annotations

import logging
from concurrent.futures import Future
from typing import Any

import numpy as np

from ferry.outputs import GrammarBitmask, SchedulerOutput
from ferry.request import Request

logger = logging.getLogger(__name__)


class StructuredOutputManager:
    """``compiler``: a ``ferry.structured_output.GrammarCompiler`` (or None: constrained
    requests are refused)."""

    def __init__(self, compiler: Any | None) -> None:
        self.compiler = compiler
        self._pending: list[tuple[Request, Future]] = []
        self._matchers: dict[str, Any] = {}

    # ------------------------------------------------------------------ admission
    def check_available(self) -> None:
        if self.compiler is None:
            raise ValueError("structured output is not available in this engine (no grammar "
                             "backend; pip install 'ferry[structured]')")

    def compile_now(self, spec: Any) -> None:
        """Compile ``spec`` (waiting for it) so that an error raises now, as a
        ``ValueError`` naming the problem; the result is cached for the request."""
        self.check_available()
        self.compiler.compile(spec)

    def hold(self, request: Request) -> None:
        """Keep ``request`` until its grammar is compiled (see ``take_ready``)."""
        self.check_available()
        self._pending.append((request, self.compiler.submit(request.sampling_params.structured_outputs)))

    def take_ready(self) -> tuple[list[Request], list[tuple[Request, str]]]:
        """Requests whose grammar is ready (matcher made), and those whose compile failed
        (with the reason), in arrival order; the rest keep waiting."""
        ready, failed, still = [], [], []
        for request, future in self._pending:
            if not future.done():
                still.append((request, future))
                continue
            exc = future.exception()
            if exc is not None:
                failed.append((request, str(exc)))
                continue
            self._matchers[request.request_id] = future.result().matcher()
            ready.append(request)
        self._pending = still
        return ready, failed

    def wait_any(self, timeout: float) -> None:
        """Block up to ``timeout`` s for a pending compile (when nothing else can run)."""
        from concurrent.futures import FIRST_COMPLETED, wait
        if self._pending:
            wait([f for _, f in self._pending], timeout=timeout, return_when=FIRST_COMPLETED)

    def drop(self, request_ids: set[str] | list[str]) -> list[Request]:
        """Forget these requests; returns those still waiting for a grammar."""
        ids = set(request_ids)
        for request_id in ids:
            self._matchers.pop(request_id, None)
        dropped = [r for r, _ in self._pending if r.request_id in ids]
        self._pending = [(r, f) for r, f in self._pending if r.request_id not in ids]
        return dropped

    @property
    def num_pending(self) -> int:
        return len(self._pending)

    def is_constrained(self, request_id: str) -> bool:
        return request_id in self._matchers

    # ------------------------------------------------------------------ per step
    def accept(self, request: Request, token_ids: list[int]) -> None:
        """Advance the request's matcher by its new tokens (those the mask allowed)."""
        matcher = self._matchers.get(request.request_id)
        if matcher is None:
            return
        for token_id in token_ids:
            if matcher.is_terminated():
                break
            if not matcher.accept_token(token_id):
                # Only possible when the mask was not applied (a bug): say so loudly.
                logger.error("request %s: token %d is outside its grammar",
                             request.request_id, token_id)
                break
        if request.is_finished:
            self._matchers.pop(request.request_id, None)

    def bitmask(self, output: SchedulerOutput, vocab_size: int) -> GrammarBitmask | None:
        """The rows of this step's constrained requests that sample, or None."""
        if not self._matchers:
            return None   # no constrained request: nothing to look up, every step
        sampling = [s for s in output.scheduled if s.sample and s.request_id in self._matchers]
        if not sampling:
            return None
        ids = [s.request_id for s in sampling for _ in range(1 + len(s.spec_token_ids))]
        rows = np.zeros((len(ids), (vocab_size + 31) // 32), dtype=np.int32)  # (K, W)
        plain = [s for s in sampling if not s.spec_token_ids]
        fill = getattr(self.compiler, "fill_bitmasks", None)
        if fill is not None and len(plain) == len(sampling):
            fill([self._matchers[s.request_id] for s in sampling], rows)
            return GrammarBitmask(ids, rows)
        row = 0
        for scheduled in sampling:
            matcher = self._matchers[scheduled.request_id]
            _fill_draft_rows(matcher, scheduled.spec_token_ids, rows, row)
            row += 1 + len(scheduled.spec_token_ids)
        return GrammarBitmask(ids, rows)


def _fill_draft_rows(matcher: Any, drafts: list[int], rows: np.ndarray, start: int) -> None:
    """Rows ``start .. start + len(drafts)``: the mask before each draft and after the last,
    the matcher advanced through the drafts and rolled back after."""
    matcher.fill_bitmask(rows, start)
    accepted = 0
    for j, draft in enumerate(drafts, start=1):
        if accepted == j - 1 and not matcher.is_terminated() and matcher.accept_token(draft):
            accepted += 1
            if not matcher.is_terminated():
                matcher.fill_bitmask(rows, start + j)
                continue
        # The draft before cannot be sampled, or it was a stop token: the row is thrown away.
        rows[start + j] = rows[start + j - 1]
    if accepted:
        matcher.rollback(accepted)
