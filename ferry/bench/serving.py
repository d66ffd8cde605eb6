"""The load generator of ``ferry bench serve``: send a workload, time it, summarize it.

Requests are released by an arrival process (Poisson at ``request_rate``, gamma when
``burstiness`` != 1, all at once for ``inf``) and optionally capped at ``max_concurrency``
in flight. Each request is bounded by ``timeout`` and the whole run by ``max_duration``,
so a broken server cannot hang the benchmark.
"""
from __future__ import annotations

import asyncio
import dataclasses
import math
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable

import httpx
import numpy as np

from ferry.bench.client import RequestResult, RequestSpec, send_request
from ferry.bench.datasets import (DatasetOptions, SampleRequest, Workload, build_workload,
                                  fit_to_context)
from ferry.bench.metrics import RequestRecord, summarize
from ferry.bench.server_metrics import metrics_delta, scrape
from ferry.bench.tokens import ServerTokenCounter, load_tokenizer

RESULT_VERSION = 1
ENDPOINTS = {"completions": "/v1/completions", "chat": "/v1/chat/completions"}


@dataclass
class ServeConfig:
    """Everything ``ferry bench serve`` needs; validated on construction."""

    base_url: str = "http://127.0.0.1:8000"
    endpoint: str = "/v1/completions"
    model: str | None = None
    dataset: DatasetOptions = field(default_factory=DatasetOptions)
    tokenizer: str | None = None
    request_rate: float = math.inf
    burstiness: float = 1.0
    max_concurrency: int | None = None
    warmup: int = 0
    timeout: float = 300.0
    max_duration: float | None = None
    temperature: float = 0.0
    ignore_eos: bool = True
    extra_body: dict[str, Any] = field(default_factory=dict)
    api_key: str | None = None
    goodput: dict[str, float] = field(default_factory=dict)
    label: str | None = None
    # The dataset lengths the user left at their defaults: run_serve shrinks them to fit
    # the context the server reports (/v1/models max_model_len). Given lengths stay.
    fit_to_server: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        self.base_url = self.base_url.rstrip("/")
        if not self.base_url.startswith(("http://", "https://")):
            raise ValueError(f"--base-url must start with http:// or https://, got {self.base_url!r}")
        self.endpoint = ENDPOINTS.get(self.endpoint, self.endpoint)
        if not self.endpoint.startswith("/"):
            self.endpoint = "/" + self.endpoint
        if not self.endpoint.endswith("completions"):
            raise ValueError(f"--endpoint must be /v1/completions or /v1/chat/completions "
                             f"(or 'completions' / 'chat'), got {self.endpoint!r}")
        if self.base_url.endswith("/v1") and self.endpoint.startswith("/v1/"):
            self.base_url = self.base_url[:-3]   # accept both http://h:p and http://h:p/v1
        checks = [(self.request_rate > 0, f"--request-rate must be > 0 or inf, got {self.request_rate}"),
                  (self.burstiness > 0, f"--burstiness must be > 0, got {self.burstiness}"),
                  (self.max_concurrency is None or self.max_concurrency >= 1,
                   f"--max-concurrency must be >= 1, got {self.max_concurrency}"),
                  (self.warmup >= 0, f"--warmup must be >= 0, got {self.warmup}"),
                  (self.timeout > 0, f"--timeout must be > 0 seconds, got {self.timeout}"),
                  (self.max_duration is None or self.max_duration > 0,
                   f"--max-duration must be > 0 seconds, got {self.max_duration}"),
                  (self.temperature >= 0, f"--temperature must be >= 0, got {self.temperature}")]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    @property
    def chat(self) -> bool:
        return "chat" in self.endpoint

    @property
    def url(self) -> str:
        return self.base_url + self.endpoint


def arrival_times(num: int, rate: float, burstiness: float, seed: int) -> list[float]:
    """When each request is released, in seconds from the start (first one at 0).

    Gaps are gamma-distributed with mean ``1/rate`` and shape ``burstiness`` (1 = Poisson
    arrivals; below 1 burstier, above 1 more regular). ``rate=inf`` releases all at once.
    """
    if math.isinf(rate):
        return [0.0] * num
    gaps = np.random.default_rng(seed).gamma(burstiness, 1.0 / (rate * burstiness), size=num)
    gaps[0] = 0.0
    return np.cumsum(gaps).tolist()


ProgressHook = Callable[[int, int], None]   # (done, total)


async def run_serve(config: ServeConfig, progress: ProgressHook | None = None) -> dict[str, Any]:
    """Run the benchmark and return the full report (config, summary, raw requests)."""
    limits = httpx.Limits(max_connections=config.max_concurrency, max_keepalive_connections=64)
    timeout = httpx.Timeout(config.timeout, connect=min(config.timeout, 10.0))
    # trust_env=False: measure the server itself, never through a proxy from the environment.
    async with httpx.AsyncClient(limits=limits, timeout=timeout, trust_env=False) as client:
        model, model_note, root, context = await _resolve_model(client, config)
        config, fit_note = _fit_to_server(config, context)
        tokenizer, tok_note = _find_tokenizer(config, model, root)
        options = config.dataset
        workload = _build_workload(config, model, tokenizer, tok_note)
        samples = workload.requests[:options.num_prompts]
        specs = [_spec(config, model, s) for s in workload.requests]
        if config.warmup:
            await _warmup(client, specs[options.num_prompts:], config, tokenizer)
        before = await scrape(client, config.base_url, model)
        records, duration = await _timed_run(client, config, samples,
                                             specs[:options.num_prompts], tokenizer, progress)
        after = await scrape(client, config.base_url, model)
    # Per-tag latency answers the mixed dataset's question (do long prompts block short ones).
    summary = summarize(records, duration, config.goodput or None,
                        by_tag=options.name == "mixed")
    notes = [n for n in (model_note, fit_note) if n] + workload.notes
    return {
        "version": RESULT_VERSION, "kind": "serve",
        "label": config.label or model,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "config": _config_json(config, model),
        "dataset": {"name": options.name, "token_exact": workload.token_exact,
                    "tokenizer": tok_note if tokenizer is not None else None, "notes": notes},
        "summary": summary,
        "server_metrics": metrics_delta(before, after, summary["total_output_tokens"]),
        "requests": [rec.to_json() for rec in records],
    }


# Context kept free of the workload's tokens: special tokens, and a chat template's own.
_RESERVE_TOKENS, _CHAT_TEMPLATE_TOKENS = 32, 64


def _fit_to_server(config: ServeConfig, context: int | None) -> tuple[ServeConfig, str | None]:
    """``config`` with the default lengths fitted to the server's context (a copy: a sweep
    runs the same config at every point), and the note that says so."""
    if not context:
        return config, None
    reserve = _RESERVE_TOKENS + (_CHAT_TEMPLATE_TOKENS if config.chat else 0)
    dataset, note = fit_to_context(config.dataset, context, config.fit_to_server, reserve)
    return dataclasses.replace(config, dataset=dataset), note


def _build_workload(config: ServeConfig, model: str, tokenizer: Any, tok_note: str) -> Workload:
    """The run's prompts plus the warmup ones; without a local tokenizer, lengths are counted
    by the server's /tokenize where it has one."""
    options = DatasetOptions(**{**config.dataset.__dict__,
                                "num_prompts": config.dataset.num_prompts + config.warmup})
    if tokenizer is not None:
        return build_workload(options, tokenizer, tok_note)
    counter = ServerTokenCounter(config.base_url, model, _headers(config),
                                 timeout=min(config.timeout, 10.0))
    try:
        if counter.probe():
            try:
                return build_workload(options, None, tok_note, counter)
            except ValueError as exc:  # /tokenize broke half-way: fall back to words
                tok_note += f"; {exc}"
        return build_workload(options, None, tok_note)
    finally:
        counter.close()


def _headers(config: ServeConfig) -> dict[str, str]:
    return {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}


def _find_tokenizer(config: ServeConfig, model: str, root: str | None) -> tuple[Any, str]:
    """--tokenizer (which must load), else the model name or the server's model dir (local
    directories or the local Hugging Face cache)."""
    if config.tokenizer:
        tokenizer, note = load_tokenizer(config.tokenizer)
        if tokenizer is None:
            raise ValueError(f"--tokenizer: {note}; pass a local directory or a cached hub id")
        return tokenizer, note
    note = "no tokenizer given (--tokenizer)"
    for candidate in dict.fromkeys(c for c in (root, model) if c and c != "unknown"):
        tokenizer, tried = load_tokenizer(candidate)
        if tokenizer is not None:
            return tokenizer, tried
        note += f"; {tried}"
    return None, note


async def _resolve_model(client: httpx.AsyncClient, config: ServeConfig):
    """(model name, note, the model path the server reports as its ``root``, its context
    length ``max_model_len``), the last two None when the server does not say."""
    entries: list[dict[str, Any]] = []
    try:
        resp = await client.get(f"{config.base_url}/v1/models", timeout=min(config.timeout, 10))
        data = resp.json().get("data", []) if resp.status_code == 200 else []
        entries = [e for e in data if isinstance(e, dict) and e.get("id")]
    except (httpx.HTTPError, ValueError, AttributeError, OSError):
        pass
    model = config.model or (entries[0]["id"] if entries else None)
    note = None
    if model is None:
        model, note = "unknown", "no --model given and the server did not list one at /v1/models"
    entry = next((e for e in entries if e["id"] == model), {})
    root, context = entry.get("root"), entry.get("max_model_len")
    return (model, note, root if isinstance(root, str) else None,
            context if isinstance(context, int) and context > 0 else None)


def _spec(config: ServeConfig, model: str, sample: SampleRequest) -> RequestSpec:
    return RequestSpec(url=config.url, model=model, prompt=sample.prompt,
                       max_tokens=sample.output_len, chat=config.chat,
                       temperature=config.temperature, ignore_eos=config.ignore_eos,
                       extra_body=config.extra_body, headers=_headers(config),
                       timeout=config.timeout)


async def _warmup(client: httpx.AsyncClient, specs: list[RequestSpec], config: ServeConfig,
                  tokenizer: Any) -> None:
    """Send the warmup requests (not measured), at most ``max_concurrency`` at a time."""
    limit = asyncio.Semaphore(config.max_concurrency or len(specs))

    async def one(spec: RequestSpec) -> None:
        async with limit:
            await send_request(client, spec, tokenizer)

    await asyncio.gather(*(one(spec) for spec in specs))


async def _timed_run(client, config: ServeConfig, samples: list[SampleRequest],
                     specs: list[RequestSpec], tokenizer: Any,
                     progress: ProgressHook | None) -> tuple[list[RequestRecord], float]:
    """Release the requests on schedule; returns their records and the run's duration."""
    schedule = arrival_times(len(samples), config.request_rate, config.burstiness,
                             config.dataset.seed)
    limit = asyncio.Semaphore(config.max_concurrency) if config.max_concurrency else None
    records = [RequestRecord(i, s.prompt_len, s.output_len, RequestResult(), s.tag, schedule[i])
               for i, s in enumerate(samples)]
    done = 0
    start = time.perf_counter()
    deadline = start + config.max_duration if config.max_duration else math.inf

    async def one(rec: RequestRecord, spec: RequestSpec) -> None:
        nonlocal done
        if limit is not None:
            await limit.acquire()
        try:
            sent = time.perf_counter()
            rec.result = await send_request(client, spec, tokenizer)
            rec.result.start_time = sent - start
        finally:
            if limit is not None:
                limit.release()
            done += 1
            if progress:
                progress(done, len(records))

    tasks = []
    for rec, spec in zip(records, specs):
        wait = min(start + rec.scheduled_time, deadline) - time.perf_counter()
        if wait > 0:
            await asyncio.sleep(wait)
        if time.perf_counter() >= deadline:
            break
        tasks.append(asyncio.create_task(one(rec, spec)))
    if tasks:
        await asyncio.wait(tasks, timeout=max(deadline - time.perf_counter(), 0)
                           if config.max_duration else None)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    duration = time.perf_counter() - start
    _mark_unfinished(records, config.max_duration)
    return records, duration


def _mark_unfinished(records: list[RequestRecord], max_duration: float | None) -> None:
    for rec in records:
        if not rec.result.success and rec.result.error_kind is None:
            rec.result.fail("cancelled", f"not finished within --max-duration {max_duration:g} s"
                            if max_duration else "cancelled before it finished")


def _config_json(config: ServeConfig, model: str) -> dict[str, Any]:
    out = {k: v for k, v in config.__dict__.items() if k not in ("dataset", "api_key")}
    out.update(model=model, dataset=config.dataset.__dict__, url=config.url,
               api_key="***" if config.api_key else None)
    out["request_rate"] = "inf" if math.isinf(config.request_rate) else config.request_rate
    return out
