"""Graceful degradation under KV memory pressure, with hysteresis.

Above ``memory_pressure_threshold`` of the KV blocks held by requests the engine is
*degraded*: no request is admitted (new prefills would only be preempted again), and while
usage stays above the shrink level (halfway from the threshold to full) the least urgent
running requests are preempted, by swap where it pays. Admission resumes once usage is
below the threshold less a margin, so the engine does not flip every step. The server
rejects requests (503) only past ``max_waiting_requests``; a degraded engine queues them.
Pure Python.
"""
from __future__ import annotations

HYSTERESIS = 0.05   # share of the blocks below the threshold at which admission resumes


class PressureGuard:
    """``update(usage)`` once per step; ``degraded`` and ``must_shrink(usage)`` say what to do."""

    def __init__(self, threshold: float) -> None:
        if not 0 < threshold <= 1:
            raise ValueError(f"memory_pressure_threshold must be in (0, 1], got {threshold!r}")
        self.threshold = threshold
        self.resume_level = max(0.0, threshold - HYSTERESIS)
        self.shrink_level = threshold + (1.0 - threshold) / 2
        self.degraded = False
        self.num_entries = 0

    def update(self, usage: float) -> bool:
        """Enter at the threshold, leave below the resume level; returns ``degraded``."""
        if not self.degraded and usage >= self.threshold and self.threshold < 1.0:
            self.degraded = True
            self.num_entries += 1
        elif self.degraded and usage < self.resume_level:
            self.degraded = False
        return self.degraded

    def must_shrink(self, usage: float) -> bool:
        """True while degraded and usage is still above the shrink level."""
        return self.degraded and usage > self.shrink_level
