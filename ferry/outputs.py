"""Plain data passed between the stages: scheduler -> runner -> scheduler -> user."""
from __future__ import annotations

from dataclasses import dataclass, field

from ferry.sampling_params import SamplingParams


# ---------------------------------------------------------------- scheduler -> runner
PLACEHOLDER_TOKEN = -1   # a token the previous step samples on the device (async scheduling)


@dataclass
class ScheduledRequest:
    """One request's share of a step.

    ``token_ids`` are the tokens whose KV is computed this step; the first one sits at
    position ``start_pos`` (the request's ``num_computed_tokens`` before the step).
    ``block_ids`` is the request's whole block table. ``sample`` is True when this chunk
    reaches the last known token, so the step produces the next token.
    ``all_token_ids`` is the request's token list (a live reference, read-only for the
    runner) and ``num_prompt_tokens`` splits it; the sampler needs both for penalties.
    The scheduler fills ``eos_token_ids`` from ``Request.eos_token_ids``.
    With async scheduling the last ``num_placeholders`` entries of ``token_ids`` are
    ``PLACEHOLDER_TOKEN``: tokens the previous step is still sampling on the device, which
    the runner fills in there; they are not in ``all_token_ids`` yet either.
    """

    request_id: str
    token_ids: list[int]
    start_pos: int
    block_ids: list[int]
    sample: bool
    sampling_params: SamplingParams
    all_token_ids: list[int]
    num_prompt_tokens: int
    eos_token_ids: tuple[int, ...] = ()   # the request's EOS ids (the sampler masks them under min_tokens)
    num_placeholders: int = 0

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledRequest] = field(default_factory=list)
    # Requests that left the engine since the last step: the runner drops their state.
    finished_request_ids: set[str] = field(default_factory=set)
    preempted_request_ids: set[str] = field(default_factory=set)

    @property
    def num_batched_tokens(self) -> int:
        return sum(s.num_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


# ---------------------------------------------------------------- runner -> scheduler
@dataclass
class TokenLogprobs:
    """Log-probability of the sampled token and the top-k alternatives (id, logprob)."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class RunnerOutput:
    """What a step produced: one new token per request that had ``sample=True``."""

    sampled_token_ids: dict[str, int] = field(default_factory=dict)
    logprobs: dict[str, TokenLogprobs] = field(default_factory=dict)


# ---------------------------------------------------------------- engine -> user
@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None = None
    logprobs: list[TokenLogprobs] | None = None
    finish_reason: str | None = None        # "stop", "length", "abort" or None while running
    stop_reason: int | str | None = None    # the stop string or token id that ended it

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestMetrics:
    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finished_time: float | None = None
    num_cached_tokens: int = 0


@dataclass
class RequestOutput:
    """Cumulative state of one user request (``n`` completions) after a step."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics | None = None


@dataclass
class SchedulerStats:
    """Counters and gauges the scheduler and KV cache keep for the metrics endpoint.

    Counters only grow; gauges describe the moment they are read.
    """

    num_running: int = 0
    num_waiting: int = 0
    kv_cache_usage: float = 0.0            # used blocks / all blocks, 0..1
    prefix_cache_queries: int = 0          # tokens looked up in the prefix cache
    prefix_cache_hits: int = 0             # of those, tokens found
    page_faults: int = 0                   # allocations that evicted a cached block or preempted
    preemptions: int = 0
