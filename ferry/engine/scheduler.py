"""Scheduler: which requests run this step and how many of their tokens.

The one rule (DESIGN.md §1): there are no separate prefill and decode phases. Each request
has ``num_computed_tokens``; every step gives each running request a share of one token
budget (``max_num_batched_tokens``) until it catches up with ``num_tokens``. Chunked
prefill, prefix-cache hits and preemption by recompute are all that rule:

- a step is planned in four passes (``StepPlan``): running decodes and short prefills,
  most important first (the waiting queue's ``sort_key``); waiting requests of the fast
  lane (``admission.py``: at most ``short_prompt_threshold`` uncached tokens); chunks of
  the running long prefills from what budget is left; then any waiting request. Waiting
  requests start from their longest cached prefix, in queue order, without head-of-line
  blocking but with an age bound (``admission.py``);
- at most ``prefill_parallelism`` requests get more than one token in a step, so a burst
  of long prompts does not starve the decodes;
- when a running request cannot get blocks, a running request no more important than it
  is preempted (``preemption.py``: lowest priority, then least computed work, possibly
  itself); a waiting request of higher priority preempts strictly lower-priority running
  ones. A victim either swaps its blocks to host memory (``swap.py``) and resumes where it
  was, or drops them and recomputes prompt + outputs so far, whichever the cost estimate
  prefers. It waits again in its arrival place. No request is admitted in a step whose
  running requests preempted;
- past ``memory_pressure_threshold`` the scheduler is degraded (``degradation.py``): no
  admissions, and the batch shrinks by preemption until usage is back under control.
  Under the priority policy a waiting request more urgent than a running one is still
  admitted (taking room from less urgent ones if needed): degradation never makes an
  urgent request wait for the less urgent ones to finish.

``schedule()`` advances ``num_computed_tokens`` of the scheduled requests at once (the
runner's step is taken as done) and registers their full blocks in the prefix cache; the
next ``schedule()`` may then hit them. ``update_from_output()`` appends the sampled tokens
and applies the stop conditions. This module is pure Python (no torch).

Async scheduling (``async_scheduling=True``): step N+1 is scheduled while step N still runs
on the device, so the tokens N samples are not known yet. Each request that samples in a
step gets a placeholder (``Request.num_output_placeholders``) that counts as a token to
compute: it decodes in N+1 with ``PLACEHOLDER_TOKEN`` as input, which the runner fills in
from N's sampled tokens on the device. ``update_from_output(N)`` then turns the placeholder
into the real token. A request whose token in flight ends it by length is not scheduled
again; one that stops on EOS computes one wasted token. A request preempted while its
token is in flight still gets that token, and is not re-admitted before it has it.

Multi-token steps (speculative decoding): a decoding request with ``spec_token_ids`` gets
them scheduled after its last token, within the budget, the context and ``max_tokens``.
The runner returns the drafts it accepted plus one token; ``update_from_output`` appends
them (stop conditions after each) and rolls ``num_computed_tokens`` back over the rejected
drafts, freeing blocks that only held them. Drafts are not scheduled with async
scheduling: the next step would need the number accepted before it is known.

``SchedulerOutput`` is plain data the runner may receive in another process: a request's
prompt and sampling parameters go out once (``new_requests``), later steps send deltas
(this step's tokens, new block ids, preempted and finished ids).
"""
from __future__ import annotations

import time
from collections import Counter, deque
from collections.abc import Iterable

from ferry.config import CacheConfig, SchedulerConfig
from ferry.engine.admission import AdmissionPolicy
from ferry.engine.degradation import PressureGuard
from ferry.engine.kv_cache_manager import KVCacheManager
from ferry.engine.preemption import PreemptionCosts
from ferry.engine.request_queue import create_request_queue
from ferry.engine.scheduler_admission import WaitingAdmission
from ferry.engine.scheduler_preemption import Preemption
from ferry.engine.step_plan import StepPlan
from ferry.engine.stop_conditions import append_tokens
from ferry.engine.swap import SwapSpace
from ferry.outputs import (PLACEHOLDER_TOKEN, NewRequest, RunnerOutput, ScheduledRequest,
                           SchedulerOutput, SchedulerStats)
from ferry.request import Request, RequestStatus

_QUEUE_TIMES_KEPT = 1024


class Scheduler(WaitingAdmission, Preemption):
    """Token-budget scheduler over a paged KV cache with automatic prefix caching.

    The orchestrator: ``schedule`` runs the passes, ``scheduler_admission.py`` admits
    waiting requests and ``scheduler_preemption.py`` frees blocks.

    Finished requests leave the scheduler: ``get_request`` returns None for them, and
    their ids are reported once in the next ``SchedulerOutput.finished_request_ids``.
    """

    def __init__(self, config: SchedulerConfig, cache: CacheConfig, *, max_model_len: int,
                 num_blocks: int, async_scheduling: bool = False, num_host_blocks: int = 0,
                 kv_block_bytes: int = 0, costs: PreemptionCosts | None = None) -> None:
        """``max_model_len``, ``num_blocks``, ``num_host_blocks`` (swap space) and
        ``kv_block_bytes`` are the resolved run-time values; ``async_scheduling`` the
        resolved choice (``auto`` decided by the device); ``costs`` the measurements the
        swap-or-recompute choice reads (the engine updates them)."""
        for name, value in [("max_model_len", max_model_len), ("num_blocks", num_blocks)]:
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"Scheduler {name} must be an integer >= 1, got {value!r}")
        self.max_num_seqs = config.max_num_seqs
        self.max_num_batched_tokens = config.max_num_batched_tokens
        self.max_model_len = max_model_len
        self.prefill_parallelism = config.prefill_parallelism
        self.async_scheduling = async_scheduling
        self.by_priority = config.scheduling_policy == "priority"
        self.preemption_mode = config.preemption_mode
        block_size, enable_prefix_caching = cache.block_size, cache.enable_prefix_caching
        self.kv_cache_manager = KVCacheManager(num_blocks, block_size, enable_prefix_caching)
        self.swap = SwapSpace(num_host_blocks)
        self.kv_block_bytes = kv_block_bytes
        self.costs = costs or PreemptionCosts()
        self.admission = AdmissionPolicy(config.short_prompt_threshold, config.max_queue_bypasses,
                                         config.reserved_blocks_for_priority)
        self.pressure = PressureGuard(config.memory_pressure_threshold)
        self.waiting = create_request_queue(config.scheduling_policy)
        self.running: list[Request] = []
        self.num_preemptions = 0
        self.num_preemptions_by_mode: dict[str, int] = {"swap": 0, "recompute": 0}
        self.num_recomputed_tokens = 0
        self.prefill_throttled = False   # the thermal guard's lower prefill limits
        self._num_queue_times = 0
        self._queue_times: deque[float] = deque(maxlen=_QUEUE_TIMES_KEPT)
        self._requests: dict[str, Request] = {}
        self._finished_ids: set[str] = set()
        self._preempted_ids: set[str] = set()
        self._swap_out: list[tuple[int, int]] = []
        self._swap_in: list[tuple[int, int]] = []
        self._running_preempted = False
        # The KV cache can hold num_blocks * block_size tokens: a sequence that outgrows it
        # ends with "length" just as one reaching max_model_len does.
        self._kv_capacity = num_blocks * block_size
        self._max_len = min(max_model_len, self._kv_capacity + 1)

    # ------------------------------------------------------------------ requests in and out
    def add_request(self, request: Request) -> None:
        """Queue a new request. Raises ``ValueError`` if it can never be served."""
        if request.request_id in self._requests:
            raise ValueError(f"request id {request.request_id!r} is already in use")
        if request.num_tokens == 0:
            raise ValueError(f"request {request.request_id!r} has an empty prompt")
        if request.num_tokens >= self.max_model_len:
            raise ValueError(f"request {request.request_id!r} has {request.num_tokens} prompt "
                             f"tokens, which leaves no room to generate within max_model_len="
                             f"{self.max_model_len}; shorten the prompt")
        if request.num_tokens > self._kv_capacity:
            raise ValueError(f"request {request.request_id!r} has {request.num_tokens} prompt "
                             f"tokens but the KV cache holds only {self._kv_capacity}; shorten "
                             "the prompt or give the KV cache more memory")
        request.status = RequestStatus.WAITING
        self._requests[request.request_id] = request
        self.waiting.add(request)

    def finish_requests(self, request_ids: str | Iterable[str], status: RequestStatus) -> None:
        """End requests now (abort, stop string) and free their blocks; unknown ids are ignored."""
        if not status.finished:
            raise ValueError(f"finish_requests needs a finished status, got {status}")
        if isinstance(request_ids, str):
            request_ids = (request_ids,)
        now = time.monotonic()
        for request_id in request_ids:
            request = self._requests.get(request_id)
            if request is None:
                continue
            if request.status is RequestStatus.RUNNING:
                self.running.remove(request)
            else:
                self.waiting.remove(request)
            self._finish(request, status, now)

    def has_unfinished_requests(self) -> bool:
        return bool(self.running) or bool(self.waiting)

    def num_unfinished_requests(self) -> int:
        return len(self.running) + len(self.waiting)

    def has_host_tokens_in_flight(self, grammar_overlaps: bool = False) -> bool:
        """True when a request whose logits processors read its output tokens (penalties,
        a grammar) waits for a token still being sampled: that step must be finished
        first. ``grammar_overlaps``: the engine computes a grammar's mask while the next
        step runs (deferred sampling), so a grammar alone does not count."""
        def reads(params) -> bool:
            return params.has_penalties if grammar_overlaps else params.reads_output_tokens
        return any(request.num_output_placeholders and reads(request.sampling_params)
                   for request in self.running)

    def get_request(self, request_id: str) -> Request | None:
        """A waiting or running request; None once it finished."""
        return self._requests.get(request_id)

    def get_stats(self) -> SchedulerStats:
        """Gauges now and counters so far; page faults = cache evictions + preemptions."""
        kv = self.kv_cache_manager
        return SchedulerStats(
            num_running=len(self.running), num_waiting=len(self.waiting),
            kv_cache_usage=kv.usage, prefix_cache_queries=kv.prefix_cache_queries,
            prefix_cache_hits=kv.prefix_cache_hits,
            page_faults=kv.page_faults + self.num_preemptions,
            preemptions=self.num_preemptions,
            preemptions_swap=self.num_preemptions_by_mode["swap"],
            preemptions_recompute=self.num_preemptions_by_mode["recompute"],
            recomputed_tokens=self.num_recomputed_tokens,
            swapped_blocks=self.swap.num_used_blocks, degraded=self.pressure.degraded,
            thermal_throttled=self.prefill_throttled,
            num_waiting_by_priority=dict(Counter(r.priority for r in self.waiting)),
            num_queue_times=self._num_queue_times, recent_queue_times=tuple(self._queue_times))

    def add_admission_predicate(self, predicate) -> None:
        """A condition ``request -> bool`` every admission must meet (e.g. a free adapter
        slot); a refused request waits without holding up the ones behind it."""
        self.admission.add_predicate(predicate)

    # ------------------------------------------------------------------ one step
    def schedule(self) -> SchedulerOutput:
        """Choose this step's requests and token counts (see the module docstring)."""
        self.running.sort(key=self.waiting.sort_key)
        prefill_budget = self.max_num_batched_tokens // 4 if self.prefill_throttled else None
        parallelism = 1 if self.prefill_throttled else self.prefill_parallelism
        plan = StepPlan(self.max_num_batched_tokens, parallelism, prefill_budget)
        self._running_preempted = False
        degraded = self._relieve_pressure(plan)
        self._schedule_running(plan, long_prefills=False)
        if not degraded and not self._running_preempted:
            self._admit_fast_lane(plan)
        self._schedule_running(plan, long_prefills=True)
        # Degraded: only a request more urgent than a running one starts (priority wins).
        if (not degraded or self.by_priority) and not self._running_preempted:
            self._admit_waiting(plan, fast_lane_only=False, outranking_only=degraded)
        output = SchedulerOutput(finished_request_ids=self._finished_ids,
                                 preempted_request_ids=self._preempted_ids,
                                 swap_out=self._swap_out, swap_in=self._swap_in)
        output.scheduled = [self._commit(request, n, output) for request, n in plan.items()]
        self._finished_ids, self._preempted_ids = set(), set()
        self._swap_out, self._swap_in = [], []
        self.swap.end_step()
        return output

    def update_from_output(self, scheduler_output: SchedulerOutput,
                           runner_output: RunnerOutput) -> list[tuple[Request, list[int]]]:
        """Append each request's sampled tokens and apply the stop conditions after each.

        Returns (request, tokens appended) for the requests that got tokens this step,
        including those it finished. Requests finished since the step was scheduled are
        skipped. (With async scheduling a request may have been preempted since: it still
        gets its token.)
        """
        now = time.monotonic()
        updated: list[tuple[Request, list[int]]] = []
        any_finished = False
        for scheduled in scheduler_output.scheduled:
            request = self._requests.get(scheduled.request_id)
            if not scheduled.sample or request is None:
                continue
            if self.async_scheduling:
                request.num_output_placeholders -= 1
            token_ids = runner_output.sampled_token_ids.get(scheduled.request_id)
            if not token_ids:
                continue
            self._roll_back_rejected(request, scheduled, len(token_ids))
            request.spec_token_ids = runner_output.spec_token_ids.get(request.request_id, [])
            appended, status = append_tokens(request, token_ids, self._max_len)
            if request.first_token_time is None:
                request.first_token_time = now
            if status is not None:
                if request.status is not RequestStatus.RUNNING:
                    self.waiting.remove(request)   # preempted while its token was in flight
                self._finish(request, status, now)
                any_finished = True
            updated.append((request, appended))
        if any_finished:
            self.running = [request for request in self.running if not request.is_finished]
        return updated

    def _roll_back_rejected(self, request: Request, scheduled: ScheduledRequest,
                            num_sampled: int) -> None:
        """Drafts past the ``num_sampled - 1`` accepted ones have no valid KV: take them off
        ``num_computed_tokens`` and free the blocks that only they used."""
        num_rejected = len(scheduled.spec_token_ids) - (num_sampled - 1)
        if num_rejected <= 0:
            return
        request.num_computed_tokens -= num_rejected
        self.kv_cache_manager.trim(request, request.num_computed_tokens + 1)
        request.num_runner_blocks = min(request.num_runner_blocks,
                                        len(self.kv_cache_manager.get_block_ids(request.request_id)))

    # ------------------------------------------------------------------ running requests
    def _schedule_running(self, plan: StepPlan, *, long_prefills: bool) -> None:
        """Shares of the running requests: decodes and fast-lane prefills in the first
        pass, chunks of long prefills (beyond ``short_prompt_threshold``) in the second."""
        for request in list(self.running):
            if plan.budget <= 0:
                return
            if request in plan or request.status is not RequestStatus.RUNNING:
                continue   # planned, or preempted earlier in this pass
            remaining = (request.num_tokens + request.num_output_placeholders
                         - request.num_computed_tokens)
            is_prefill = remaining > 1
            is_long = is_prefill and not self.admission.in_fast_lane(remaining)
            if (remaining <= 0 or is_long != long_prefills
                    or (is_prefill and not plan.can_prefill())
                    or self._must_wait_for_token_in_flight(request)):
                continue
            num_new = plan.tokens_for(remaining + self._num_drafts(request, remaining), is_prefill)
            if is_long:
                num_new = min(num_new, self._long_chunk_cap(request, plan))
            if num_new > 0 and self._allocate_or_preempt(request, num_new, plan):
                plan.add(request, num_new, is_prefill, is_long)

    def _num_drafts(self, request: Request, remaining: int) -> int:
        """Draft tokens to verify this step: only for a decode, synchronously, and no more
        than the context and ``max_tokens`` leave room for (each accepted one is a token)."""
        if not request.spec_token_ids or remaining != 1 or self.async_scheduling:
            return 0
        room = self._max_len - request.num_tokens - 1
        max_tokens = request.sampling_params.max_tokens
        if max_tokens is not None:
            room = min(room, max_tokens - request.num_output_tokens - 1)
        return max(0, min(len(request.spec_token_ids), room))

    # ------------------------------------------------------------------ the message
    def _commit(self, request: Request, num_new: int, output: SchedulerOutput) -> ScheduledRequest:
        """Describe the request's share for the runner and advance it as if computed."""
        start = request.num_computed_tokens
        num_known = min(num_new, request.num_tokens + request.num_output_placeholders - start)
        token_ids = request.all_token_ids[start:start + num_known]
        # Only async scheduling leaves tokens unknown; they come last (one decode token).
        num_placeholders = num_known - len(token_ids)
        token_ids.extend([PLACEHOLDER_TOKEN] * num_placeholders)
        sample = start + num_known == request.num_tokens + request.num_output_placeholders
        if not request.sent_to_runner:
            output.new_requests.append(NewRequest(request.request_id, request.prompt_token_ids,
                                                  request.sampling_params, request.eos_token_ids,
                                                  lora_id=request.lora_id))
            request.sent_to_runner = True
        table = self.kv_cache_manager.get_block_ids(request.request_id)
        scheduled = ScheduledRequest(
            request_id=request.request_id,
            token_ids=token_ids,
            start_pos=start,
            sample=sample,
            new_block_ids=table[request.num_runner_blocks:],
            num_kept_blocks=request.num_runner_blocks,
            num_placeholders=num_placeholders,
            spec_token_ids=request.spec_token_ids[:num_new - num_known])
        request.num_runner_blocks = len(table)
        request.num_runner_tokens = start + len(token_ids) + len(scheduled.spec_token_ids)
        request.num_computed_tokens = start + num_new
        if sample and self.async_scheduling:
            request.num_output_placeholders += 1
        self.kv_cache_manager.cache_full_blocks(request)
        return scheduled

    # ------------------------------------------------------------------ helpers
    def _must_wait_for_token_in_flight(self, request: Request) -> bool:
        """True when ``request`` cannot take a step before its token in flight is known:
        that token ends it by length anyway, or a step is already ahead of it (the engine
        keeps one step in flight, so a request has at most one placeholder when scheduled).
        """
        pending = request.num_output_placeholders
        if not pending:
            return False
        max_tokens = request.sampling_params.max_tokens
        return (pending > 1
                or (max_tokens is not None and request.num_output_tokens + pending >= max_tokens)
                or request.num_tokens + pending >= self._max_len)

    def _finish(self, request: Request, status: RequestStatus, now: float) -> None:
        """Mark finished and free its blocks (device and host); the caller removes it from
        running/waiting."""
        request.status = status
        request.finished_time = now
        self.kv_cache_manager.free(request)
        self.swap.discard(request.request_id)
        del self._requests[request.request_id]
        self._finished_ids.add(request.request_id)
