"""Fast lane, no head-of-line blocking, the age bound and prefill_parallelism.

Driven by the fake runner of ``test_scheduler`` (a simulated paged KV cache), so every
schedule below also produces the reference tokens.
"""
import random

import pytest

from ferry.outputs import RunnerOutput
from test_scheduler import (FakeRunner, assert_all_blocks_free, check_step, make_request,
                            make_scheduler, prompt_of, reference_generate, run)


def step(scheduler, runner):
    output = scheduler.schedule()
    check_step(scheduler, output)
    scheduler.update_from_output(output, runner.execute(output))
    return {s.request_id: s.num_tokens for s in output.scheduled}


@pytest.mark.parametrize("threshold, first_short_step", [(16, 1), (0, 4)])
def test_short_request_starts_next_step_even_while_a_long_prompt_prefills(threshold,
                                                                          first_short_step):
    """prefill_parallelism=1: with the fast lane the short prompt takes the one prefill
    slot the step after it arrives; without it, it waits for the whole long prefill."""
    scheduler = make_scheduler(max_num_batched_tokens=16, prefill_parallelism=1,
                               short_prompt_threshold=threshold)
    runner = FakeRunner(scheduler)
    scheduler.add_request(make_request("long", prompt_of(64, 1), max_tokens=2))
    assert step(scheduler, runner) == {"long": 16}
    short = make_request("short", prompt_of(4, 2), max_tokens=3)
    scheduler.add_request(short)
    steps = [step(scheduler, runner) for _ in range(6)]
    assert next(i for i, s in enumerate(steps) if "short" in s) == first_short_step - 1
    run(scheduler, runner)
    assert short.output_token_ids == reference_generate(short.prompt_token_ids, 3)
    assert_all_blocks_free(scheduler)


def test_short_request_and_long_chunk_share_a_step():
    scheduler = make_scheduler(max_num_batched_tokens=16, prefill_parallelism=2,
                               short_prompt_threshold=8)
    runner = FakeRunner(scheduler)
    scheduler.add_request(make_request("long", prompt_of(64, 1), max_tokens=2))
    assert step(scheduler, runner) == {"long": 16}      # alone: the whole budget
    scheduler.add_request(make_request("short", prompt_of(4, 2), max_tokens=3))
    # The short prompt is admitted before the chunk, which is cut to the threshold while
    # another request runs, so that no short prompt waits behind more than that.
    assert step(scheduler, runner) == {"short": 4, "long": 8}
    assert step(scheduler, runner) == {"short": 1, "long": 8}
    assert step(scheduler, runner) == {"short": 1, "long": 8}
    assert step(scheduler, runner) == {"long": 16}      # the short one finished


def test_short_waiting_prompts_are_admitted_ahead_of_a_long_one():
    scheduler = make_scheduler(max_num_batched_tokens=64, prefill_parallelism=2,
                               short_prompt_threshold=8)
    runner = FakeRunner(scheduler)
    for request_id, length in [("long", 40), ("s1", 4), ("s2", 5)]:
        scheduler.add_request(make_request(request_id, prompt_of(length, len(request_id)),
                                           max_tokens=2))
    assert step(scheduler, runner) == {"s1": 4, "s2": 5}
    assert scheduler.get_request("long").num_bypasses == 1
    assert step(scheduler, runner) == {"s1": 1, "s2": 1, "long": 8}   # a capped chunk


def test_without_fast_lane_admission_is_in_queue_order():
    scheduler = make_scheduler(max_num_batched_tokens=64, prefill_parallelism=2,
                               short_prompt_threshold=0, scheduling_policy="fcfs")
    runner = FakeRunner(scheduler)
    for request_id, length in [("long", 40), ("s1", 4), ("s2", 5)]:
        scheduler.add_request(make_request(request_id, prompt_of(length, len(request_id)),
                                           max_tokens=2))
    assert step(scheduler, runner) == {"long": 40, "s1": 4}


def test_a_request_that_does_not_fit_does_not_block_smaller_ones_behind_it():
    scheduler = make_scheduler(num_blocks=8, block_size=4, max_num_batched_tokens=64,
                               short_prompt_threshold=0)
    runner = FakeRunner(scheduler)
    scheduler.add_request(make_request("hold", prompt_of(16, 1), max_tokens=8))   # 4-5 blocks
    step(scheduler, runner)
    scheduler.add_request(make_request("big", prompt_of(20, 2), max_tokens=2))    # 5+ blocks
    scheduler.add_request(make_request("small", prompt_of(4, 3), max_tokens=2))   # 1-2 blocks
    shares = step(scheduler, runner)
    assert "small" in shares and "big" not in shares
    run(scheduler, runner)
    assert_all_blocks_free(scheduler)


def test_age_bound_stops_requests_from_passing_a_waiting_one_forever():
    """A stream of small requests keeps passing "big" until it was bypassed
    max_queue_bypasses times; then nothing behind it starts until it has."""
    scheduler = make_scheduler(num_blocks=10, block_size=4, max_num_batched_tokens=64,
                               short_prompt_threshold=0, max_queue_bypasses=3,
                               scheduling_policy="fcfs")
    runner = FakeRunner(scheduler)
    scheduler.add_request(make_request("hold", prompt_of(20, 1), max_tokens=12))
    step(scheduler, runner)
    big = make_request("big", prompt_of(24, 2), max_tokens=2)
    scheduler.add_request(big)
    started = []
    for i in range(40):
        scheduler.add_request(make_request(f"s{i}", prompt_of(3, 10 + i), max_tokens=1))
        shares = step(scheduler, runner)
        started.extend(shares)
        if "big" in shares:
            break
    assert "big" in started
    assert big.num_bypasses == 0        # reset when it started
    smalls_before_big = [r for r in started[:started.index("big")] if r.startswith("s")]
    assert len(set(smalls_before_big)) <= 3 + 1   # bound: 3 bypassing steps (one small each)
    run(scheduler, runner)
    assert big.output_token_ids == reference_generate(big.prompt_token_ids, 2)
    assert_all_blocks_free(scheduler)


def test_running_decodes_get_a_token_every_step_under_a_prefill_burst():
    scheduler = make_scheduler(max_num_batched_tokens=24, prefill_parallelism=2,
                               short_prompt_threshold=8, num_blocks=200)
    runner = FakeRunner(scheduler)
    decode = make_request("decode", prompt_of(4, 1), max_tokens=30)
    scheduler.add_request(decode)
    step(scheduler, runner)
    for i in range(8):
        scheduler.add_request(make_request(f"p{i}", prompt_of(6 + 5 * i, i), max_tokens=2))
    for _ in range(20):
        if decode.is_finished:
            break
        assert step(scheduler, runner).get("decode") == 1
    run(scheduler, runner)
    assert decode.output_token_ids == reference_generate(decode.prompt_token_ids, 30)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mixed_long_and_short_load_finishes_with_reference_tokens(seed):
    """Nothing starves (run() bounds the steps) and every token is the reference's."""
    rng = random.Random(seed)
    scheduler = make_scheduler(num_blocks=24, block_size=4, max_num_batched_tokens=16,
                               prefill_parallelism=2, short_prompt_threshold=6,
                               max_queue_bypasses=4, max_num_seqs=4)
    runner = FakeRunner(scheduler)
    requests = []
    for i in range(40):
        if rng.random() < 0.5:
            length = rng.choice([3, 4, 5]) if rng.random() < 0.7 else rng.randint(20, 40)
            request = make_request(f"r{i}", prompt_of(length, i), max_tokens=rng.randint(1, 6),
                                   priority=rng.randint(0, 1))
            scheduler.add_request(request)
            requests.append(request)
        output = scheduler.schedule()
        check_step(scheduler, output)
        scheduler.update_from_output(output, runner.execute(output))
    run(scheduler, runner, max_steps=800)
    for request in requests:
        assert request.output_token_ids == reference_generate(
            request.prompt_token_ids, request.sampling_params.max_tokens)
    assert_all_blocks_free(scheduler)


def test_admission_predicate_refusal_lets_others_pass():
    scheduler = make_scheduler()
    runner = FakeRunner(scheduler)
    busy = {"adapter-a"}
    scheduler.add_admission_predicate(lambda r: r.lora_name not in busy)
    blocked = make_request("blocked", prompt_of(5, 1), max_tokens=2)
    blocked.lora_name = "adapter-a"
    scheduler.add_request(blocked)
    scheduler.add_request(make_request("free", prompt_of(5, 2), max_tokens=2))
    assert set(step(scheduler, runner)) == {"free"}
    busy.clear()
    assert "blocked" in step(scheduler, runner)
    run(scheduler, runner)
    assert_all_blocks_free(scheduler)


def test_long_prefills_of_a_step_share_one_chunk_while_others_run():
    scheduler = make_scheduler(max_num_batched_tokens=64, prefill_parallelism=4,
                               short_prompt_threshold=8, num_blocks=200)
    runner = FakeRunner(scheduler)
    for i in range(3):
        scheduler.add_request(make_request(f"long{i}", prompt_of(40, i), max_tokens=2))
    for _ in range(12):
        output = scheduler.schedule()
        # Chunks that leave more than a fast-lane share of the prompt (the final <= 8
        # tokens ride the fast lane) add up to one chunk per step.
        long_tokens = sum(s.num_tokens for s in output.scheduled
                          if 40 - (s.start_pos + s.num_tokens) > 0 and 40 - s.start_pos > 8)
        assert long_tokens <= 8
        scheduler.update_from_output(output, runner.execute(output))
    run(scheduler, runner)
    assert_all_blocks_free(scheduler)


def test_long_prompts_taking_turns_at_the_chunk_never_block_the_fast_lane():
    """Waiting long prompts wait for the one long-prefill chunk per step by design: they
    do not age into a head-of-line block, so every short prompt starts the step after it
    arrives; the long ones still all finish."""
    scheduler = make_scheduler(max_num_batched_tokens=64, prefill_parallelism=4,
                               short_prompt_threshold=8, max_queue_bypasses=2,
                               num_blocks=400, max_num_seqs=64)
    runner = FakeRunner(scheduler)
    longs = [make_request(f"long{i}", prompt_of(48, i), max_tokens=2) for i in range(3)]
    for request in longs:
        scheduler.add_request(request)
    for i in range(30):
        scheduler.add_request(make_request(f"s{i}", prompt_of(4, 50 + i), max_tokens=2))
        assert f"s{i}" in step(scheduler, runner)
    run(scheduler, runner)
    for request in longs:
        assert request.output_token_ids == reference_generate(request.prompt_token_ids, 2)
    assert_all_blocks_free(scheduler)


@pytest.mark.parametrize("seconds_per_token, chunk", [(1e-6, 64), (0.25 / 24, 24), (1.0, 8)])
def test_a_long_prompt_alone_prefills_what_a_quarter_second_allows(seconds_per_token, chunk):
    """Alone, a long prompt's chunk is the tokens the measured prefill cost fits in
    LONE_PREFILL_STEP_S (at least the threshold, at most the budget): a short request
    arriving meanwhile waits no longer than that step. The lane off: the whole budget."""
    scheduler = make_scheduler(max_num_batched_tokens=64, short_prompt_threshold=8)
    scheduler.costs.seconds_per_token = seconds_per_token
    runner = FakeRunner(scheduler)
    long = make_request("long", prompt_of(200, 1), max_tokens=2)
    scheduler.add_request(long)
    assert step(scheduler, runner) == {"long": chunk}
    run(scheduler, runner)
    assert long.output_token_ids == reference_generate(long.prompt_token_ids, 2)
    assert_all_blocks_free(scheduler)

    off = make_scheduler(max_num_batched_tokens=64, short_prompt_threshold=0)
    off.costs.seconds_per_token = 1.0
    off.add_request(make_request("long", prompt_of(200, 1), max_tokens=2))
    assert step(off, FakeRunner(off)) == {"long": 64}
