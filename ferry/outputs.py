"""Plain data passed between the stages: scheduler -> runner -> scheduler -> user."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ferry.sampling_params import SamplingParams


# ---------------------------------------------------------------- scheduler -> runner
PLACEHOLDER_TOKEN = -1   # a token the previous step samples on the device (async scheduling)


@dataclass
class NewRequest:
    """What the runner keeps about a request, sent once: the first step that schedules it.

    The runner holds the request's state (tokens, block table, generator) from then on,
    until its id comes back in ``SchedulerOutput.finished_request_ids``.
    """

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    eos_token_ids: tuple[int, ...] = ()   # masked while the request is below min_tokens
    lora_id: int | None = None            # the LoRA adapter it runs with (None: base model)


@dataclass
class ScheduledRequest:
    """One request's share of a step, as a delta on what the runner already holds.

    ``token_ids`` are the known tokens whose KV is computed this step; the first sits at
    position ``start_pos`` (the request's ``num_computed_tokens`` before the step). Its
    ``spec_token_ids`` (draft tokens to verify) follow them in the same forward.
    ``sample`` is True when ``token_ids`` reach the request's last token: the step then
    samples the next token, and one more after each draft (the runner keeps the drafts
    that match and the token after the last match).
    Block table: the runner keeps the first ``num_kept_blocks`` entries of its copy and
    appends ``new_block_ids`` (a rollback or a preemption shrinks it, growth appends).
    Tokens: the runner's copy is cut at ``start_pos`` and this step's tokens appended,
    which also drops drafts that were rejected.
    With async scheduling the last ``num_placeholders`` entries of ``token_ids`` are
    ``PLACEHOLDER_TOKEN``: tokens the step before is still sampling on the device; the
    runner fills them in there.
    """

    request_id: str
    token_ids: list[int]
    start_pos: int
    sample: bool
    new_block_ids: list[int] = field(default_factory=list)
    num_kept_blocks: int = 0
    num_placeholders: int = 0
    spec_token_ids: list[int] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        """Tokens whose KV this step computes: known ones and drafts."""
        return len(self.token_ids) + len(self.spec_token_ids)


@dataclass
class GrammarBitmask:
    """The allowed next tokens of a step's constrained requests: row ``i`` of ``bitmask``
    (a numpy (K, ceil(V / 32)) int32 array; bit ``t % 32`` of word ``t // 32`` set = token
    ``t`` allowed) is for ``request_ids[i]``. A request that verifies k drafts has k + 1
    consecutive rows, one per sampled position (row j: after its first j drafts). Built on
    the host by the engine."""

    request_ids: list[str]
    bitmask: Any


@dataclass
class SchedulerOutput:
    """One step, as plain data (it pickles): everything the runner learns comes in here."""

    scheduled: list[ScheduledRequest] = field(default_factory=list)
    new_requests: list[NewRequest] = field(default_factory=list)
    # Requests that left the engine since the last step: the runner drops their state.
    finished_request_ids: set[str] = field(default_factory=set)
    # Requests preempted since the last step: the runner drops their block table.
    preempted_request_ids: set[str] = field(default_factory=set)
    # KV block copies the runner makes before this step's forward, in this order:
    # (device block, host block) pairs out to host memory, then (host block, device block)
    # pairs back in. A host block freed by a swap-in is not reused before the next step.
    swap_out: list[tuple[int, int]] = field(default_factory=list)
    swap_in: list[tuple[int, int]] = field(default_factory=list)
    # Structured output: the masks of the constrained requests that sample this step.
    grammar_bitmask: GrammarBitmask | None = None

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
    """What a step produced for each request that had ``sample=True``: its new tokens (one,
    or with drafts the accepted ones plus the next), their logprobs when asked for, and
    draft tokens proposed for its next step."""

    sampled_token_ids: dict[str, list[int]] = field(default_factory=dict)
    logprobs: dict[str, list[TokenLogprobs]] = field(default_factory=dict)
    spec_token_ids: dict[str, list[int]] = field(default_factory=dict)
    # Attention debug trace of traced requests: per traced position, per layer and head
    # (runner/attention_tracing.py); empty in every step without one.
    attention_traces: dict[str, list[dict]] = field(default_factory=dict)


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
    # Tokens generated so far: a DELTA output's ``token_ids`` (and ``text``, ``logprobs``)
    # hold only what is new, this counts them all. Left None, it is ``len(token_ids)``.
    num_generated_tokens: int | None = None

    def __post_init__(self) -> None:
        if self.num_generated_tokens is None:
            self.num_generated_tokens = len(self.token_ids)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def add_delta(self, later: "CompletionOutput") -> None:
        """Append the next DELTA output of the same completion to this one."""
        self.text += later.text
        self.token_ids.extend(later.token_ids)
        if later.logprobs is not None:
            self.logprobs = (self.logprobs or []) + later.logprobs
        self.cumulative_logprob = later.cumulative_logprob
        self.finish_reason, self.stop_reason = later.finish_reason, later.stop_reason
        self.num_generated_tokens = later.num_generated_tokens


@dataclass
class RequestMetrics:
    arrival_time: float
    first_token_time: float | None = None
    finished_time: float | None = None
    num_cached_tokens: int = 0


@dataclass
class RequestOutput:
    """One user request (``n`` completions) after a step: its state so far, or with
    ``RequestOutputKind.DELTA`` only what changed (just the completions that advanced, each
    with its new text, tokens and logprobs)."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics | None = None
    # Joules spent on it so far (its share of each step's tokens, all n samples); None
    # where the hardware reports no energy.
    energy_joules: float | None = None
    debug_trace: dict | None = None   # the attention trace, on the finished output of a traced request

    def add_delta(self, later: "RequestOutput") -> None:
        """Fold the next DELTA output of this request into this one: a reader that fell
        behind by several steps reads them as one."""
        mine = {c.index: c for c in self.outputs}
        for completion in later.outputs:
            if completion.index in mine:
                mine[completion.index].add_delta(completion)
            else:
                self.outputs.append(completion)
        self.outputs.sort(key=lambda c: c.index)
        self.finished, self.metrics = later.finished, later.metrics
        self.energy_joules = later.energy_joules
        self.debug_trace = later.debug_trace if later.debug_trace is not None else self.debug_trace


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
    preemptions_swap: int = 0              # of those, by swapping KV to host memory
    preemptions_recompute: int = 0         # of those, by dropping KV (recomputed later)
    recomputed_tokens: int = 0             # tokens recomputed after recompute preemptions
    swapped_blocks: int = 0                # host KV blocks held by swapped-out requests
    degraded: bool = False                 # memory pressure: no admissions, batch shrinks
    thermal_throttled: bool = False        # thermal/power guard lowered the prefill budget
    thermal_throttles: int = 0             # times the guard engaged
    device_temperature_c: float | None = None
    num_waiting_by_priority: dict[int, int] = field(default_factory=dict)
    num_queue_times: int = 0               # admissions so far (each has a queue time)
    recent_queue_times: tuple[float, ...] = ()   # seconds waited, the last admissions' (<= 1024)
    energy_joules: float | None = None     # joules attributed to steps so far (None: no reading)
