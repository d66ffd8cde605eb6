"""Scheduler and request queues, driven by a fake runner with a simulated paged KV cache.

The fake runner writes each scheduled token id into the slot its block table names and
samples the next token from the tokens it reads back through the block table. A wrong
block table, a bad prefix-cache hit or a broken recompute after preemption therefore
changes the generated tokens, which are compared with a straightforward reference loop.
"""
import itertools
import random

import pytest

from ferry.config import EngineConfig
from ferry.engine.request_queue import create_request_queue
from ferry.engine.scheduler import Scheduler
from ferry.outputs import RunnerOutput, SchedulerOutput
from ferry.request import Request, RequestStatus
from ferry.runner.request_states import RequestStates
from ferry.sampling_params import SamplingParams


def next_token(tokens):
    """The fake model: a deterministic function of the whole sequence."""
    value = 17
    for token in tokens:
        value = (value * 31 + token) % 1_000_003
    return value % 97


def reference_generate(prompt, max_tokens):
    tokens = list(prompt)
    for _ in range(max_tokens):
        tokens.append(next_token(tokens))
    return tokens[len(prompt):]


class FakeRunner:
    """Writes token ids into a simulated KV cache and samples from what it reads back.

    Like the real runner it knows the requests only from the messages (``RequestStates``):
    block tables and tokens are rebuilt from the deltas, so a wrong delta changes tokens.
    """

    def __init__(self, scheduler: Scheduler):
        self.scheduler = scheduler
        manager = scheduler.kv_cache_manager
        self.block_size = manager.block_size
        self.kv = [[None] * manager.block_size for _ in range(manager.num_blocks)]
        # The host pool of swapped-out blocks, copied like the real runner's host tensor.
        self.host = [[None] * manager.block_size for _ in range(scheduler.swap.num_blocks)]
        self.states = RequestStates()

    def slot(self, block_ids, pos):
        return block_ids[pos // self.block_size], pos % self.block_size

    def execute(self, output: SchedulerOutput) -> RunnerOutput:
        pool = self.scheduler.kv_cache_manager.block_pool
        for device, host in output.swap_out:       # swap-outs first, then swap-ins
            self.host[host] = list(self.kv[device])
        for host, device in output.swap_in:
            self.kv[device] = list(self.host[host])
            self.host[host] = [None] * self.block_size   # a stale read would show
        states = self.states.update(output)
        written = {}
        for s, state in zip(output.scheduled, states):   # KV of the whole batch is written first
            self.check_state(s, state)
            assert len(state.block_ids) * self.block_size >= s.start_pos + s.num_tokens
            for offset, token in enumerate(s.token_ids + s.spec_token_ids):
                block, index = self.slot(state.block_ids, s.start_pos + offset)
                assert pool.ref_count(block) == 1, "writing into a shared block"
                assert written.setdefault(block, s.request_id) == s.request_id
                self.kv[block][index] = token
        sampled = {}
        for s, state in zip(output.scheduled, states):
            if s.sample:
                sampled[s.request_id] = self.sample(s, state)
        return RunnerOutput(sampled_token_ids=sampled)

    def check_state(self, s, state):
        """What the runner rebuilt from the deltas is the scheduler's own view."""
        request = self.scheduler.get_request(s.request_id)
        assert state.block_ids == self.scheduler.kv_cache_manager.get_block_ids(s.request_id)
        # With async scheduling the host may not know the step's last token yet.
        known = min(s.start_pos + len(s.token_ids), request.num_tokens)
        assert state.token_ids[:known] == request.all_token_ids[:known]
        assert state.token_ids[s.start_pos:] == s.token_ids + s.spec_token_ids
        assert state.num_prompt_tokens == request.num_prompt_tokens

    def sample(self, s, state):
        """The next token after the last known one, and after each draft that matched."""
        end = s.start_pos + len(s.token_ids)
        tokens = []
        for j in range(len(s.spec_token_ids) + 1):
            seen = [self.kv[b][i] for b, i in
                    (self.slot(state.block_ids, p) for p in range(end + j))]
            tokens.append(next_token(seen))
            if j < len(s.spec_token_ids) and s.spec_token_ids[j] != tokens[-1]:
                break
        return tokens


def make_scheduler(**overrides):
    args = dict(max_num_seqs=8, max_num_batched_tokens=64, max_model_len=512, num_blocks=64,
                block_size=4, prefill_parallelism=4, memory_pressure_threshold=1.0)
    args.update(overrides)
    config = EngineConfig.from_flat(**{k: v for k, v in args.items() if k not in _RUNTIME})
    return Scheduler(config.scheduler, config.cache,
                     **{k: v for k, v in args.items() if k in _RUNTIME})


_RUNTIME = ("max_model_len", "num_blocks", "async_scheduling", "num_host_blocks",
            "kv_block_bytes", "costs")


_clock = itertools.count()


def make_request(request_id, prompt, max_tokens=6, priority=0, eos=(), **params):
    return Request(request_id, list(prompt), SamplingParams(max_tokens=max_tokens, **params),
                   eos_token_ids=tuple(eos), arrival_time=float(next(_clock)), priority=priority)


def prompt_of(length, seed):
    return [(seed * 13 + i * 7) % 50 for i in range(length)]


def check_step(scheduler, output):
    assert output.num_batched_tokens <= scheduler.max_num_batched_tokens
    assert len(output.scheduled) <= scheduler.max_num_seqs
    assert len(scheduler.running) <= scheduler.max_num_seqs
    assert sum(len(s.token_ids) > 1 for s in output.scheduled) <= scheduler.prefill_parallelism
    assert len({s.request_id for s in output.scheduled}) == len(output.scheduled)


def run(scheduler, runner=None, max_steps=500):
    """Step until every request finished; returns the SchedulerOutputs."""
    runner = runner or FakeRunner(scheduler)
    outputs = []
    while scheduler.has_unfinished_requests():
        assert len(outputs) < max_steps, "scheduler made no progress"
        output = scheduler.schedule()
        check_step(scheduler, output)
        scheduler.update_from_output(output, runner.execute(output))
        outputs.append(output)
    return outputs


def assert_all_blocks_free(scheduler):
    pool = scheduler.kv_cache_manager.block_pool
    assert all(pool.ref_count(b) == 0 for b in range(pool.num_blocks))
    assert pool.num_free_blocks == pool.num_blocks
    assert scheduler.get_stats().kv_cache_usage == 0.0
    scheduler.swap.end_step()
    assert scheduler.swap.num_used_blocks == 0
    assert scheduler.swap.num_free_blocks == scheduler.swap.num_blocks


# ---------------------------------------------------------------- whole runs
def test_unconstrained_run_matches_reference_and_frees_every_block():
    scheduler = make_scheduler()
    requests = [make_request(f"r{i}", prompt_of(5 + 3 * i, i), max_tokens=4 + i) for i in range(5)]
    for request in requests:
        scheduler.add_request(request)
    run(scheduler)
    for request in requests:
        assert request.output_token_ids == reference_generate(request.prompt_token_ids,
                                                              request.sampling_params.max_tokens)
        assert request.status is RequestStatus.FINISHED_LENGTH
        assert request.first_token_time is not None and request.finished_time is not None
    assert_all_blocks_free(scheduler)
    assert scheduler.get_request("r0") is None


def test_budget_and_seats_are_respected_every_step():
    scheduler = make_scheduler(max_num_seqs=3, max_num_batched_tokens=10)
    for i in range(7):
        scheduler.add_request(make_request(f"r{i}", prompt_of(13, i), max_tokens=5))
    outputs = run(scheduler)          # check_step asserts the limits on every step
    assert max(len(o.scheduled) for o in outputs) == 3
    assert max(o.num_batched_tokens for o in outputs) == 10
    assert_all_blocks_free(scheduler)


def test_long_prompt_is_prefilled_in_chunks():
    scheduler = make_scheduler(max_num_batched_tokens=16)
    request = make_request("long", prompt_of(50, 1), max_tokens=2)
    scheduler.add_request(request)
    outputs = run(scheduler)
    shares = [(s.start_pos, s.num_tokens, s.sample) for o in outputs for s in o.scheduled]
    assert shares == [(0, 16, False), (16, 16, False), (32, 16, False), (48, 2, True),
                      (50, 1, True)]
    assert request.output_token_ids == reference_generate(request.prompt_token_ids, 2)


def test_decodes_keep_running_while_a_long_prompt_prefills():
    scheduler = make_scheduler(max_num_batched_tokens=8)
    runner = FakeRunner(scheduler)
    scheduler.add_request(make_request("short", prompt_of(4, 1), max_tokens=10))
    output = scheduler.schedule()
    scheduler.update_from_output(output, runner.execute(output))
    scheduler.add_request(make_request("long", prompt_of(40, 2), max_tokens=1))
    for _ in range(5):                 # 40 prompt tokens at 7 per step
        output = scheduler.schedule()
        shares = {s.request_id: s.num_tokens for s in output.scheduled}
        assert shares == {"short": 1, "long": 7}
        scheduler.update_from_output(output, runner.execute(output))


def test_prefill_parallelism_caps_prefills_per_step():
    scheduler = make_scheduler(prefill_parallelism=2, max_num_batched_tokens=200)
    for i in range(6):
        scheduler.add_request(make_request(f"r{i}", prompt_of(10, i), max_tokens=3))
    outputs = run(scheduler)
    first = outputs[0]
    assert [s.request_id for s in first.scheduled] == ["r0", "r1"]
    second = {s.request_id: s.num_tokens for s in outputs[1].scheduled}
    assert second == {"r0": 1, "r1": 1, "r2": 10, "r3": 10}


def test_chunked_prefill_of_a_running_request_counts_against_the_cap():
    scheduler = make_scheduler(prefill_parallelism=1, max_num_batched_tokens=8)
    scheduler.add_request(make_request("a", prompt_of(20, 1), max_tokens=2))
    scheduler.add_request(make_request("b", prompt_of(6, 2), max_tokens=2))
    outputs = run(scheduler)
    # "b" waits until "a" has finished its prefill chunks.
    assert [[s.request_id for s in o.scheduled] for o in outputs[:4]] == [
        ["a"], ["a"], ["a"], ["a", "b"]]


@pytest.mark.parametrize("policy, expected", [("priority", ["p0", "p1", "p2"]),
                                              ("fcfs", ["p2", "p0", "p1"])])
def test_admission_order_follows_the_policy(policy, expected):
    scheduler = make_scheduler(max_num_seqs=1, scheduling_policy=policy)
    for request_id, priority in [("p2", 2), ("p0", 0), ("p1", 1)]:
        scheduler.add_request(make_request(request_id, prompt_of(5, priority), priority=priority))
    outputs = run(scheduler)
    admitted = []
    for output in outputs:
        for s in output.scheduled:
            if s.request_id not in admitted:
                admitted.append(s.request_id)
    assert admitted == expected


# ---------------------------------------------------------------- preemption
def preemption_scenario(policy):
    """Three 8-token prompts fill a 6-block pool; each needs a 3rd block at its 1st decode."""
    scheduler = make_scheduler(num_blocks=6, block_size=4, scheduling_policy=policy)
    requests = [make_request("a", prompt_of(8, 1), priority=0, max_tokens=6),
                make_request("b", prompt_of(8, 2), priority=1, max_tokens=6),
                make_request("c", prompt_of(8, 3), priority=0, max_tokens=6)]
    for request in requests:
        scheduler.add_request(request)
    return scheduler, requests


@pytest.mark.parametrize("policy, victim", [("priority", "b"), ("fcfs", "c")])
def test_preemption_picks_the_least_important_latest_request(policy, victim):
    scheduler, requests = preemption_scenario(policy)
    runner = FakeRunner(scheduler)
    first = scheduler.schedule()
    assert len(first.scheduled) == 3
    scheduler.update_from_output(first, runner.execute(first))
    second = scheduler.schedule()
    assert second.preempted_request_ids == {victim}
    assert victim not in {s.request_id for s in second.scheduled}
    preempted = scheduler.get_request(victim)
    assert preempted.status is RequestStatus.PREEMPTED and preempted.num_computed_tokens == 0
    assert preempted.num_preemptions == 1
    assert scheduler.kv_cache_manager.get_block_ids(victim) == []
    stats = scheduler.get_stats()
    assert stats.preemptions == 1 and stats.page_faults >= 1 and stats.num_waiting == 1


@pytest.mark.parametrize("policy", ["priority", "fcfs"])
def test_preempted_requests_resume_and_match_an_unconstrained_run(policy):
    scheduler, requests = preemption_scenario(policy)
    run(scheduler)
    assert scheduler.get_stats().preemptions >= 1
    assert sum(r.num_preemptions for r in requests) >= 1
    for request in requests:
        assert request.output_token_ids == reference_generate(request.prompt_token_ids, 6)
    assert_all_blocks_free(scheduler)


def test_preempted_request_goes_back_ahead_of_later_arrivals():
    scheduler, requests = preemption_scenario("fcfs")
    scheduler.admission.max_queue_bypasses = 0   # strict queue order: nobody passes "c"
    later = make_request("d", prompt_of(8, 4), max_tokens=6)
    scheduler.add_request(later)                 # arrives after "c", waits for blocks
    outputs = run(scheduler)
    preempted_at = next(i for i, o in enumerate(outputs) if o.preempted_request_ids == {"c"})
    after = [s.request_id for o in outputs[preempted_at + 1:] for s in o.scheduled]
    assert after.index("c") < after.index("d")
    assert later.output_token_ids == reference_generate(later.prompt_token_ids, 6)


def test_later_admitted_high_priority_request_is_not_the_victim():
    scheduler = make_scheduler(num_blocks=4, block_size=4, scheduling_policy="priority")
    runner = FakeRunner(scheduler)
    low = make_request("low", prompt_of(4, 1), priority=5, max_tokens=8)
    scheduler.add_request(low)
    output = scheduler.schedule()
    scheduler.update_from_output(output, runner.execute(output))
    high = make_request("high", prompt_of(8, 2), priority=0, max_tokens=8)
    scheduler.add_request(high)                  # admitted after "low", but more important
    output = scheduler.schedule()
    assert {s.request_id for s in output.scheduled} == {"low", "high"}
    scheduler.update_from_output(output, runner.execute(output))
    output = scheduler.schedule()                # "high" needs a 3rd block, none is free
    assert output.preempted_request_ids == {"low"}
    assert [s.request_id for s in output.scheduled] == ["high"]
    scheduler.update_from_output(output, runner.execute(output))
    run(scheduler, runner)
    for request in (low, high):
        assert request.output_token_ids == reference_generate(request.prompt_token_ids, 8)


def test_request_that_outgrows_everyone_preempts_itself_and_still_finishes():
    scheduler = make_scheduler(num_blocks=4, block_size=4, max_num_batched_tokens=32)
    hog = make_request("hog", prompt_of(6, 1), max_tokens=9)   # ends with 15 tokens: 4 blocks
    late = make_request("late", prompt_of(6, 2), max_tokens=9)
    scheduler.add_request(hog)
    scheduler.add_request(late)
    run(scheduler)
    for request in (hog, late):
        assert request.output_token_ids == reference_generate(request.prompt_token_ids, 9)
    assert late.num_preemptions >= 1 and hog.num_preemptions == 0
    assert_all_blocks_free(scheduler)


class RandomLoad:
    """Called once per step: up to 16 arrivals sharing prompt stems (prefix hits), and
    aborts of random requests, running or not."""

    def __init__(self, scheduler, rng, eos=()):
        self.scheduler, self.rng, self.eos = scheduler, rng, eos
        self.stems = [prompt_of(8, s) for s in range(3)]
        self.requests, self.aborted = [], set()

    def check_outputs(self):
        """Every request's tokens are the reference's (an aborted one's, a prefix of them)."""
        for request in self.requests:
            expected = reference_generate(request.prompt_token_ids,
                                          request.sampling_params.max_tokens)
            if request.request_id in self.aborted:
                assert expected[:request.num_output_tokens] == request.output_token_ids
            else:
                assert request.output_token_ids == expected

    def __call__(self, step):
        rng = self.rng
        if step < 300 and len(self.requests) < 16 and rng.random() < 0.4:
            prompt = rng.choice(self.stems)[:rng.randint(1, 8)] + prompt_of(rng.randint(1, 10), step)
            request = make_request(f"r{len(self.requests)}", prompt, max_tokens=rng.randint(1, 12),
                                   priority=rng.randint(0, 2), eos=self.eos)
            self.scheduler.add_request(request)
            self.requests.append(request)
        if self.requests and rng.random() < 0.05:
            victim = rng.choice(self.requests)
            if not victim.is_finished:
                self.scheduler.finish_requests(victim.request_id, RequestStatus.FINISHED_ABORTED)
                self.aborted.add(victim.request_id)


@pytest.mark.parametrize("seed, policy", [(0, "priority"), (1, "fcfs"), (2, "priority")])
def test_random_load_on_a_tiny_pool_matches_reference(seed, policy):
    """Shared prefixes, chunking, preemption, prefix hits and aborts all at once."""
    rng = random.Random(seed)
    scheduler = make_scheduler(num_blocks=12, block_size=4, max_num_seqs=4,
                               max_num_batched_tokens=12, prefill_parallelism=2,
                               scheduling_policy=policy)
    runner = FakeRunner(scheduler)
    load = RandomLoad(scheduler, rng)
    for step in range(300):
        load(step)
        output = scheduler.schedule()
        check_step(scheduler, output)
        scheduler.update_from_output(output, runner.execute(output))
    run(scheduler, runner)
    assert len(load.requests) == 16
    load.check_outputs()
    stats = scheduler.get_stats()
    assert stats.prefix_cache_hits > 0 and stats.preemptions > 0   # both paths exercised
    assert_all_blocks_free(scheduler)


# ---------------------------------------------------------------- prefix cache
def test_prefix_cache_hit_sets_computed_tokens_but_never_covers_the_last_token():
    scheduler = make_scheduler(block_size=4)
    runner = FakeRunner(scheduler)
    shared = prompt_of(20, 5)
    scheduler.add_request(make_request("first", shared, max_tokens=2))
    run(scheduler, runner)

    for request_id, prompt, expected_hit in [("same", shared, 16), ("longer", shared + [3], 20),
                                             ("shorter", shared[:16], 12),
                                             ("diverges", shared[:9] + [49] * 5, 8)]:
        request = make_request(request_id, prompt, max_tokens=2)
        scheduler.add_request(request)
        output = scheduler.schedule()
        (share,) = output.scheduled
        assert request.num_cached_tokens == expected_hit
        assert share.start_pos == expected_hit and share.num_tokens == len(prompt) - expected_hit
        assert share.sample
        scheduler.update_from_output(output, runner.execute(output))
        run(scheduler, runner)   # also checks the blocks it reads hold the right tokens
        assert request.output_token_ids == reference_generate(prompt, 2)
    stats = scheduler.get_stats()
    assert stats.prefix_cache_hits == 16 + 20 + 12 + 8
    assert stats.prefix_cache_queries == 20 + 20 + 21 + 16 + 14


def test_shared_prefix_blocks_are_shared_while_both_run():
    scheduler = make_scheduler(block_size=4)
    shared = prompt_of(12, 7)
    scheduler.add_request(make_request("a", shared + [1, 2], max_tokens=5))
    runner = FakeRunner(scheduler)
    output = scheduler.schedule()
    scheduler.update_from_output(output, runner.execute(output))
    b = make_request("b", shared + [3], max_tokens=5)
    scheduler.add_request(b)
    output = scheduler.schedule()
    table_a = scheduler.kv_cache_manager.get_block_ids("a")
    table_b = scheduler.kv_cache_manager.get_block_ids("b")
    assert table_a[:3] == table_b[:3]
    pool = scheduler.kv_cache_manager.block_pool
    assert all(pool.ref_count(block) == 2 for block in table_a[:3])
    scheduler.update_from_output(output, runner.execute(output))
    run(scheduler, runner)
    assert b.output_token_ids == reference_generate(shared + [3], 5)
    assert_all_blocks_free(scheduler)


# ---------------------------------------------------------------- finishing
def test_abort_frees_blocks_and_is_reported_once():
    scheduler = make_scheduler(max_num_seqs=1)
    running = make_request("running", prompt_of(9, 1), max_tokens=50)
    waiting = make_request("waiting", prompt_of(9, 2), max_tokens=50)
    scheduler.add_request(running)
    scheduler.add_request(waiting)
    output = scheduler.schedule()
    scheduler.update_from_output(output, FakeRunner(scheduler).execute(output))
    scheduler.finish_requests(["running", "waiting", "unknown"], RequestStatus.FINISHED_ABORTED)
    assert running.status is RequestStatus.FINISHED_ABORTED
    assert waiting.status is RequestStatus.FINISHED_ABORTED
    assert not scheduler.has_unfinished_requests()
    assert_all_blocks_free(scheduler)
    assert scheduler.schedule().finished_request_ids == {"running", "waiting"}
    assert scheduler.schedule().finished_request_ids == set()
    with pytest.raises(ValueError, match="finished status"):
        scheduler.finish_requests("x", RequestStatus.RUNNING)


class ScriptedRunner:
    """Returns the next token of a fixed script for every request that samples."""

    def __init__(self, script):
        self.script = list(script)

    def execute(self, output):
        return RunnerOutput({s.request_id: [self.script.pop(0)] for s in output.scheduled
                             if s.sample})


def generate_with_script(script, max_model_len=512, **request_args):
    scheduler = make_scheduler(max_model_len=max_model_len)
    request = make_request("r", [1, 2, 3], **request_args)
    scheduler.add_request(request)
    run(scheduler, ScriptedRunner(script))
    assert_all_blocks_free(scheduler)
    return request


@pytest.mark.parametrize("request_args, script, outputs, status, stop_reason", [
    (dict(eos=[9]), [5, 9, 4], [5, 9], RequestStatus.FINISHED_STOPPED, None),   # EOS: no reason
    (dict(eos=[9], ignore_eos=True, max_tokens=3), [5, 9, 9, 4], [5, 9, 9],
     RequestStatus.FINISHED_LENGTH, None),
    (dict(stop_token_ids=[7]), [5, 7, 4], [5, 7], RequestStatus.FINISHED_STOPPED, 7),
    (dict(stop_token_ids=[7], ignore_eos=True), [5, 7, 4], [5, 7], RequestStatus.FINISHED_STOPPED, 7),
    (dict(eos=[9], min_tokens=3), [9, 9, 9, 9], [9, 9, 9], RequestStatus.FINISHED_STOPPED, None),
    (dict(eos=[9], stop_token_ids=[9]), [5, 9], [5, 9], RequestStatus.FINISHED_STOPPED, 9),
    (dict(max_tokens=4), [5] * 10, [5] * 4, RequestStatus.FINISHED_LENGTH, None),
])
def test_stop_conditions(request_args, script, outputs, status, stop_reason):
    request = generate_with_script(script, **request_args)
    assert request.output_token_ids == outputs
    assert request.status is status and request.stop_reason == stop_reason


def test_scheduled_request_carries_what_the_runner_needs():
    scheduler = make_scheduler()
    request = make_request("r", [1, 2, 3], eos=[9, 10], min_tokens=2)
    scheduler.add_request(request)
    output = scheduler.schedule()
    (new,), (share,) = output.new_requests, output.scheduled
    assert new.eos_token_ids == (9, 10) and new.prompt_token_ids == [1, 2, 3]
    assert new.sampling_params is request.sampling_params
    assert share.token_ids == [1, 2, 3] and share.num_kept_blocks == 0
    assert share.new_block_ids == scheduler.kv_cache_manager.get_block_ids("r")
    scheduler.update_from_output(output, RunnerOutput({"r": [5]}))
    second = scheduler.schedule()
    assert second.new_requests == []                       # sent once
    assert second.scheduled[0].token_ids == [5] and second.scheduled[0].num_kept_blocks == 1


def test_min_tokens_suppresses_an_early_eos():
    request = generate_with_script([9, 4, 9, 9], eos=[9], min_tokens=2)
    assert request.output_token_ids == [9, 4, 9]
    assert request.status is RequestStatus.FINISHED_STOPPED


def test_max_model_len_ends_the_request():
    request = generate_with_script([5] * 20, max_model_len=7, max_tokens=None)
    assert request.output_token_ids == [5] * 4 and request.num_tokens == 7
    assert request.status is RequestStatus.FINISHED_LENGTH


def test_add_request_rejects_requests_that_can_never_run():
    scheduler = make_scheduler(num_blocks=4, block_size=4, max_model_len=100)
    with pytest.raises(ValueError, match="max_model_len"):
        scheduler.add_request(make_request("long", range(100)))
    with pytest.raises(ValueError, match="KV cache holds only 16"):
        scheduler.add_request(make_request("big", range(17)))
    with pytest.raises(ValueError, match="empty prompt"):
        scheduler.add_request(make_request("empty", []))
    scheduler.add_request(make_request("ok", range(16)))
    with pytest.raises(ValueError, match="already in use"):
        scheduler.add_request(make_request("ok", range(3)))
    with pytest.raises(ValueError, match="max_num_seqs"):
        make_scheduler(max_num_seqs=0)
    with pytest.raises(ValueError, match="scheduling_policy"):
        make_scheduler(scheduling_policy="lifo")


# ---------------------------------------------------------------- queues
def test_fcfs_queue_keeps_arrival_order_and_prepends_preempted():
    queue = create_request_queue("fcfs")
    a, b, c = (make_request(x, [1]) for x in "abc")
    for request in (a, b, c):
        queue.add(request)
    assert queue.pop() is a
    queue.prepend(a)
    assert list(queue) == [a, b, c] and queue.peek() is a
    assert queue.remove(b) and not queue.remove(b)
    assert [queue.pop(), queue.pop()] == [a, c] and not queue


def test_priority_queue_orders_by_priority_then_arrival_then_id():
    queue = create_request_queue("priority")
    low = make_request("low", [1], priority=5)
    early = make_request("early", [1], priority=1)
    late = make_request("late", [1], priority=1)
    urgent = make_request("urgent", [1], priority=-1)
    for request in (low, late, early, urgent):
        queue.add(request)
    assert list(queue) == [urgent, early, late, low]
    assert queue.pop() is urgent and queue.pop() is early
    queue.add(make_request("later", [1], priority=1))
    queue.prepend(early)                      # preempted: ahead of later arrivals of priority 1
    assert [r.request_id for r in queue] == ["early", "late", "later", "low"]
    assert queue.remove(late) and len(queue) == 3
    assert [queue.pop().request_id for _ in range(3)] == ["early", "later", "low"]
