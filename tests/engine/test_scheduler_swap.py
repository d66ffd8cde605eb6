"""Preemption by swap: the scheduler's swap-out/swap-in block pairs, the host pool's
accounting, and the per-victim choice between swap and recompute.

The fake runner copies blocks between its simulated device KV and a host pool as the
messages say (and blanks a host block once read), so a wrong pair changes the tokens.
"""
import random

import pytest

from ferry.engine.preemption import PreemptionCosts, choose_preemption_mode
from ferry.engine.swap import SwapSpace
from test_async_scheduling import PipelinedFakeRunner, reference, run_pipelined
from test_scheduler import (FakeRunner, RandomLoad, assert_all_blocks_free, check_step,
                            make_request, make_scheduler, prompt_of, reference_generate, run)


def scenario(mode, num_host_blocks=16, **overrides):
    """Three 8-token prompts fill a 6-block pool; each needs a 3rd block at its 1st decode."""
    scheduler = make_scheduler(num_blocks=6, block_size=4, scheduling_policy="fcfs",
                               preemption_mode=mode, num_host_blocks=num_host_blocks,
                               kv_block_bytes=1024, **overrides)
    requests = [make_request(n, prompt_of(8, i), max_tokens=6) for i, n in enumerate("abc")]
    for request in requests:
        scheduler.add_request(request)
    return scheduler, requests


def test_swap_preemption_emits_block_pairs_and_resumes_without_recompute():
    scheduler, requests = scenario("swap")
    outputs = run(scheduler)
    swap_outs = [o.swap_out for o in outputs if o.swap_out]
    swap_ins = [o.swap_in for o in outputs if o.swap_in]
    assert swap_outs and swap_ins
    # What went out comes back: the same host blocks, as many as went out.
    assert sorted(h for pairs in swap_outs for _, h in pairs) == \
        sorted(h for pairs in swap_ins for h, _ in pairs)
    stats = scheduler.get_stats()
    assert stats.preemptions_swap >= 1 and stats.preemptions_recompute == 0
    assert stats.recomputed_tokens == 0
    for request in requests:
        assert request.output_token_ids == reference_generate(request.prompt_token_ids, 6)
    assert_all_blocks_free(scheduler)


def test_swapped_request_resumes_where_it_stopped():
    scheduler, requests = scenario("swap")
    runner = FakeRunner(scheduler)
    for _ in range(2):
        output = scheduler.schedule()
        scheduler.update_from_output(output, runner.execute(output))
    victim = scheduler.get_request(next(iter(output.preempted_request_ids)))
    assert victim.num_computed_tokens == 8 and scheduler.swap.is_swapped(victim.request_id)
    assert scheduler.get_stats().swapped_blocks == 2
    while True:
        output = scheduler.schedule()
        resumed = [s for s in output.scheduled if s.request_id == victim.request_id]
        scheduler.update_from_output(output, runner.execute(output))
        if resumed:
            break
    assert resumed[0].start_pos == 8 and len(resumed[0].token_ids) == 1   # a decode, no prefill
    assert len(output.swap_in) == 2


def test_recompute_mode_recomputes_and_counts_the_tokens():
    scheduler, requests = scenario("recompute")
    outputs = run(scheduler)
    assert not any(o.swap_out or o.swap_in for o in outputs)
    stats = scheduler.get_stats()
    assert stats.preemptions_recompute >= 1 and stats.preemptions_swap == 0
    assert stats.recomputed_tokens > 0
    for request in requests:
        assert request.output_token_ids == reference_generate(request.prompt_token_ids, 6)
    assert_all_blocks_free(scheduler)


def test_full_host_pool_falls_back_to_recompute():
    scheduler, requests = scenario("swap", num_host_blocks=1)   # a victim needs 2
    run(scheduler)
    stats = scheduler.get_stats()
    assert stats.preemptions_recompute >= 1 and stats.preemptions_swap == 0
    assert_all_blocks_free(scheduler)


@pytest.mark.parametrize("seconds_per_token, bandwidth, expected",
                         [(1e-3, 1e9, "swap"), (1e-9, 1e6, "recompute")])
def test_auto_mode_follows_the_cost_estimate(seconds_per_token, bandwidth, expected):
    costs = PreemptionCosts(seconds_per_token, bandwidth)
    scheduler, _ = scenario("auto", costs=costs)
    run(scheduler)
    stats = scheduler.get_stats()
    assert getattr(stats, f"preemptions_{expected}") >= 1
    assert stats.preemptions == getattr(stats, f"preemptions_{expected}")
    assert_all_blocks_free(scheduler)


def test_cost_estimate_is_a_pure_comparison():
    # 100 tokens at 1 ms = 0.1 s vs 2 x 4 blocks x 1 MB at 1 GB/s = 8 ms: swap.
    kw = dict(seconds_per_token=1e-3, copy_bytes_per_second=1e9, host_blocks_free=10)
    assert choose_preemption_mode(100, 4, 2**20, **kw) == "swap"
    assert choose_preemption_mode(5, 4, 2**20, **kw) == "recompute"           # 5 ms < 8 ms
    assert choose_preemption_mode(100, 11, 2**20, **kw) == "recompute"        # no room
    assert choose_preemption_mode(100, 0, 2**20, **kw) == "recompute"
    costs = PreemptionCosts(seconds_per_token=1.0)
    costs.observe_step(100, 1.0)          # 10 ms per token measured: the average moves
    assert 0.01 < costs.seconds_per_token < 1.0
    costs.observe_step(4, 100.0)          # too small a step to say anything
    assert costs.seconds_per_token < 1.0


def test_swap_space_accounting_and_deferred_reuse():
    space = SwapSpace(4)
    pairs = space.swap_out("r", [7, 8, 9])
    assert [d for d, _ in pairs] == [7, 8, 9] and space.num_free_blocks == 1
    with pytest.raises(ValueError):
        space.swap_out("s", [1, 2])
    back = space.swap_in("r", [3, 4, 5, 6])
    assert [h for h, _ in back] == [h for _, h in pairs] and [d for _, d in back] == [3, 4, 5]
    assert space.num_free_blocks == 1          # released, but not reusable in this step
    space.end_step()
    assert space.num_free_blocks == 4 and space.num_used_blocks == 0
    space.swap_out("t", [1])
    space.discard("t")
    space.end_step()
    assert space.num_free_blocks == 4


@pytest.mark.parametrize("seed, mode", [(0, "swap"), (1, "auto"), (2, "swap"), (3, "auto")])
def test_random_load_with_swap_matches_reference(seed, mode):
    rng = random.Random(seed)
    costs = PreemptionCosts(seconds_per_token=1e-4, copy_bytes_per_second=1e9)
    scheduler = make_scheduler(num_blocks=12, block_size=4, max_num_seqs=4,
                               max_num_batched_tokens=12, prefill_parallelism=2,
                               preemption_mode=mode, num_host_blocks=10, kv_block_bytes=2048,
                               costs=costs)
    runner = FakeRunner(scheduler)
    load = RandomLoad(scheduler, rng)
    for step in range(300):
        load(step)
        output = scheduler.schedule()
        check_step(scheduler, output)
        scheduler.update_from_output(output, runner.execute(output))
    run(scheduler, runner)
    load.check_outputs()
    assert scheduler.get_stats().preemptions_swap > 0
    assert_all_blocks_free(scheduler)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_load_with_swap_under_async_scheduling(seed):
    rng = random.Random(seed)
    scheduler = make_scheduler(num_blocks=12, block_size=4, max_num_seqs=4,
                               max_num_batched_tokens=12, prefill_parallelism=2,
                               preemption_mode="swap", num_host_blocks=10,
                               async_scheduling=True)
    runner = PipelinedFakeRunner(scheduler)
    eos = (3, 44)
    load = RandomLoad(scheduler, rng, eos)
    run_pipelined(scheduler, runner, on_step=load, min_steps=300)
    for request in load.requests:
        expected = reference(request.prompt_token_ids, request.sampling_params.max_tokens, eos)
        if request.request_id in load.aborted:
            assert expected[:request.num_output_tokens] == request.output_token_ids
        else:
            assert request.output_token_ids == expected, request.request_id
    assert scheduler.get_stats().preemptions_swap > 0
    assert_all_blocks_free(scheduler)
