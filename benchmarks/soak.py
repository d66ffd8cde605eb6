"""Soak ``ferry serve`` on the bundled demo model: minutes of mixed, checkable load.

Starts ``python -m ferry serve --port P`` (no model: the demo model) as a subprocess and,
for ``--duration`` seconds (600 by default), sends a mix of streaming and non-streaming
requests to ``/v1/chat/completions`` and ``/v1/completions`` at a concurrency that cycles
1 -> 4 -> 16 -> 8 (one phase per minute; shorter phases for a shorter run). Some streaming
clients hang up after a few chunks; now and then a bad request is sent (bad JSON, unknown
model, negative max_tokens, a 20 MB body), which must get a 4xx.

Every request is a demo task ("What is 48+76?", "Reverse: kitchen", "Uppercase: kitchen",
from ``ferry.demo.tasks``) at temperature 0, and every completed answer is checked.
Every 10 s the server's VmRSS is read and ``/metrics`` scraped. Criteria, checked once the
load has stopped and the server is idle:

  - no 5xx and no unexpected status or transport error on a good request;
  - every bad request answered 4xx;
  - every completed (not disconnected) answer correct;
  - no leaked KV blocks: ``llm_kv_cache_usage_ratio`` 0 with nothing running or waiting;
  - RSS growth <= 5%: the median of the 2 minutes after a 4-minute warm-up (one full cycle
    of the concurrency phases) against the median of the last 2 minutes (windows scaled by
    duration / 600 for a shorter run).

    python benchmarks/soak.py --duration 600 --json benchmarks/results/soak_cpu.json

Exits 1 when a criterion fails. Only 127.0.0.1 is contacted; every loop is bounded.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))

from ferry.demo.tasks import Problem, check, make_problems  # noqa: E402

CONCURRENCY_CYCLE = (1, 4, 16, 8)
REQUEST_TIMEOUT_S = 120.0
MAX_TOKENS = 16
DISCONNECT_SHARE = 0.15       # of streaming requests: hang up after a few chunks
BAD_REQUEST_KINDS = ("bad_json", "unknown_model", "negative_max_tokens", "oversized_body")
OVERSIZED_BYTES = 20 * 1024 * 1024
RSS_GROWTH_LIMIT = 0.05


def completion_prompt(problem: Problem) -> str:
    """The demo chat template, rendered for /v1/completions (the server adds <s>)."""
    return f"<|user|>{problem.question}<|end|><|assistant|>"


@dataclass
class SoakStats:
    requests: dict[str, int] = field(default_factory=dict)       # "chat/stream" -> count
    completed: int = 0
    correct: int = 0
    wrong: list[dict] = field(default_factory=list)
    disconnects: int = 0
    status_counts: dict[str, int] = field(default_factory=dict)  # good requests
    unexpected: list[dict] = field(default_factory=list)         # non-200 / transport errors
    bad_requests: dict[str, dict[str, int]] = field(default_factory=dict)  # kind -> code -> n
    server_errors: int = 0                                       # 5xx, any request
    latencies_s: list[float] = field(default_factory=list)

    def count(self, table: dict, key: str) -> None:
        table[key] = table.get(key, 0) + 1

    def summary(self) -> dict:
        lat = sorted(self.latencies_s)
        return {
            "requests_by_kind": dict(sorted(self.requests.items())),
            "requests_total": sum(self.requests.values()),
            "completed_checked": self.completed, "correct": self.correct,
            "wrong": self.wrong[:20], "wrong_count": len(self.wrong),
            "disconnects": self.disconnects,
            "status_counts": dict(sorted(self.status_counts.items())),
            "unexpected": self.unexpected[:20], "unexpected_count": len(self.unexpected),
            "bad_requests": self.bad_requests, "server_errors_5xx": self.server_errors,
            "latency_s": ({"p50": lat[len(lat) // 2], "p99": lat[min(len(lat) - 1,
                                                                      int(len(lat) * 0.99))],
                           "max": lat[-1]} if lat else None),
        }


# ---------------------------------------------------------------------------------------
# one request of each sort

def _request_body(problem: Problem, endpoint: str, stream: bool) -> dict:
    # No "model": the server's own (any other name is a 404).
    body: dict = {"max_tokens": MAX_TOKENS, "temperature": 0.0, "stream": stream}
    if endpoint == "chat":
        body["messages"] = problem.messages
    else:
        body["prompt"] = completion_prompt(problem)
    return body


def _path(endpoint: str) -> str:
    return "/v1/chat/completions" if endpoint == "chat" else "/v1/completions"


def _text_of_choice(endpoint: str, choice: dict, stream: bool) -> str:
    if endpoint == "chat":
        part = choice.get("delta" if stream else "message") or {}
        return part.get("content") or ""
    return choice.get("text") or ""


async def good_request(client: httpx.AsyncClient, stats: SoakStats, problem: Problem,
                       endpoint: str, stream: bool, disconnect_after: int | None) -> None:
    kind = f"{endpoint}/{'stream' if stream else 'plain'}"
    if disconnect_after is not None:
        kind += "+disconnect"
    stats.count(stats.requests, kind)
    body = _request_body(problem, endpoint, stream)
    start = time.monotonic()
    try:
        if not stream:
            response = await client.post(_path(endpoint), json=body)
            _record_status(stats, response.status_code)
            if response.status_code != 200:
                stats.unexpected.append({"kind": kind, "status": response.status_code,
                                         "body": response.text[:300]})
                return
            text = _text_of_choice(endpoint, response.json()["choices"][0], False)
        else:
            pieces: list[str] = []
            chunks = 0
            async with client.stream("POST", _path(endpoint), json=body) as response:
                _record_status(stats, response.status_code)
                if response.status_code != 200:
                    await response.aread()
                    stats.unexpected.append({"kind": kind, "status": response.status_code,
                                             "body": response.text[:300]})
                    return
                async for line in response.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    data = line[len("data: "):]
                    if data == "[DONE]":
                        break
                    event = json.loads(data)
                    if "error" in event:
                        stats.unexpected.append({"kind": kind, "status": "stream-error",
                                                 "body": data[:300]})
                        return
                    for choice in event.get("choices", []):
                        pieces.append(_text_of_choice(endpoint, choice, True))
                    chunks += 1
                    if disconnect_after is not None and chunks >= disconnect_after:
                        break   # leaving the block closes the connection mid-stream
            if disconnect_after is not None:
                stats.disconnects += 1
                return
            text = "".join(pieces)
    except (httpx.HTTPError, json.JSONDecodeError, KeyError) as exc:
        stats.unexpected.append({"kind": kind, "status": "error",
                                 "body": f"{type(exc).__name__}: {exc}"[:300]})
        return
    stats.latencies_s.append(time.monotonic() - start)
    stats.completed += 1
    if check(problem, text):
        stats.correct += 1
    else:
        stats.wrong.append({"kind": kind, "question": problem.question,
                            "answer": problem.answer, "got": text})


def _record_status(stats: SoakStats, code: int) -> None:
    stats.count(stats.status_counts, str(code))
    if code >= 500:
        stats.server_errors += 1


async def bad_request(client: httpx.AsyncClient, stats: SoakStats, which: str) -> None:
    good = {"messages": [{"role": "user", "content": "What is 1+2?"}], "max_tokens": 4}
    path = "/v1/chat/completions"
    try:
        if which == "bad_json":
            response = await client.post(path, content=b'{"messages": [',
                                         headers={"Content-Type": "application/json"})
        elif which == "unknown_model":
            response = await client.post(path, json={**good, "model": "no-such-model"})
        elif which == "negative_max_tokens":
            response = await client.post("/v1/completions",
                                         json={"prompt": "What is 1+2?", "max_tokens": -5})
        else:
            status = await oversized_request(str(client.base_url))
            response = None
        status = response.status_code if response is not None else status
        code = str(status)
        if status >= 500:
            stats.server_errors += 1
    except (httpx.HTTPError, OSError, ValueError, asyncio.TimeoutError) as exc:
        code = f"error:{type(exc).__name__}"
    table = stats.bad_requests.setdefault(which, {})
    table[code] = table.get(code, 0) + 1


async def oversized_request(base_url: str) -> int:
    """POST a 20 MB JSON body to /v1/completions on a raw socket; returns the status code.

    The server answers 413 from the Content-Length alone and closes the connection, which
    an HTTP client still writing the body reports as a read or write error; so the headers
    are sent first and the body (written in pieces) only if no answer comes in 2 s."""
    host_port = base_url.split("://", 1)[1].rstrip("/")
    host, port = host_port.rsplit(":", 1)
    payload = json.dumps({"prompt": "a" * OVERSIZED_BYTES, "max_tokens": 4}).encode()
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write((f"POST /v1/completions HTTP/1.1\r\nHost: {host_port}\r\n"
                      "Content-Type: application/json\r\n"
                      f"Content-Length: {len(payload)}\r\n\r\n").encode())
        await writer.drain()
        status_line = asyncio.ensure_future(asyncio.wait_for(reader.readline(), 60))
        # The server may answer from the headers alone; it then closes the connection, and
        # bytes still arriving would make the kernel reset it before the answer is read.
        await asyncio.wait([status_line], timeout=2.0)
        step = 256 * 1024
        for offset in range(0, len(payload), step):
            if status_line.done():
                break
            try:
                writer.write(payload[offset:offset + step])
                await writer.drain()
            except (ConnectionError, OSError):
                break
        line = (await status_line).decode("latin-1")
        return int(line.split()[1])
    finally:
        writer.close()


# ---------------------------------------------------------------------------------------
# the load

async def run_load(base_url: str, duration: float, *, seed: int = 0,
                   phase_s: float | None = None, bad_every_s: float | None = None,
                   cycle: tuple[int, ...] = CONCURRENCY_CYCLE,
                   on_tick: Callable[[float], None] | None = None,
                   tick_s: float = 10.0) -> SoakStats:
    """Mixed load against ``base_url`` for ``duration`` seconds; returns its counts.

    ``on_tick(t)`` is called every ``tick_s`` seconds (t: seconds since the start)."""
    phase_s = phase_s or max(2.0, min(60.0, duration / 10))
    bad_every_s = bad_every_s or max(1.0, min(30.0, duration / 20))
    rng = random.Random(f"soak/{seed}")
    problems = make_problems(3000, seed, "train")
    stats = SoakStats()
    start = time.monotonic()
    end = start + duration

    def target() -> int:
        return cycle[int((time.monotonic() - start) // phase_s) % len(cycle)]

    limits = httpx.Limits(max_connections=max(cycle) + 8, max_keepalive_connections=max(cycle))
    timeout = httpx.Timeout(REQUEST_TIMEOUT_S, connect=10.0)
    async with httpx.AsyncClient(base_url=base_url, limits=limits, timeout=timeout) as client, \
            httpx.AsyncClient(base_url=base_url, timeout=timeout) as bad_client:

        async def worker(index: int) -> None:
            while time.monotonic() < end:
                if index >= target():
                    await asyncio.sleep(0.2)
                    continue
                problem = problems[rng.randrange(len(problems))]
                endpoint = rng.choice(("chat", "completions"))
                stream = rng.random() < 0.5
                disconnect = rng.randint(1, 3) if stream and rng.random() < DISCONNECT_SHARE \
                    else None
                await good_request(client, stats, problem, endpoint, stream, disconnect)

        async def bad_loop() -> None:
            turn = 0
            while time.monotonic() < end:
                await bad_request(bad_client, stats, BAD_REQUEST_KINDS[turn % 4])
                turn += 1
                await asyncio.sleep(min(bad_every_s, max(0.0, end - time.monotonic())))

        async def ticker() -> None:
            next_tick = start
            while time.monotonic() < end:
                if on_tick is not None:
                    on_tick(time.monotonic() - start)
                next_tick += tick_s
                await asyncio.sleep(max(0.0, min(next_tick, end) - time.monotonic()))

        await asyncio.gather(*(worker(i) for i in range(max(cycle))), bad_loop(), ticker())
    return stats


# ---------------------------------------------------------------------------------------
# samples: RSS and /metrics

def scrape_metrics(base_url: str) -> dict[str, float]:
    wanted = ("llm_kv_cache_usage_ratio", "llm_requests_running", "llm_requests_waiting")
    text = httpx.get(base_url + "/metrics", timeout=10).text
    values: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in wanted:
            values[name] = values.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
    return values


def wait_idle(base_url: str, timeout: float = 60.0) -> dict[str, float]:
    """Poll /metrics until nothing runs or waits (bounded); returns the last scrape."""
    deadline = time.monotonic() + timeout
    metrics = scrape_metrics(base_url)
    while time.monotonic() < deadline:
        if metrics.get("llm_requests_running", 0) == 0 and \
                metrics.get("llm_requests_waiting", 0) == 0 and \
                metrics.get("llm_kv_cache_usage_ratio", 0) == 0:
            break
        time.sleep(0.5)
        metrics = scrape_metrics(base_url)
    return metrics


# One full cycle of the load's concurrency phases (1 -> 4 -> 16 -> 8, a minute each):
# the baseline window then follows a period in which every phase, and so the peak number
# of blocks in use, has been seen once.
WARMUP_S = 240.0


def rss_growth(samples: list[dict], duration: float) -> dict:
    scale = duration / 600.0
    warmup, window = WARMUP_S * scale, 120.0 * scale
    first = [s["rss_mib"] for s in samples if warmup <= s["t_s"] <= warmup + window]
    last = [s["rss_mib"] for s in samples if s["t_s"] >= duration - window]
    if not first or not last:
        return {"warmup_s": warmup, "window_s": window, "growth": None}
    a, b = statistics.median(first), statistics.median(last)
    return {"warmup_s": warmup, "window_s": window, "first_window_median_mib": round(a, 1),
            "last_window_median_mib": round(b, 1), "first_n": len(first), "last_n": len(last),
            "growth": round(b / a - 1, 4)}


# ---------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    from serve_harness import machine, rss_bytes, served

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=600.0, help="seconds of load")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="write the result here")
    parser.add_argument("--serve-flag", action="append", default=[],
                        help="extra flag for ferry serve (repeatable)")
    args = parser.parse_args(argv)

    tick_s = max(1.0, min(10.0, args.duration / 60))
    samples: list[dict] = []
    info = machine()
    with served(args.serve_flag) as (proc, base_url):
        rss_start = rss_bytes(proc.pid) / 2**20

        def sample(t: float) -> None:
            try:
                metrics = scrape_metrics(base_url)
            except httpx.HTTPError as exc:
                metrics = {"error": str(exc)}
            samples.append({"t_s": round(t, 1), "rss_mib": round(rss_bytes(proc.pid) / 2**20, 1),
                            **metrics})
            print(f"  t={t:6.1f}s rss={samples[-1]['rss_mib']:8.1f} MiB {metrics}", flush=True)

        wall_start = time.time()
        stats = asyncio.run(run_load(base_url, args.duration, seed=args.seed,
                                     on_tick=sample, tick_s=tick_s))
        load_s = time.time() - wall_start
        sample(args.duration)
        idle = wait_idle(base_url)
        rss_end = rss_bytes(proc.pid) / 2**20
        info["uptime_end"] = machine()["uptime"]

    summary = stats.summary()
    growth = rss_growth(samples, args.duration)
    rss_values = [s["rss_mib"] for s in samples]
    bad_codes_ok = all(code.isdigit() and 400 <= int(code) < 500
                       for table in stats.bad_requests.values() for code in table)
    criteria = {
        "no_5xx": stats.server_errors == 0,
        "no_unexpected_status_or_error": not stats.unexpected,
        "bad_requests_all_4xx": bad_codes_ok and len(stats.bad_requests) == 4,
        "all_outputs_correct": stats.completed > 0 and stats.correct == stats.completed,
        "no_leaked_kv_blocks": idle.get("llm_kv_cache_usage_ratio", 1) == 0
        and idle.get("llm_requests_running", 1) == 0 and idle.get("llm_requests_waiting", 1) == 0,
        "rss_growth_le_5pct": growth["growth"] is not None
        and growth["growth"] <= RSS_GROWTH_LIMIT,
    }
    result = {
        "benchmark": "soak", "duration_s": args.duration, "load_wall_s": round(load_s, 1),
        "seed": args.seed, "concurrency_cycle": list(CONCURRENCY_CYCLE),
        "phase_s": max(2.0, min(60.0, args.duration / 10)), "sample_every_s": tick_s,
        "serve_flags": args.serve_flag, "machine": info, **summary,
        "idle_metrics_at_end": idle,
        "rss_mib": {"at_start": round(rss_start, 1), "at_end_idle": round(rss_end, 1),
                    "min": min(rss_values), "max": max(rss_values),
                    "median": statistics.median(rss_values), **growth},
        "samples": samples, "criteria": criteria, "passed": all(criteria.values()),
    }
    print(json.dumps({k: v for k, v in result.items() if k != "samples"}, indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    print("PASSED" if result["passed"] else
          "FAILED: " + ", ".join(k for k, ok in criteria.items() if not ok))
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
