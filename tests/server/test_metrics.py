"""Prometheus metrics: names and labels of DESIGN.md §4, window math, and the live server."""
from __future__ import annotations

import random

import numpy as np
import pytest
from ferry_server_process import metric, scrape
from prometheus_client.parser import text_string_to_metric_families

from ferry.engine.engine import EngineStats
from ferry.outputs import CompletionOutput, RequestMetrics, RequestOutput
from ferry.server.metrics import ServerMetrics

LABELS = {"model": "m", "quant_type": "none", "gpu_vendor": "cpu"}
DESIGN_METRICS = {
    "llm_inference_latency_seconds": "histogram",
    "llm_inference_latency_p99_ms": "gauge",
    "llm_time_to_first_token_seconds": "histogram",
    "llm_time_per_output_token_seconds": "histogram",
    "llm_prompt_tokens": "counter",
    "llm_generation_tokens": "counter",
    "llm_tokens_per_second": "gauge",
    "llm_requests_running": "gauge",
    "llm_requests_waiting": "gauge",
    "llm_requests": "counter",
    "llm_kv_cache_usage_ratio": "gauge",
    "llm_kv_cache_hit_ratio": "gauge",
    "llm_kv_cache_page_faults": "counter",
    "llm_preemptions": "counter",
    "llm_gpu_memory_used_bytes": "gauge",
    "llm_swapped_blocks": "gauge",
    "llm_degraded": "gauge",
    "llm_queue_time_seconds": "histogram",
    "llm_thermal_throttle": "counter",
    "llm_device_temperature_celsius": "gauge",
}


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _finished(arrival: float, first: float, done: float, num_tokens: int) -> RequestOutput:
    completion = CompletionOutput(0, "x", list(range(num_tokens)), finish_reason="length")
    return RequestOutput("r", "p", [1, 2], [completion], True,
                         RequestMetrics(arrival, first_token_time=first, finished_time=done))


def _families(metrics: ServerMetrics) -> dict:
    return {f.name: f for f in text_string_to_metric_families(metrics.render().decode())}


def _value(metrics: ServerMetrics, sample_name: str, **labels: str) -> float:
    for family in text_string_to_metric_families(metrics.render().decode()):
        for sample in family.samples:
            if sample.name == sample_name and all(sample.labels.get(k) == v
                                                  for k, v in labels.items()):
                return sample.value
    raise KeyError(sample_name)


def test_every_design_metric_is_exposed_with_its_labels():
    families = _families(ServerMetrics(**LABELS))
    for name, kind in DESIGN_METRICS.items():
        assert families[name].type == kind, name
        assert families[name].samples, f"{name} has no sample before the first request"
        for sample in families[name].samples:
            assert {k: sample.labels[k] for k in LABELS} == LABELS
    statuses = {s.labels["status"] for s in families["llm_requests"].samples
                if s.name == "llm_requests_total"}
    assert statuses == {"ok", "error", "aborted", "rejected"}
    assert "llm_energy_joules" not in families  # the CPU reports no energy


def test_p99_is_nearest_rank_over_the_sliding_window():
    clock = Clock()
    metrics = ServerMetrics(**LABELS, clock=clock)
    rng = random.Random(0)
    latencies = [rng.uniform(0.01, 2.0) for _ in range(1500)]
    for latency in latencies:
        metrics.observe_finished(_finished(clock.now - latency, clock.now - latency / 2,
                                           clock.now, 4))
    window = np.array(latencies[-1000:])  # only the last 1,000 requests count
    expected = np.percentile(window, 99, method="inverted_cdf") * 1000
    assert _value(metrics, "llm_inference_latency_p99_ms") == pytest.approx(expected)
    clock.now += 301  # older than 300 s: out of the window
    assert _value(metrics, "llm_inference_latency_p99_ms") == 0


def test_latency_histograms_and_request_counts():
    metrics = ServerMetrics(**LABELS)
    metrics.observe_finished(_finished(10.0, 10.5, 12.5, 5))  # 2.5 s, TTFT 0.5 s, 4 gaps of 0.5 s
    metrics.count_request("ok")
    metrics.count_request("rejected")
    assert _value(metrics, "llm_inference_latency_seconds_sum") == pytest.approx(2.5)
    assert _value(metrics, "llm_time_to_first_token_seconds_sum") == pytest.approx(0.5)
    assert _value(metrics, "llm_time_per_output_token_seconds_sum") == pytest.approx(0.5)
    assert _value(metrics, "llm_requests_total", status="ok") == 1
    assert _value(metrics, "llm_requests_total", status="rejected") == 1
    with pytest.raises(ValueError):
        metrics.count_request("weird")


def test_engine_stats_set_gauges_and_grow_counters_by_deltas():
    clock = Clock()
    metrics = ServerMetrics(**LABELS, clock=clock)
    metrics.observe_stats(EngineStats(num_running=3, num_waiting=2, kv_cache_usage=0.25,
                                      prefix_cache_queries=100, prefix_cache_hits=40,
                                      page_faults=2, preemptions=1, num_prompt_tokens_total=50,
                                      num_generation_tokens_total=30))
    clock.now += 5
    metrics.observe_stats(EngineStats(num_running=1, prefix_cache_queries=200,
                                      prefix_cache_hits=50, page_faults=5, preemptions=1,
                                      num_prompt_tokens_total=80,
                                      num_generation_tokens_total=70))
    assert _value(metrics, "llm_requests_running") == 1
    assert _value(metrics, "llm_requests_waiting") == 0
    assert _value(metrics, "llm_kv_cache_hit_ratio") == pytest.approx(50 / 200)
    assert _value(metrics, "llm_kv_cache_page_faults_total") == 5
    assert _value(metrics, "llm_preemptions_total") == 1
    assert _value(metrics, "llm_prompt_tokens_total") == 80
    assert _value(metrics, "llm_generation_tokens_total") == 70
    # 70 tokens in the 5 s since start (the window is 10 s, or the uptime when shorter)
    assert _value(metrics, "llm_tokens_per_second") == pytest.approx(70 / 5)
    clock.now += 11  # both samples are now older than the 10 s window
    assert _value(metrics, "llm_tokens_per_second") == 0


def test_energy_metrics_appear_when_the_platform_reports_energy():
    joules = iter([100.0, 100.0, 150.0])
    metrics = ServerMetrics(**LABELS, energy_probe=lambda: next(joules))
    metrics.observe_stats(EngineStats(num_generation_tokens_total=200))
    assert _value(metrics, "llm_energy_joules_total") == 0
    assert _value(metrics, "llm_energy_joules_total") == 50
    assert _value(metrics, "llm_tokens_per_joule") == pytest.approx(200 / 50)


def test_live_server_metrics(server, client):
    before = scrape(server.url)
    resp = client.completions.create(model="tiny", prompt="Hello there", max_tokens=5,
                                      temperature=0, extra_body={"ignore_eos": True})
    after = scrape(server.url)
    labels = {"model": "tiny", "quant_type": "none", "gpu_vendor": "cpu"}
    for name in ("llm_inference_latency_p99_ms", "llm_tokens_per_second",
                 "llm_requests_running", "llm_requests_waiting", "llm_kv_cache_usage_ratio",
                 "llm_kv_cache_hit_ratio", "llm_kv_cache_page_faults_total",
                 "llm_preemptions_total", "llm_gpu_memory_used_bytes",
                 "llm_inference_latency_seconds_count", "llm_time_to_first_token_seconds_count",
                 "llm_time_per_output_token_seconds_count"):
        metric(after, name, **labels)  # present with the three labels
    delta = {name: metric(after, name, **labels) - metric(before, name, **labels)
             for name in ("llm_prompt_tokens_total", "llm_generation_tokens_total",
                          "llm_inference_latency_seconds_count")}
    assert delta == {"llm_prompt_tokens_total": resp.usage.prompt_tokens,
                     "llm_generation_tokens_total": 5, "llm_inference_latency_seconds_count": 1}
    assert metric(after, "llm_requests_total", status="ok", **labels) == \
        metric(before, "llm_requests_total", status="ok", **labels) + 1
    assert metric(after, "llm_inference_latency_p99_ms", **labels) > 0


def test_docs_and_grafana_dashboard_cover_every_metric():
    import json
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    docs = (root / "docs" / "metrics.md").read_text()
    dashboard = json.loads((root / "deploy" / "grafana" / "ferry-dashboard.json").read_text())
    exprs = " ".join(t["expr"] for p in dashboard["panels"] for t in p.get("targets", []))
    kinds = {**DESIGN_METRICS, "llm_energy_joules": "counter", "llm_tokens_per_joule": "gauge"}
    for name, kind in kinds.items():
        exposed = name + "_total" if kind == "counter" else name
        assert exposed in docs, f"{exposed} is not described in docs/metrics.md"
        assert exposed in exprs, f"{exposed} is not plotted in the Grafana dashboard"


def test_request_metrics_by_adapter_and_unloaded_adapters_dropped():
    metrics = ServerMetrics(**LABELS)
    metrics.observe_finished(_finished(10.0, 10.5, 12.5, 5), adapter="a1")
    metrics.count_request("ok", "a1")
    metrics.count_request("ok")
    metrics.observe_stats(EngineStats(num_prompt_tokens_total=30, num_generation_tokens_total=9,
                                      tokens_by_adapter={"": (10, 4), "a1": (20, 5)}))
    metrics.observe_stats(EngineStats(num_prompt_tokens_total=31, num_generation_tokens_total=12,
                                      tokens_by_adapter={"": (11, 6), "a1": (20, 6)}))
    assert _value(metrics, "llm_prompt_tokens_total", adapter="") == 11
    assert _value(metrics, "llm_generation_tokens_total", adapter="a1") == 6
    assert _value(metrics, "llm_requests_total", adapter="a1", status="ok") == 1
    assert _value(metrics, "llm_requests_total", adapter="", status="ok") == 1
    assert _value(metrics, "llm_time_to_first_token_seconds_sum", adapter="a1") == pytest.approx(0.5)
    assert _value(metrics, "llm_time_to_first_token_seconds_count", adapter="") == 0
    # a1 is no longer loaded nor running: its series go (bounded label cardinality)
    metrics.observe_stats(EngineStats(tokens_by_adapter={"": (12, 7)}))
    with pytest.raises(KeyError):
        _value(metrics, "llm_requests_total", adapter="a1")
    assert _value(metrics, "llm_prompt_tokens_total", adapter="") == 12
