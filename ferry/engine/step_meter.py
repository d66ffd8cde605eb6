"""What each engine step cost: its time (the swap-or-recompute estimate reads it) and its
energy, split across the step's requests by their share of its tokens.

The energy counter (the platform's ``energy_probe``: NVML, amdsmi or RAPL) is read at the
start and the end of each ``Engine.step``; the joules in between belong to the step whose
tokens that call collected (with async scheduling the device ran it during the call).
Time between calls, when the engine is idle, is charged to nobody. Without a counter no
request gets an ``energy_joules`` value: it stays None, never 0. Pure Python.
"""
from __future__ import annotations

import time
from collections.abc import Callable

from ferry.engine.preemption import PreemptionCosts
from ferry.outputs import SchedulerOutput
from ferry.request import Request

Probe = Callable[[], "float | None"]


class StepMeter:
    """``begin()`` before a step's work, ``end(...)`` once its tokens are known."""

    def __init__(self, energy_probe: Probe | None, costs: PreemptionCosts) -> None:
        self.energy_probe = energy_probe
        self.costs = costs
        self.energy_joules: float | None = None   # attributed so far (None: no counter)
        self._started = 0.0
        self._energy_start: float | None = None

    def begin(self) -> None:
        self._started = time.perf_counter()
        self._energy_start = self._read()

    def end(self, sched_out: SchedulerOutput, lookup: Callable[[str], Request | None]) -> None:
        """Charge the step's time and joules; ``lookup`` finds its live requests."""
        self.costs.observe_step(sched_out.num_batched_tokens, time.perf_counter() - self._started)
        start, now = self._energy_start, self._read()
        if start is None or now is None:
            return
        shares = [(request, s.num_tokens) for s in sched_out.scheduled
                  if (request := lookup(s.request_id)) is not None]
        joules = max(0.0, now - start)
        split_energy(joules, shares)
        # A step whose requests all left meanwhile is charged to nobody.
        self.energy_joules = (self.energy_joules or 0.0) + (joules if shares else 0.0)

    def _read(self) -> float | None:
        if self.energy_probe is None:
            return None
        try:
            return self.energy_probe()
        except Exception:  # noqa: BLE001 - a flaky driver read is no reading
            return None


def split_energy(joules: float, shares: list[tuple[Request, int]]) -> None:
    """Add ``joules`` to the requests in proportion to their tokens (the shares sum to it)."""
    total = sum(n for _, n in shares)
    if total <= 0:
        return
    for request, num_tokens in shares:
        request.energy_joules = (request.energy_joules or 0.0) + joules * num_tokens / total
