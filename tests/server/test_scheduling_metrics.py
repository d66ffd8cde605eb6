"""The scheduling metrics grow from engine stats: preemptions by mode, swap, degradation,
queue times, waiting per priority, the thermal guard."""
from prometheus_client.parser import text_string_to_metric_families

from ferry.outputs import SchedulerStats
from ferry.server.metrics import ServerMetrics

LABELS = {"model": "m", "quant_type": "none", "gpu_vendor": "cpu"}


def _samples(metrics):
    return [(s.name, s.labels, s.value) for f in
            text_string_to_metric_families(metrics.render().decode()) for s in f.samples]


def _value(metrics, name, **labels):
    return next(v for n, lab, v in _samples(metrics)
                if n == name and all(lab.get(k) == x for k, x in labels.items()))


def test_scheduling_metrics_follow_the_stats():
    metrics = ServerMetrics(**LABELS)
    assert _value(metrics, "llm_preemptions_total", mode="swap") == 0
    assert _value(metrics, "llm_degraded") == 0
    metrics.observe_stats(SchedulerStats(
        preemptions=3, preemptions_swap=2, preemptions_recompute=1, swapped_blocks=7,
        degraded=True, thermal_throttles=1, device_temperature_c=81.0,
        num_waiting_by_priority={0: 2, 5: 1}, num_queue_times=2, recent_queue_times=(0.02, 3.0)))
    metrics.observe_stats(SchedulerStats(
        preemptions=4, preemptions_swap=3, preemptions_recompute=1, swapped_blocks=0,
        num_waiting_by_priority={0: 1}, num_queue_times=3, thermal_throttles=1,
        recent_queue_times=(0.02, 3.0, 0.5)))
    assert _value(metrics, "llm_preemptions_total", mode="swap") == 3
    assert _value(metrics, "llm_preemptions_total", mode="recompute") == 1
    assert _value(metrics, "llm_swapped_blocks") == 0
    assert _value(metrics, "llm_degraded") == 0
    assert _value(metrics, "llm_queue_time_seconds_count") == 3
    assert abs(_value(metrics, "llm_queue_time_seconds_sum") - 3.52) < 1e-9
    assert _value(metrics, "llm_requests_waiting_by_priority", priority="0") == 1
    assert _value(metrics, "llm_requests_waiting_by_priority", priority="5") == 0
    assert _value(metrics, "llm_thermal_throttle_total") == 1
    assert _value(metrics, "llm_device_temperature_celsius") == 81.0


def test_priority_labels_stay_bounded_whatever_priorities_clients_send():
    from ferry.server.scheduling_metrics import MAX_PRIORITY_LABELS
    metrics = ServerMetrics(**LABELS)
    metrics.observe_stats(SchedulerStats(num_waiting_by_priority={p: 1 for p in range(1000)}))
    labels = {lab["priority"] for n, lab, _ in _samples(metrics)
              if n == "llm_requests_waiting_by_priority"}
    assert len(labels) == MAX_PRIORITY_LABELS + 1 and "other" in labels
    assert sum(_value(metrics, "llm_requests_waiting_by_priority", priority=x) for x in labels) == 1000
    metrics.observe_stats(SchedulerStats(num_waiting_by_priority={0: 2, 5000: 3}))
    assert _value(metrics, "llm_requests_waiting_by_priority", priority="0") == 2
    assert _value(metrics, "llm_requests_waiting_by_priority", priority="other") == 3
    assert _value(metrics, "llm_requests_waiting_by_priority", priority="7") == 0
