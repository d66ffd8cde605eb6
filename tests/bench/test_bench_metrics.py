"""The summary's arithmetic on hand-made request records, arrivals, and /metrics parsing."""
from __future__ import annotations

import math

import numpy as np
import pytest

from ferry.bench.client import RequestResult
from ferry.bench.metrics import RequestRecord, parse_goodput, summarize
from ferry.bench.server_metrics import metrics_delta, parse_metrics
from ferry.bench.serving import arrival_times


def _ok(start, ttft, latency, tokens, itl, prompt=10, expected=None, tag=None, server_prompt=None):
    result = RequestResult(success=True, start_time=start, ttft=ttft, latency=latency,
                           output_tokens=tokens, itl=itl, server_prompt_tokens=server_prompt)
    return RequestRecord(0, prompt, expected or tokens, result, tag)


def _failed(kind, message):
    return RequestRecord(0, 10, 5, RequestResult().fail(kind, message))


def test_summary_matches_hand_computed_values():
    records = [_ok(0.0, 0.1, 0.5, 5, [0.1, 0.1, 0.1, 0.1]),
               _ok(0.2, 0.3, 1.3, 11, [0.1] * 10, prompt=20),
               _ok(0.4, 0.2, 0.2, 1, [], server_prompt=13),
               _failed("timeout", "too slow"), _failed("timeout", "again"),
               _failed("http_500", "boom")]
    s = summarize(records, duration=2.0, slo={"ttft": 250, "tpot": 95})
    assert (s["num_requests"], s["completed"], s["failed"]) == (6, 3, 3)
    assert s["total_input_tokens"] == 10 + 20 + 13       # the server's count wins when given
    assert s["total_output_tokens"] == 17
    assert s["request_throughput"] == pytest.approx(1.5)
    assert s["output_throughput"] == pytest.approx(8.5)
    assert s["total_token_throughput"] == pytest.approx(30.0)
    assert s["ttft_ms"]["mean"] == pytest.approx(200.0)
    assert s["ttft_ms"]["median"] == pytest.approx(200.0)
    assert s["e2el_ms"]["max"] == pytest.approx(1300.0)
    # TPOT excludes the first token: (0.5-0.1)/4 and (1.3-0.3)/10; a 1-token reply has none.
    assert s["tpot_ms"]["mean"] == pytest.approx(100.0)
    assert s["itl_ms"]["mean"] == pytest.approx(100.0)
    # ttft <= 250 and tpot <= 95: #1 fails on tpot (100), #2 on ttft (300), #3 (no tpot) is good.
    assert s["goodput"]["good_requests"] == 1
    assert s["goodput"]["request_goodput"] == pytest.approx(0.5)
    assert s["errors"] == {"timeout": {"count": 2, "example": "too slow"},
                           "http_500": {"count": 1, "example": "boom"}}
    # In flight: [0, 0.5), [0.2, 1.5), [0.4, 0.6) -> at most 3 at t=0.45.
    assert s["max_concurrent_requests"] == 3


def test_goodput_counts_requests_meeting_every_slo():
    records = [_ok(0, 0.1, 0.5, 5, [0.1] * 4),     # ttft 100, tpot 100
               _ok(0, 0.3, 0.7, 5, [0.1] * 4),     # ttft 300, tpot 100
               _ok(0, 0.1, 0.3, 5, [0.05] * 4)]    # ttft 100, tpot 50
    s = summarize(records, 1.0, {"ttft": 200, "tpot": 75})
    assert s["goodput"]["good_requests"] == 1
    assert summarize(records, 2.0, {"ttft": 200})["goodput"]["request_goodput"] == 1.0
    assert summarize(records, 2.0, {"e2el": 400})["goodput"]["good_requests"] == 1
    assert summarize(records, 1.0)["goodput"] is None


def test_percentiles_follow_linear_interpolation():
    records = [_ok(0, t / 1000, 1.0, 2, [0.5]) for t in range(1, 101)]   # TTFT 1..100 ms
    s = summarize(records, 10.0)
    assert s["ttft_ms"]["median"] == pytest.approx(50.5)
    assert s["ttft_ms"]["p90"] == pytest.approx(90.1)
    assert s["ttft_ms"]["p99"] == pytest.approx(99.01)


def test_by_tag_breakdown_and_short_outputs():
    records = [_ok(0, 0.1, 0.5, 5, [0.1] * 4, tag="short"),
               _ok(0, 0.9, 1.5, 3, [0.3] * 2, expected=5, tag="long")]
    s = summarize(records, 1.0)
    assert s["by_tag"]["long"]["ttft_ms"]["mean"] == pytest.approx(900.0)
    assert s["by_tag"]["short"]["completed"] == 1
    assert s["requests_with_fewer_output_tokens"] == 1


def test_empty_run_has_no_statistics():
    s = summarize([_failed("connect", "refused")], 0.1)
    assert s["completed"] == 0 and s["ttft_ms"]["p99"] is None and s["output_throughput"] == 0


def test_parse_goodput_accepts_the_documented_forms():
    assert parse_goodput(["ttft:500", "tpot:50"]) == {"ttft": 500.0, "tpot": 50.0}
    assert parse_goodput(["ttft:500 e2el:2000"]) == {"ttft": 500.0, "e2el": 2000.0}
    for bad in (["ttft"], ["ttft:x"], ["foo:1"], ["tpot:-1"]):
        with pytest.raises(ValueError):
            parse_goodput(bad)


def test_poisson_and_gamma_arrivals_have_the_asked_mean_and_spread():
    for shape in (1.0, 0.25, 4.0):
        times = arrival_times(20001, rate=5.0, burstiness=shape, seed=0)
        gaps = np.diff(times)
        assert gaps.mean() == pytest.approx(0.2, rel=0.05)
        # Gamma gaps: squared coefficient of variation = 1 / shape.
        assert (gaps.std() / gaps.mean()) ** 2 == pytest.approx(1 / shape, rel=0.1)
    assert arrival_times(4, math.inf, 1.0, 0) == [0.0] * 4
    assert arrival_times(5, 2.0, 1.0, 7) == arrival_times(5, 2.0, 1.0, 7)


METRICS_PAGE = """\
# TYPE llm_kv_cache_hit_ratio gauge
llm_kv_cache_hit_ratio{model="a",quant_type="none",gpu_vendor="cpu"} 0.25
llm_kv_cache_hit_ratio{model="b",quant_type="none",gpu_vendor="cpu"} 0.9
# TYPE llm_energy_joules counter
llm_energy_joules_total{model="a",quant_type="none",gpu_vendor="cpu"} 1000.0
# TYPE llm_preemptions counter
llm_preemptions_total{model="a",quant_type="none",gpu_vendor="cpu"} 2.0
# TYPE other_metric gauge
other_metric 5
"""


def test_metrics_page_is_read_for_the_benchmarked_model():
    before = parse_metrics(METRICS_PAGE, "a")
    assert before == {"llm_kv_cache_hit_ratio": 0.25, "llm_energy_joules_total": 1000.0,
                      "llm_preemptions_total": 2.0}
    after = dict(before, llm_kv_cache_hit_ratio=0.5, llm_energy_joules_total=1200.0)
    delta = metrics_delta(before, after, output_tokens=400)
    assert delta["prefix_cache_hit_ratio_change"] == pytest.approx(0.25)
    assert delta["energy_joules"] == pytest.approx(200.0)
    assert delta["output_tokens_per_joule"] == pytest.approx(2.0)
    assert delta["llm_preemptions_delta"] == 0
    assert "prefix_cache_hit_ratio_during_run_est" not in delta   # no prompt-token counter
    assert parse_metrics("other_metric 1\n") is None
    assert metrics_delta(None, after, 1) is None


def test_run_hit_ratio_is_recovered_from_the_since_start_gauge():
    # 1000 prompt tokens before with 100 hits; the run adds 500 tokens with 400 hits.
    before = {"llm_kv_cache_hit_ratio": 100 / 1000, "llm_prompt_tokens_total": 1000.0}
    after = {"llm_kv_cache_hit_ratio": 500 / 1500, "llm_prompt_tokens_total": 1500.0}
    delta = metrics_delta(before, after, output_tokens=10)
    assert delta["prefix_cache_hit_ratio_during_run_est"] == pytest.approx(0.8)
    assert delta["prefix_cache_hit_ratio_change"] == pytest.approx(500 / 1500 - 0.1)
    exact = metrics_delta({**before, "llm_prefix_cache_queries_total": 0,
                           "llm_prefix_cache_hits_total": 0},
                          {**after, "llm_prefix_cache_queries_total": 400,
                           "llm_prefix_cache_hits_total": 100}, output_tokens=10)
    assert exact["prefix_cache_hit_ratio_during_run"] == pytest.approx(0.25)


def test_energy_is_summed_where_reported_and_absent_otherwise():
    def record(i, energy):
        result = RequestResult(success=True, ttft=0.1, latency=0.5, output_tokens=10,
                               energy_joules=energy)
        return RequestRecord(i, 5, 10, result)

    summary = summarize([record(0, 2.0), record(1, 3.0)], duration=1.0)
    assert summary["energy_joules"] == 5.0 and summary["output_tokens_per_joule"] == 4.0
    assert record(0, 2.0).to_json()["energy_joules"] == 2.0
    plain = summarize([record(0, None)], duration=1.0)
    assert "energy_joules" not in plain and "energy_joules" not in record(0, None).to_json()
