"""Preemption in the scheduler: getting blocks for a running request, shrinking the batch
under memory pressure, and taking a victim off the device by swap or recompute. A mixin of
:class:`Scheduler` (``scheduler.py``); the victim and mode rules are ``preemption.py``'s.
Pure Python."""
from __future__ import annotations

from ferry.engine.preemption import Mode, choose_preemption_mode, select_victim
from ferry.engine.step_plan import StepPlan
from ferry.request import Request, RequestStatus


class Preemption:
    """Frees KV blocks by preempting running requests (mixed into ``Scheduler``)."""

    def _allocate_or_preempt(self, request: Request, num_new: int, plan: StepPlan) -> bool:
        """Get blocks for ``request``, preempting running requests no more important than
        it (the victim rule of ``preemption.py``); False if it is itself the victim."""
        while not self.kv_cache_manager.allocate_slots(request, num_new):
            candidates = [r for r in self.running
                          if not (self.by_priority and r.priority < request.priority)]
            victim = select_victim(candidates, self.by_priority)
            self._preempt(victim, plan)
            self._running_preempted = True
            if victim is request:
                return False
        return True

    def _relieve_pressure(self, plan: StepPlan) -> bool:
        """Degradation: update the guard and shrink the batch while it says so."""
        kv = self.kv_cache_manager
        if not self.pressure.update(kv.usage):
            return False
        while self.pressure.must_shrink(kv.usage) and len(self.running) > 1:
            self._preempt(select_victim(self.running, self.by_priority), plan)
        return True

    def _preemption_mode(self, request: Request) -> Mode:
        """Swap or recompute this victim (``preemption_mode``, or the cost estimate)."""
        num_blocks = -(-request.num_computed_tokens // self.kv_cache_manager.block_size)
        room = self.swap.num_free_blocks
        if self.preemption_mode == "recompute" or not 0 < num_blocks <= room:
            return "recompute"
        if self.preemption_mode == "swap":
            return "swap"
        return choose_preemption_mode(
            request.num_computed_tokens, num_blocks, self.kv_block_bytes,
            seconds_per_token=self.costs.seconds_per_token,
            copy_bytes_per_second=self.costs.copy_bytes_per_second, host_blocks_free=room)

    def _preempt(self, request: Request, plan: StepPlan) -> None:
        """Take ``request`` off the device: swap its blocks out or drop them; it waits
        again in its arrival place."""
        self.running.remove(request)
        if request in plan:
            plan.remove(request)
        kv = self.kv_cache_manager
        mode = self._preemption_mode(request)
        if mode == "swap":
            num_blocks = -(-request.num_computed_tokens // kv.block_size)
            blocks = list(kv.get_block_ids(request.request_id)[:num_blocks])
            self._swap_out.extend(self.swap.swap_out(request.request_id, blocks))
        else:
            request.num_lost_tokens += request.num_computed_tokens
            request.num_computed_tokens = 0
        kv.free(request)
        request.status = RequestStatus.PREEMPTED
        request.num_runner_blocks = 0   # the runner drops its table on the preempted id
        request.spec_token_ids = []
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.num_preemptions_by_mode[mode] += 1
        self._preempted_ids.add(request.request_id)
        self.waiting.prepend(request)
