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
- constrained requests verify no drafts (their masks would depend on drafts not yet
  accepted); with async scheduling their mask waits for their token in flight, which the
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
        request.spec_token_ids = []   # no drafts for constrained requests (module docstring)
        if request.is_finished:
            self._matchers.pop(request.request_id, None)

    def bitmask(self, output: SchedulerOutput, vocab_size: int) -> GrammarBitmask | None:
        """The rows of this step's constrained requests that sample, or None."""
        if not self._matchers:
            return None   # no constrained request: nothing to look up, every step
        ids = [s.request_id for s in output.scheduled
               if s.sample and s.request_id in self._matchers]
        if not ids:
            return None
        words = (vocab_size + 31) // 32
        rows = np.zeros((len(ids), words), dtype=np.int32)  # (K, W)
        matchers = [self._matchers[request_id] for request_id in ids]
        fill = getattr(self.compiler, "fill_bitmasks", None)
        if fill is not None:
            fill(matchers, rows)
        else:
            for index, matcher in enumerate(matchers):
                matcher.fill_bitmask(rows, index)
        return GrammarBitmask(ids, rows)
