"""Async scheduling: step N+1 is scheduled before step N's tokens are known.

A pipelined fake runner plays a device one step behind the host: ``launch`` fills each
placeholder with the token the previous launch sampled for that request, writes the KV
and samples, and the loop hands the scheduler step N's tokens only after it scheduled
N+1, as ``Engine.step`` does. Tokens must equal a plain reference loop, whatever the
preemptions, prefix hits, chunking, stops and aborts.
"""
import dataclasses
import random

import pytest

from ferry.outputs import PLACEHOLDER_TOKEN, RunnerOutput, SchedulerOutput
from ferry.request import RequestStatus
from test_scheduler import (FakeRunner, RandomLoad, assert_all_blocks_free, check_step,
                            make_request, make_scheduler, next_token, prompt_of)


class PipelinedFakeRunner(FakeRunner):
    def __init__(self, scheduler):
        super().__init__(scheduler)
        self.last_sampled: dict[str, list[int]] = {}
        self.computed: dict[str, int] = {}     # request -> tokens whose KV was computed

    def launch(self, output: SchedulerOutput) -> RunnerOutput:
        filled = [self._fill(s) for s in output.scheduled]
        for s in filled:
            assert s.start_pos + s.num_tokens <= self.scheduler.max_model_len
            self.computed[s.request_id] = self.computed.get(s.request_id, 0) + s.num_tokens
        result = self.execute(dataclasses.replace(output, scheduled=filled))
        self.last_sampled = dict(result.sampled_token_ids)
        return result

    def _fill(self, s):
        if not s.num_placeholders:
            assert PLACEHOLDER_TOKEN not in s.token_ids
            return s
        assert s.num_placeholders == 1 and s.token_ids[-1] == PLACEHOLDER_TOKEN
        assert s.num_tokens == 1, "a placeholder only ever decodes"
        token = self.last_sampled[s.request_id][-1]
        # The host's token list does not have this token yet: the step before is in flight.
        assert len(self.scheduler.get_request(s.request_id).all_token_ids) == s.start_pos
        return dataclasses.replace(s, token_ids=[token], num_placeholders=0)


def run_pipelined(scheduler, runner, on_step=None, min_steps=0, max_steps=600):
    """Schedule and launch step N, then update from step N-1 (Engine.step's order)."""
    in_flight = None
    for step in range(max_steps):
        if on_step is not None:
            on_step(step)
        if step >= min_steps and not (scheduler.has_unfinished_requests() or in_flight):
            return
        output = scheduler.schedule()
        check_step(scheduler, output)
        launched = None if output.is_empty else (output, runner.launch(output))
        if in_flight is not None:
            scheduler.update_from_output(*in_flight)
        in_flight = launched
    raise AssertionError("the scheduler made no progress")


def reference(prompt, max_tokens, eos=()):
    tokens = list(prompt)
    for _ in range(max_tokens):
        tokens.append(next_token(tokens))
        if tokens[-1] in eos:
            break
    return tokens[len(prompt):]


def test_decodes_overlap_and_tokens_match_the_reference():
    scheduler = make_scheduler(async_scheduling=True)
    runner = PipelinedFakeRunner(scheduler)
    requests = [make_request(f"r{i}", prompt_of(5 + 3 * i, i), max_tokens=3 + i) for i in range(5)]
    for request in requests:
        scheduler.add_request(request)
    run_pipelined(scheduler, runner)
    for request in requests:
        assert request.output_token_ids == reference(request.prompt_token_ids,
                                                     request.sampling_params.max_tokens)
        assert request.status is RequestStatus.FINISHED_LENGTH
        assert request.num_output_placeholders == 0
        # Ending by length is foreseen: no step computes past the last token's input.
        assert runner.computed[request.request_id] == request.num_tokens - 1
    assert_all_blocks_free(scheduler)


def test_second_step_is_scheduled_with_a_placeholder_before_the_first_token_is_known():
    scheduler = make_scheduler(async_scheduling=True)
    scheduler.add_request(make_request("a", prompt_of(6, 1), max_tokens=4))
    first = scheduler.schedule()
    assert first.scheduled[0].sample and first.scheduled[0].num_placeholders == 0
    second = scheduler.schedule()          # before update_from_output(first)
    (decode,) = second.scheduled
    assert decode.token_ids == [PLACEHOLDER_TOKEN] and decode.num_placeholders == 1
    assert decode.start_pos == 6 and decode.sample
    assert scheduler.schedule().is_empty   # two tokens in flight: nothing more to compute
    scheduler.update_from_output(first, RunnerOutput({"a": [11]}))
    scheduler.update_from_output(second, RunnerOutput({"a": [12]}))
    request = scheduler.get_request("a")
    assert request.output_token_ids == [11, 12] and request.num_output_placeholders == 0


def test_eos_in_flight_wastes_at_most_one_token_per_request():
    scheduler = make_scheduler(async_scheduling=True)
    runner = PipelinedFakeRunner(scheduler)
    eos = tuple(range(0, 97, 5))           # about one fake token in five ends a request
    requests = [make_request(f"r{i}", prompt_of(4 + i, i + 20), max_tokens=30, eos=eos)
                for i in range(8)]
    for request in requests:
        scheduler.add_request(request)
    run_pipelined(scheduler, runner)
    stopped = 0
    for request in requests:
        assert request.output_token_ids == reference(request.prompt_token_ids, 30, eos)
        if request.status is RequestStatus.FINISHED_STOPPED:
            stopped += 1
            assert runner.computed[request.request_id] <= request.num_tokens
    assert stopped >= 3
    assert_all_blocks_free(scheduler)


@pytest.mark.parametrize("seed, policy", [(0, "priority"), (1, "fcfs"), (2, "priority"), (3, "fcfs")])
def test_random_load_with_preemption_prefix_hits_and_aborts(seed, policy):
    rng = random.Random(seed)
    scheduler = make_scheduler(num_blocks=12, block_size=4, max_num_seqs=4,
                               max_num_batched_tokens=12, prefill_parallelism=2,
                               scheduling_policy=policy, async_scheduling=True)
    runner = PipelinedFakeRunner(scheduler)
    eos = (3, 44)
    load = RandomLoad(scheduler, rng, eos)
    run_pipelined(scheduler, runner, on_step=load, min_steps=300)
    assert len(load.requests) == 16
    for request in load.requests:
        expected = reference(request.prompt_token_ids, request.sampling_params.max_tokens, eos)
        if request.request_id in load.aborted:
            assert expected[:request.num_output_tokens] == request.output_token_ids
        else:
            assert request.output_token_ids == expected, request.request_id
    stats = scheduler.get_stats()
    assert stats.prefix_cache_hits > 0 and stats.preemptions > 0   # both paths exercised
    assert_all_blocks_free(scheduler)


def test_request_preempted_while_its_token_is_in_flight_keeps_the_token():
    scheduler = make_scheduler(num_blocks=4, block_size=4, max_num_seqs=2, async_scheduling=True,
                               scheduling_policy="fcfs")
    first = make_request("first", prompt_of(7, 1), max_tokens=8)
    second = make_request("second", prompt_of(7, 2), max_tokens=8)
    scheduler.add_request(first)
    scheduler.add_request(second)
    runner = PipelinedFakeRunner(scheduler)
    in_flight = None
    preempted_in_flight = False
    while scheduler.has_unfinished_requests() or in_flight:
        output = scheduler.schedule()
        if output.preempted_request_ids and in_flight is not None:
            preempted_in_flight |= any(s.request_id in output.preempted_request_ids and s.sample
                                       for s in in_flight[0].scheduled)
        launched = None if output.is_empty else (output, runner.launch(output))
        if in_flight is not None:
            scheduler.update_from_output(*in_flight)
        in_flight = launched
    assert preempted_in_flight, "the scenario should preempt a request with a token in flight"
    for request in (first, second):
        assert request.output_token_ids == reference(request.prompt_token_ids, 8)
    assert_all_blocks_free(scheduler)


def test_request_with_unknown_token_is_not_readmitted():
    """Scheduling again before the step in flight is finished (which the engine never does)
    must not re-admit a preempted request whose last token is still unknown."""
    scheduler = make_scheduler(num_blocks=4, block_size=4, max_num_seqs=2, async_scheduling=True,
                               scheduling_policy="fcfs")
    for name, seed in (("first", 1), ("second", 2)):
        scheduler.add_request(make_request(name, prompt_of(7, seed), max_tokens=8))
    runner = PipelinedFakeRunner(scheduler)
    in_flight = None
    for _ in range(40):
        output = scheduler.schedule()
        victims = output.preempted_request_ids
        if victims and in_flight is not None and any(
                s.request_id in victims and s.sample for s in in_flight[0].scheduled):
            break
        launched = None if output.is_empty else (output, runner.launch(output))
        if in_flight is not None:
            scheduler.update_from_output(*in_flight)
        in_flight = launched
    else:
        raise AssertionError("the scenario should preempt a request with a token in flight")
    (victim,) = victims
    assert scheduler.get_request(victim).num_output_placeholders == 1
    other = ({"first", "second"} - {victim}).pop()
    scheduler.finish_requests(other, RequestStatus.FINISHED_ABORTED)   # blocks and seat free
    again = scheduler.schedule()
    assert victim not in {s.request_id for s in again.scheduled}
    assert scheduler.get_request(victim).status is RequestStatus.PREEMPTED


def test_sync_scheduling_never_makes_placeholders():
    scheduler = make_scheduler()
    scheduler.add_request(make_request("a", prompt_of(6, 1), max_tokens=4))
    scheduler.schedule()
    assert scheduler.schedule().is_empty     # the token is not known: nothing to do
    assert scheduler.get_request("a").num_output_placeholders == 0
