"""Scheduling metrics (DESIGN.md §4): preemptions by mode, swap, degradation, queue time,
waiting requests per priority, and the thermal guard. Part of :class:`ServerMetrics`."""
from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from ferry.outputs import SchedulerStats

PREEMPTION_MODES = ("recompute", "swap")
MAX_PRIORITY_LABELS = 32   # distinct priority values with their own waiting gauge
_QUEUE_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)


class SchedulingMetrics:
    """Defined on the server's registry with its common labels; fed from engine stats."""

    def __init__(self, registry: CollectorRegistry, labels: dict[str, str],
                 metric: Callable) -> None:
        names = tuple(labels)
        preemptions = Counter("llm_preemptions", "Requests preempted to free KV blocks, by "
                              "how they keep their work", names + ("mode",), registry=registry)
        self.preemptions = {mode: preemptions.labels(**labels, mode=mode)
                            for mode in PREEMPTION_MODES}
        self.swapped_blocks = metric(Gauge, "llm_swapped_blocks",
                                     "KV blocks of swapped-out requests in host memory")
        self.degraded = metric(Gauge, "llm_degraded",
                               "1 while KV memory pressure stops admissions, else 0")
        self.queue_time = metric(Histogram, "llm_queue_time_seconds",
                                 "Time from arrival to the first schedule", buckets=_QUEUE_BUCKETS)
        self.thermal_throttles = metric(Counter, "llm_thermal_throttle",
                                        "Times the thermal/power guard lowered the prefill "
                                        "limits")
        self.temperature = metric(Gauge, "llm_device_temperature_celsius",
                                  "Device temperature the thermal guard read last (0: none)")
        self._waiting = Gauge("llm_requests_waiting_by_priority", "Waiting sequences per "
                              "priority", names + ("priority",), registry=registry)
        self._labels = labels
        self._priorities_seen: set[str] = set()   # labels in use

    def observe(self, stats: SchedulerStats, last: SchedulerStats) -> None:
        """Gauges from ``stats``; counters and the histogram grow by the change since ``last``."""
        swap = stats.preemptions_swap - last.preemptions_swap
        recompute = stats.preemptions_recompute - last.preemptions_recompute
        # Stats without a mode split count as recompute (the only mode they knew).
        other = (stats.preemptions - last.preemptions) - swap - recompute
        _grow(self.preemptions["swap"], swap)
        _grow(self.preemptions["recompute"], recompute + max(0, other))
        self.swapped_blocks.set(stats.swapped_blocks)
        self.degraded.set(1 if stats.degraded else 0)
        _grow(self.thermal_throttles, stats.thermal_throttles - last.thermal_throttles)
        if stats.device_temperature_c is not None:
            self.temperature.set(stats.device_temperature_c)
        new = stats.num_queue_times - last.num_queue_times
        for seconds in stats.recent_queue_times[-new:] if new > 0 else ():
            self.queue_time.observe(seconds)
        counts: dict[str, int] = dict.fromkeys(self._priorities_seen, 0)
        for priority, count in stats.num_waiting_by_priority.items():
            label = self._label_of(priority)
            counts[label] = counts.get(label, 0) + count
        for label, count in counts.items():
            self._waiting.labels(**self._labels, priority=label).set(count)

    def _label_of(self, priority: int) -> str:
        """The priority's own label while few are in use; past ``MAX_PRIORITY_LABELS``
        distinct values new ones share "other" (clients choose priorities: the series
        must stay bounded)."""
        label = str(priority)
        if label not in self._priorities_seen and len(self._priorities_seen) >= MAX_PRIORITY_LABELS:
            label = "other"
        self._priorities_seen.add(label)
        return label


def _grow(counter, amount: float) -> None:
    if amount > 0:
        counter.inc(amount)
