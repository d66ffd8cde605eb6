"""The scheduler's admission predicate as LoRA uses it: a request whose adapter has no free
device slot waits, the requests behind it (base model or resident adapters) go ahead, and
it is admitted as soon as a slot frees; the outputs are the unconstrained run's."""
from __future__ import annotations

from ferry.lora.registry import LoRARegistry
from test_scheduler import (FakeRunner, assert_all_blocks_free, make_request, make_scheduler,
                            prompt_of, reference_generate, run)


def _with_lora(request, lora_id):
    request.lora_name, request.lora_id = (None, None) if lora_id is None else (f"a{lora_id}", lora_id)
    return request


def test_request_without_a_slot_waits_without_blocking_others():
    scheduler = make_scheduler()
    registry = LoRARegistry(max_loras=1)
    scheduler.add_admission_predicate(lambda r: registry.admits(r, scheduler.running))
    plan = [("a", 1, 12), ("b", 2, 4), ("c", None, 4), ("d", 1, 4), ("e", 2, 4)]
    requests = {rid: _with_lora(make_request(rid, prompt_of(6, i), max_tokens=n), lora)
                for i, (rid, lora, n) in enumerate(plan)}
    for request in requests.values():
        scheduler.add_request(request)
    runner = FakeRunner(scheduler)
    first = scheduler.schedule()
    assert {s.request_id for s in first.scheduled} == {"a", "c", "d"}   # b, e wait for slot 2
    assert [r.request_id for r in scheduler.waiting] == ["b", "e"]       # their order is kept
    scheduler.update_from_output(first, runner.execute(first))
    seen_together = set()
    for output in run(scheduler, runner):
        ids = {s.request_id for s in output.scheduled}
        adapters = {requests[i].lora_id for i in ids} - {None}
        assert len(adapters) <= 1, f"two adapters in one step with max_loras=1: {ids}"
        seen_together |= {frozenset(ids)}
    for rid, (_, _, n) in zip(requests, plan):
        prompt = requests[rid].prompt_token_ids
        assert requests[rid].output_token_ids == reference_generate(prompt, n)
    assert any({"b", "e"} <= set(ids) for ids in seen_together)
    assert_all_blocks_free(scheduler)
