"""Prometheus metrics of DESIGN.md §4, on a registry owned by one server (no global state).

Every metric carries the labels ``model``, ``quant_type`` and ``gpu_vendor``;
``llm_requests_total`` adds ``status`` (ok, error, aborted, rejected). The request
metrics (latency, TTFT, TPOT, token counters, ``llm_requests_total``) add ``adapter``:
the LoRA adapter's name, or ``""`` for the base model; an adapter's series go once it is
unloaded and its last request finished, so there are never more than the loaded adapters.

Windows (see docs/metrics.md):
- ``llm_inference_latency_p99_ms``: p99 of end-to-end latency over the last 1,000 finished
  requests that finished within the last 300 s (0 when there are none).
- ``llm_tokens_per_second`` and ``llm_tokens_per_joule``: over the last 10 s.
"""
from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from ferry.engine.adapter_tokens import BASE
from ferry.outputs import RequestOutput, SchedulerStats
from ferry.server.scheduling_metrics import SchedulingMetrics

LABELS = ("model", "quant_type", "gpu_vendor")
ADAPTER = "adapter"   # the request metrics' extra label; BASE ("") for base-model requests
REQUEST_STATUSES = ("ok", "error", "aborted", "rejected")
LATENCY_WINDOW_REQUESTS = 1000
LATENCY_WINDOW_SECONDS = 300.0
THROUGHPUT_WINDOW_SECONDS = 10.0

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300)
_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1)

Probe = Callable[[], float | None]


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in (0, 100]); 0.0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


class ServerMetrics:
    """Collects request and engine measurements; ``render()`` gives the /metrics text.

    ``memory_probe`` returns accelerator bytes in use; ``energy_probe`` returns cumulative
    joules or None (the energy metrics exist only when it gives a number at start).
    """

    def __init__(self, model: str, quant_type: str, gpu_vendor: str, *,
                 memory_probe: Probe | None = None, energy_probe: Probe | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._labels = {"model": model, "quant_type": quant_type, "gpu_vendor": gpu_vendor}
        self._clock = clock
        self._memory_probe = memory_probe
        self._energy_probe = energy_probe
        self._started = clock()
        self._latencies: deque[tuple[float, float]] = deque(maxlen=LATENCY_WINDOW_REQUESTS)
        self._throughput: deque[tuple[float, int]] = deque()  # (time, new generated tokens)
        self._energy_window: deque[tuple[float, float]] = deque()  # (time, cumulative J)
        self._energy_counted = 0.0
        self._last_stats: SchedulerStats | None = None
        self._last_adapter_tokens: dict[str, tuple[int, int]] = {}
        self._adapters: set[str] = {BASE}    # adapter labels with series now
        self._define_metrics()
        self._energy_start = self._read_energy()
        if self._energy_start is not None:
            self._define_energy_metrics()

    @property
    def common_labels(self) -> dict[str, str]:
        """The labels every metric carries (model, quant_type, gpu_vendor)."""
        return dict(self._labels)

    # ------------------------------------------------------------------ definitions
    def _metric(self, kind, name: str, doc: str, **kw):
        """A metric with the three common labels; returns its one child (labels bound)."""
        return kind(name, doc, LABELS, registry=self.registry, **kw).labels(**self._labels)

    def _adapter_metric(self, kind, name: str, doc: str, extra: tuple[str, ...] = (), **kw):
        """A request metric: the common labels, ``extra`` ones and ``adapter`` (the family;
        ``_child`` binds its labels)."""
        return kind(name, doc, LABELS + extra + (ADAPTER,), registry=self.registry, **kw)

    def _child(self, family, adapter: str | None, **extra: str):
        return family.labels(**self._labels, **extra, adapter=adapter or BASE)

    def _define_metrics(self) -> None:
        m, a = self._metric, self._adapter_metric
        self.latency = a(Histogram, "llm_inference_latency_seconds",
                         "End-to-end request latency (arrival to last token)",
                         buckets=_LATENCY_BUCKETS)
        self.latency_p99 = m(Gauge, "llm_inference_latency_p99_ms",
                             "p99 end-to-end latency in ms over the last 1000 requests "
                             "finished within 300 s")
        self.ttft = a(Histogram, "llm_time_to_first_token_seconds",
                      "Time from arrival to the first generated token", buckets=_TTFT_BUCKETS)
        self.tpot = a(Histogram, "llm_time_per_output_token_seconds",
                      "Mean time between output tokens of a request, after the first",
                      buckets=_TPOT_BUCKETS)
        self.prompt_tokens = a(Counter, "llm_prompt_tokens",
                               "Prompt tokens admitted to the engine")
        self.generation_tokens = a(Counter, "llm_generation_tokens",
                                   "Tokens generated by the engine")
        self.tokens_per_second = m(Gauge, "llm_tokens_per_second",
                                   "Generated tokens per second over the last 10 s")
        self.running = m(Gauge, "llm_requests_running", "Sequences being generated")
        self.waiting = m(Gauge, "llm_requests_waiting", "Sequences queued for a first schedule")
        self.kv_usage = m(Gauge, "llm_kv_cache_usage_ratio", "Used KV blocks / all KV blocks")
        self.kv_hit_ratio = m(Gauge, "llm_kv_cache_hit_ratio",
                              "Prefix-cache hit tokens / looked-up tokens since start")
        self.page_faults = m(Counter, "llm_kv_cache_page_faults",
                             "KV block allocations that evicted a cached block or preempted")
        self.scheduling = SchedulingMetrics(self.registry, self._labels, m)
        self.gpu_memory = m(Gauge, "llm_gpu_memory_used_bytes",
                            "Accelerator memory in use (0 on the CPU)")
        self.requests = a(Counter, "llm_requests", "Requests by outcome", ("status",))
        self._add_adapter_series(BASE)   # every base series is visible from the first scrape

    def _add_adapter_series(self, adapter: str) -> None:
        for family in (self.latency, self.ttft, self.tpot, self.prompt_tokens,
                       self.generation_tokens):
            self._child(family, adapter)
        for status in REQUEST_STATUSES:
            self._child(self.requests, adapter, status=status)
        self._adapters.add(adapter)

    def _drop_adapter_series(self, live: set[str]) -> None:
        """Forget the series of adapters no longer in use (bounded label cardinality)."""
        common = [self._labels[name] for name in LABELS]
        for adapter in self._adapters - live - {BASE}:
            for family in (self.latency, self.ttft, self.tpot, self.prompt_tokens,
                           self.generation_tokens):
                family.remove(*common, adapter)
            for status in REQUEST_STATUSES:
                self.requests.remove(*common, status, adapter)
            self._last_adapter_tokens.pop(adapter, None)
        self._adapters &= live | {BASE}

    def _define_energy_metrics(self) -> None:
        self.energy = self._metric(Counter, "llm_energy_joules",
                                   "Accelerator energy used since the server started")
        self.tokens_per_joule = self._metric(Gauge, "llm_tokens_per_joule",
                                             "Generated tokens per joule over the last 10 s")

    # ------------------------------------------------------------------ observations
    def count_request(self, status: str, adapter: str | None = None) -> None:
        """One request ended with ``status`` (ok, error, aborted, rejected); ``adapter``:
        its LoRA adapter's name (None: the base model, or not known yet)."""
        if status not in REQUEST_STATUSES:
            raise ValueError(f"status must be one of {REQUEST_STATUSES}, got {status!r}")
        self._seen(adapter)
        self._child(self.requests, adapter, status=status).inc()

    def observe_finished(self, output: RequestOutput, adapter: str | None = None) -> None:
        """Latency histograms and the p99 window from a finished request's timestamps."""
        metrics = output.metrics
        if metrics is None or metrics.finished_time is None:
            return
        self._seen(adapter)
        latency = max(0.0, metrics.finished_time - metrics.arrival_time)
        self._child(self.latency, adapter).observe(latency)
        self._latencies.append((self._clock(), latency))
        if metrics.first_token_time is None:
            return
        self._child(self.ttft, adapter).observe(
            max(0.0, metrics.first_token_time - metrics.arrival_time))
        num_tokens = max((c.num_generated_tokens for c in output.outputs), default=0)
        if num_tokens > 1:
            decode_time = max(0.0, metrics.finished_time - metrics.first_token_time)
            self._child(self.tpot, adapter).observe(decode_time / (num_tokens - 1))

    def _seen(self, adapter: str | None) -> None:
        if (adapter or BASE) not in self._adapters:
            self._add_adapter_series(adapter or BASE)

    def observe_stats(self, stats: SchedulerStats) -> None:
        """Gauges from the engine's latest stats; counters grow by the change since last call."""
        self.running.set(stats.num_running)
        self.waiting.set(stats.num_waiting)
        self.kv_usage.set(stats.kv_cache_usage)
        queries = stats.prefix_cache_queries
        self.kv_hit_ratio.set(stats.prefix_cache_hits / queries if queries else 0)
        last = self._last_stats or SchedulerStats()
        _grow(self.page_faults, stats.page_faults - last.page_faults)
        self.scheduling.observe(stats, last)
        self._grow_token_counters(stats, last)
        new_tokens = _total(stats, "generation") - _total(last, "generation")
        if new_tokens > 0:
            self._throughput.append((self._clock(), new_tokens))
        self._last_stats = stats

    def _grow_token_counters(self, stats: SchedulerStats, last: SchedulerStats) -> None:
        """Per adapter from the engine's ``tokens_by_adapter``; all under the base label from
        plain totals (an engine that does not split them)."""
        by_adapter = getattr(stats, "tokens_by_adapter", None)
        if not by_adapter:
            _grow(self._child(self.prompt_tokens, BASE),
                  _total(stats, "prompt") - _total(last, "prompt"))
            _grow(self._child(self.generation_tokens, BASE),
                  _total(stats, "generation") - _total(last, "generation"))
            return
        for adapter, (prompt, generated) in by_adapter.items():
            self._seen(adapter)
            before = self._last_adapter_tokens.get(adapter, (0, 0))
            _grow(self._child(self.prompt_tokens, adapter), prompt - before[0])
            _grow(self._child(self.generation_tokens, adapter), generated - before[1])
        self._last_adapter_tokens = dict(by_adapter)
        self._drop_adapter_series(set(by_adapter))

    # ------------------------------------------------------------------ scrape
    def render(self) -> bytes:
        """Refresh the windowed gauges and probes, then the Prometheus text format."""
        now = self._clock()
        self._refresh_latency_p99(now)
        tokens = self._refresh_throughput(now)
        self._refresh_probes(now, tokens)
        return generate_latest(self.registry)

    def _refresh_latency_p99(self, now: float) -> None:
        recent = [lat for t, lat in self._latencies if now - t <= LATENCY_WINDOW_SECONDS]
        self.latency_p99.set(percentile(recent, 99) * 1000)

    def _refresh_throughput(self, now: float) -> int:
        while self._throughput and now - self._throughput[0][0] > THROUGHPUT_WINDOW_SECONDS:
            self._throughput.popleft()
        tokens = sum(n for _, n in self._throughput)
        span = min(THROUGHPUT_WINDOW_SECONDS, max(now - self._started, 1e-3))
        self.tokens_per_second.set(tokens / span)
        return tokens

    def _refresh_probes(self, now: float, window_tokens: int) -> None:
        used = self._memory_probe() if self._memory_probe else None
        self.gpu_memory.set(used or 0)
        if self._energy_start is None:
            return
        joules = self._read_energy()
        if joules is None:
            return
        _grow(self.energy, joules - self._energy_start - self._energy_counted)
        self._energy_counted = max(self._energy_counted, joules - self._energy_start)
        window = self._energy_window
        window.append((now, joules))
        while len(window) > 1 and now - window[0][0] > THROUGHPUT_WINDOW_SECONDS:
            window.popleft()
        spent = joules - self._energy_window[0][1]
        self.tokens_per_joule.set(window_tokens / spent if spent > 0 else 0)

    def _read_energy(self) -> float | None:
        try:
            return self._energy_probe() if self._energy_probe else None
        except Exception:  # a flaky driver probe must not break /metrics
            return None


def _grow(counter, amount: float) -> None:
    if amount > 0:
        counter.inc(amount)


def _total(stats: SchedulerStats, kind: str) -> int:
    """``num_{kind}_tokens_total`` of EngineStats (0 on plain SchedulerStats)."""
    return getattr(stats, f"num_{kind}_tokens_total", 0)
