"""LoRA metrics, read from the engine at scrape time (a Prometheus custom collector).

``llm_lora_adapters_loaded`` (gauge), ``llm_lora_requests_total{adapter}`` (requests
admitted per adapter since start), ``llm_lora_swaps_total{direction="in"|"out"}`` (adapters
copied into / evicted from device slots) and ``llm_lora_host_loads_total`` (adapters read
from disk), each with the common labels.
"""
from __future__ import annotations

from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from ferry.server.metrics import LABELS


class LoRACollector:
    def __init__(self, engine: Any, labels: dict[str, str]) -> None:
        self.engine = engine
        self.values = [labels[name] for name in LABELS]

    def collect(self):
        lora = self.engine.lora
        # Copies: the engine thread may change these while the scrape reads them.
        entries = list(lora.registry.entries())
        requests = dict(lora.registry.requests_total)
        stats = self.engine.executor.lora_stats()
        loaded = GaugeMetricFamily("llm_lora_adapters_loaded", "LoRA adapters being served",
                                   labels=LABELS)
        loaded.add_metric(self.values, len(entries))
        yield loaded
        per_adapter = CounterMetricFamily("llm_lora_requests", "Requests admitted per LoRA "
                                          "adapter", labels=(*LABELS, "adapter"))
        for name, count in sorted(requests.items()):
            per_adapter.add_metric([*self.values, name], count)
        yield per_adapter
        swaps = CounterMetricFamily("llm_lora_swaps", "LoRA adapters swapped into (in) or "
                                    "evicted from (out) device slots",
                                    labels=(*LABELS, "direction"))
        swaps.add_metric([*self.values, "in"], stats.get("swaps_in", 0))
        swaps.add_metric([*self.values, "out"], stats.get("swaps_out", 0))
        yield swaps
        host = CounterMetricFamily("llm_lora_host_loads", "LoRA adapters read from disk",
                                   labels=LABELS)
        host.add_metric(self.values, stats.get("host_loads", 0))
        yield host

    def describe(self):
        return []   # no description at registration: collect() runs only on scrapes
