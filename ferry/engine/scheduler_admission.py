"""Waiting-queue admission of the scheduler: the fast-lane pass, the general pass, room by
priority preemption, and where a request (re)starts. A mixin of :class:`Scheduler`
(``scheduler.py``), which owns the state it reads; the rules themselves are
``admission.py``'s. Pure Python."""
from __future__ import annotations

import time

from ferry.engine.admission import MAX_CANDIDATES_PER_PASS
from ferry.engine.preemption import select_victim
from ferry.engine.step_plan import StepPlan
from ferry.request import Request, RequestStatus

# The longest step a long prompt prefilling alone may take (the wait of a short request
# that arrives meanwhile).
LONE_PREFILL_STEP_S = 0.25


class WaitingAdmission:
    """Admits waiting requests into a :class:`StepPlan` (mixed into ``Scheduler``)."""

    def _long_chunk_cap(self, request: Request, plan: StepPlan) -> int:
        """Largest chunk of a long prompt this step. While other requests run or wait, all
        long prefills of a step share ``short_prompt_threshold`` tokens (one chunk), so a
        short prompt waits behind no more than a short prompt's worth of prefill. Alone, it
        takes what the device prefills in ``LONE_PREFILL_STEP_S`` (by the measured cost
        per token): a short request that arrives during that step waits no longer, and a
        fast device still prefills in large steps. The whole budget with the lane off."""
        threshold = self.admission.short_prompt_threshold
        if threshold == 0:
            return self.max_num_batched_tokens
        alone = not self.waiting or (len(self.waiting) == 1 and request in self.waiting)
        alone = alone and all(r is request for r in self.running)
        if alone:
            timed = int(LONE_PREFILL_STEP_S / max(self.costs.seconds_per_token, 1e-9))
            return max(threshold, min(self.max_num_batched_tokens, timed))
        return max(0, threshold - plan.long_prefill_tokens)

    def _admit_fast_lane(self, plan: StepPlan) -> None:
        """Admit short prompts first; keep one prefill slot for a running long prefill or
        for a waiting request the age bound protects (it is tried in the later pass)."""
        threshold = max(self.admission.short_prompt_threshold, 1)
        keep_slot = plan.prefill_parallelism > 1 and (
            any(r.num_tokens - r.num_computed_tokens > threshold
                for r in self.running if r not in plan)
            or any(self.admission.blocks_behind(r)
                   for _, r in zip(range(MAX_CANDIDATES_PER_PASS), self.waiting)))
        plan.prefill_parallelism -= keep_slot
        self._admit_waiting(plan, fast_lane_only=True)
        plan.prefill_parallelism += keep_slot

    def _admit_waiting(self, plan: StepPlan, *, fast_lane_only: bool,
                       outranking_only: bool = False) -> None:
        """Admit waiting requests in queue order while seats, budget and blocks allow; one
        that cannot start is passed over unless the age bound says it blocks the rest.
        ``outranking_only`` (degraded): only requests more urgent than a running one."""
        for looked, request in enumerate(list(self.waiting)):
            if (plan.budget <= 0 or len(self.running) >= self.max_num_seqs
                    or looked >= MAX_CANDIDATES_PER_PASS):
                break
            if outranking_only and not any(r.priority > request.priority for r in self.running):
                continue   # held back by the degradation, not passed over: it does not age
            refusal = self._try_admit(request, plan, fast_lane_only)
            if refusal is None:
                self.admission.admitted(request)
            elif refusal == "by design":
                continue   # its chunk share is used: it is not passed over, it takes turns
            elif refusal == "long":
                self.admission.passed_over(request)   # ages, but an aged one gets a kept
                continue                              # slot instead of blocking the lane
            elif self.admission.blocks_behind(request):
                break
            else:
                self.admission.passed_over(request)
        self.admission.end_pass()

    def _try_admit(self, request: Request, plan: StepPlan, fast_lane_only: bool) -> str | None:
        """Admit ``request`` into the plan: None when it starts, else why not ("by design"
        when the fast lane holds it back on purpose: it does not age then)."""
        if request.num_output_placeholders or not self.admission.allows(request):
            return "waits"   # its last token is still in flight, or a predicate refuses
        kv = self.kv_cache_manager
        swapped = self.swap.is_swapped(request.request_id)
        computed, num_hit = (([], request.num_computed_tokens) if swapped
                             else kv.get_computed_blocks(request))
        if request.sent_to_runner and num_hit > request.num_runner_tokens:
            keep = request.num_runner_tokens // kv.block_size   # the runner lacks the rest
            computed, num_hit = computed[:keep], keep * kv.block_size
        remaining = request.num_tokens - num_hit
        is_prefill = remaining > 1
        is_long = not self.admission.in_fast_lane(remaining)
        if fast_lane_only and is_long:
            return "long"
        if is_prefill and not plan.can_prefill():
            return "no prefill slot"
        num_new = plan.tokens_for(remaining, is_prefill)
        if is_long:
            num_new = min(num_new, self._long_chunk_cap(request, plan))
            if num_new <= 0:
                return "by design"   # the step's long-prefill chunk is taken
        if num_new <= 0:
            return "no budget"
        if (not self._make_room(request, num_new, computed, plan)
                or not kv.allocate_slots(request, num_new, computed)):
            return "no blocks"
        self.waiting.remove(request)
        if swapped:
            k = self.swap.num_swapped_blocks(request.request_id)
            table = kv.get_block_ids(request.request_id)
            self._swap_in.extend(self.swap.swap_in(request.request_id, table[:k]))
        else:
            self._start_from(request, num_hit)
        request.status = RequestStatus.RUNNING
        request.num_bypasses = 0
        self.running.append(request)
        plan.add(request, num_new, is_prefill, is_long)
        return None

    def _make_room(self, request: Request, num_new: int, computed: list[int],
                   plan: StepPlan) -> bool:
        """Enough free blocks for the admission (beyond the reserve), preempting strictly
        lower-priority running requests for it under the priority policy."""
        kv = self.kv_cache_manager
        reserve = self.admission.reserve_for(request)

        def short_by() -> int:
            return kv.blocks_needed(request, num_new, computed) + reserve - kv.num_free_blocks

        if short_by() <= 0:
            return True
        if not self.by_priority:
            return False
        candidates = [r for r in self.running if r.priority > request.priority]
        held = sum(len(kv.get_block_ids(r.request_id)) for r in candidates)
        if held < short_by():
            return False   # preempting them all would not be enough: preempt nobody
        while short_by() > 0 and candidates:
            victim = select_victim(candidates, True)
            candidates.remove(victim)
            self._preempt(victim, plan)
        return short_by() <= 0

    def _start_from(self, request: Request, num_hit: int) -> None:
        """A request starts (or restarts after a recompute preemption) at its cache hit."""
        request.num_computed_tokens = num_hit
        if request.num_lost_tokens:
            self.num_recomputed_tokens += max(0, request.num_lost_tokens - num_hit)
            request.num_lost_tokens = 0
        if request.num_cached_tokens < 0:
            request.num_cached_tokens = num_hit
            self._num_queue_times += 1
            self._queue_times.append(max(0.0, time.monotonic() - request.arrival_time))
