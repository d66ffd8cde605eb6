"""Priorities: a waiting urgent request preempts, the victim rule, the place kept, the
reserve. Fake runner outputs from ``test_scheduler``."""
from ferry.engine.preemption import select_victim
from ferry.engine.request_queue import FCFSQueue
from test_scheduler import (FakeRunner, assert_all_blocks_free, make_request, make_scheduler,
                            prompt_of, reference_generate, run)


def step(scheduler, runner):
    output = scheduler.schedule()
    scheduler.update_from_output(output, runner.execute(output))
    return output


def fill_with_low_priority(scheduler, runner, lengths, priorities):
    requests = [make_request(f"low{i}", prompt_of(n, i), priority=p, max_tokens=20)
                for i, (n, p) in enumerate(zip(lengths, priorities))]
    for request in requests:
        scheduler.add_request(request)
    step(scheduler, runner)
    return requests


def test_waiting_urgent_request_preempts_the_least_urgent_running_one():
    scheduler = make_scheduler(num_blocks=8, block_size=4, scheduling_policy="priority",
                               short_prompt_threshold=0)
    runner = FakeRunner(scheduler)
    low = fill_with_low_priority(scheduler, runner, [7, 7, 7], [1, 3, 2])   # 6 of 8 blocks
    urgent = make_request("urgent", prompt_of(12, 9), priority=0, max_tokens=4)  # 3 blocks
    scheduler.add_request(urgent)
    output = step(scheduler, runner)
    assert output.preempted_request_ids == {"low1"}          # priority 3: the least urgent
    assert "urgent" in {s.request_id for s in output.scheduled}
    run(scheduler, runner)
    for request in low + [urgent]:
        assert request.output_token_ids == reference_generate(
            request.prompt_token_ids, request.sampling_params.max_tokens)
    assert_all_blocks_free(scheduler)


def test_urgent_request_does_not_preempt_equal_priority_or_when_it_would_not_help():
    scheduler = make_scheduler(num_blocks=8, block_size=4, scheduling_policy="priority",
                               short_prompt_threshold=0)
    runner = FakeRunner(scheduler)
    fill_with_low_priority(scheduler, runner, [7, 7, 7], [0, 0, 1])
    # Needs 7 blocks: 2 free + 2 held by the one lower-priority request are not enough.
    scheduler.add_request(make_request("big", prompt_of(26, 9), priority=0, max_tokens=1))
    output = step(scheduler, runner)
    assert not output.preempted_request_ids
    assert "big" not in {s.request_id for s in output.scheduled}


def test_fcfs_policy_never_preempts_for_a_waiting_request():
    scheduler = make_scheduler(num_blocks=8, block_size=4, scheduling_policy="fcfs",
                               short_prompt_threshold=0)
    runner = FakeRunner(scheduler)
    fill_with_low_priority(scheduler, runner, [7, 7, 7], [5, 5, 5])
    scheduler.add_request(make_request("urgent", prompt_of(12, 9), priority=0, max_tokens=4))
    assert not step(scheduler, runner).preempted_request_ids


def test_victim_is_lowest_priority_then_least_computed_work():
    a = make_request("a", prompt_of(4, 1), priority=2)
    b = make_request("b", prompt_of(4, 2), priority=2)
    c = make_request("c", prompt_of(4, 3), priority=1)
    a.num_computed_tokens, b.num_computed_tokens, c.num_computed_tokens = 30, 10, 1
    assert select_victim([a, b, c], by_priority=True) is b
    assert select_victim([a, c], by_priority=True) is a
    # FCFS: priorities do not count, the least work does.
    assert select_victim([a, b, c], by_priority=False) is c
    # Ties on work: the latest arrival.
    b.num_computed_tokens = 30
    assert select_victim([a, b], by_priority=True) is b


def test_running_preemption_picks_the_victim_that_wastes_least():
    """Two running requests of the least urgent priority: the one with less computed work
    goes, though it arrived first."""
    scheduler = make_scheduler(num_blocks=9, block_size=4, scheduling_policy="priority",
                               short_prompt_threshold=0)
    runner = FakeRunner(scheduler)
    small = make_request("small", prompt_of(4, 1), priority=5, max_tokens=20)
    scheduler.add_request(small)
    step(scheduler, runner)
    big = make_request("big", prompt_of(16, 2), priority=5, max_tokens=20)
    keeper = make_request("keeper", prompt_of(12, 3), priority=0, max_tokens=20)
    scheduler.add_request(big)
    scheduler.add_request(keeper)
    preempted = set()
    for _ in range(12):
        preempted |= step(scheduler, runner).preempted_request_ids
        if preempted:
            break
    assert preempted == {"small"}
    run(scheduler, runner)
    for request in (small, big, keeper):
        assert request.output_token_ids == reference_generate(request.prompt_token_ids, 20)


def test_fcfs_queue_puts_a_preempted_request_back_at_its_arrival_place():
    queue = FCFSQueue()
    early, mid, late = (make_request(n, [1]) for n in ("early", "mid", "late"))
    queue.add(early)
    queue.add(late)
    queue.prepend(mid)             # preempted; it arrived between the two
    assert [r.request_id for r in queue] == ["early", "mid", "late"]


def test_reserved_blocks_are_left_for_an_urgent_request():
    scheduler = make_scheduler(num_blocks=8, block_size=4, scheduling_policy="priority",
                               reserved_blocks_for_priority=3, short_prompt_threshold=0)
    runner = FakeRunner(scheduler)
    normal = [make_request(f"n{i}", prompt_of(5, i), max_tokens=3) for i in range(4)]
    for request in normal:
        scheduler.add_request(request)
    output = step(scheduler, runner)
    # Each holds 2 blocks for good; a third admission would leave fewer than 3 free.
    assert [s.request_id for s in output.scheduled] == ["n0", "n1"]
    assert scheduler.kv_cache_manager.num_free_blocks == 4
    urgent = make_request("urgent", prompt_of(8, 9), priority=-1, max_tokens=3)
    scheduler.add_request(urgent)
    output = step(scheduler, runner)
    assert "urgent" in {s.request_id for s in output.scheduled}
    assert not output.preempted_request_ids
    run(scheduler, runner)
    for request in normal + [urgent]:
        assert request.output_token_ids == reference_generate(request.prompt_token_ids, 3)
    assert_all_blocks_free(scheduler)
