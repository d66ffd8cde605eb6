"""Draft tokens through the scheduler: verified, appended, rolled back, blocks freed.

The fake runner (``test_scheduler.FakeRunner``) writes drafts into the simulated KV cache
and keeps those that match the fake model; a drafter here proposes, after each step, a
few tokens that are right or wrong by a seeded rule. Under a random load with
preemption, prefix hits, chunking and aborts the tokens must be the reference's, with
every block free at the end.
"""
import random

import pytest

from ferry.outputs import RunnerOutput
from ferry.request import RequestStatus
from test_scheduler import (FakeRunner, RandomLoad, assert_all_blocks_free, check_step,
                            make_request, make_scheduler, next_token, run)


class DraftingRunner(FakeRunner):
    """Proposes ``k`` drafts after each step: the true next tokens, each wrong with
    probability ``p_wrong`` (decided by a seeded rng)."""

    def __init__(self, scheduler, k, p_wrong, seed):
        super().__init__(scheduler)
        self.k, self.p_wrong, self.rng = k, p_wrong, random.Random(seed)
        self.scheduled = self.accepted = 0

    def execute(self, output):
        result = super().execute(output)
        for s in output.scheduled:
            if s.request_id not in result.sampled_token_ids:
                continue
            self.scheduled += len(s.spec_token_ids)
            self.accepted += len(result.sampled_token_ids[s.request_id]) - 1
            state = self.states.get(s.request_id)
            known = (state.token_ids[:s.start_pos + len(s.token_ids)]
                     + result.sampled_token_ids[s.request_id])
            result.spec_token_ids[s.request_id] = self._drafts(known)
        return result

    def _drafts(self, tokens):
        tokens, drafts = list(tokens), []
        for _ in range(self.k):
            right = next_token(tokens)
            drafts.append(right if self.rng.random() >= self.p_wrong else (right + 1) % 97)
            tokens.append(right)
        return drafts


@pytest.mark.parametrize("seed, k, p_wrong", [(0, 1, 0.5), (1, 3, 0.3), (2, 4, 0.0), (3, 2, 1.0)])
def test_random_load_with_drafts_matches_reference_and_frees_every_block(seed, k, p_wrong):
    rng = random.Random(seed)
    scheduler = make_scheduler(num_blocks=8, block_size=4, max_num_seqs=4,
                               max_num_batched_tokens=12, prefill_parallelism=2)
    runner = DraftingRunner(scheduler, k, p_wrong, seed)
    load = RandomLoad(scheduler, rng)
    for step in range(300):
        load(step)
        output = scheduler.schedule()
        check_step(scheduler, output)
        for s in output.scheduled:    # drafts never run past the context or max_tokens
            request = scheduler.get_request(s.request_id)
            assert s.start_pos + s.num_tokens <= scheduler.max_model_len
            assert len(s.spec_token_ids) < request.sampling_params.max_tokens
        scheduler.update_from_output(output, runner.execute(output))
    run(scheduler, runner)
    assert scheduler.get_stats().preemptions > 0
    load.check_outputs()
    assert_all_blocks_free(scheduler)
    assert runner.scheduled > 0
    if p_wrong == 1.0:
        assert runner.accepted == 0
    if p_wrong == 0.0:
        assert runner.accepted == runner.scheduled


def test_rejected_drafts_roll_back_and_free_the_blocks_only_they_used():
    scheduler = make_scheduler(block_size=4)
    request = make_request("r", [1, 2, 3], max_tokens=20)
    scheduler.add_request(request)
    first = scheduler.schedule()
    scheduler.update_from_output(first, RunnerOutput({"r": [10]}, spec_token_ids={"r": [11] * 6}))
    verify = scheduler.schedule()
    (s,) = verify.scheduled
    assert s.token_ids == [10] and s.spec_token_ids == [11] * 6 and s.sample
    assert request.num_computed_tokens == 10              # 3 + 1 + 6 drafts
    assert len(scheduler.kv_cache_manager.get_block_ids("r")) == 3
    scheduler.update_from_output(verify, RunnerOutput({"r": [11, 12]}))   # one accepted
    assert request.output_token_ids == [10, 11, 12]
    assert request.num_computed_tokens == 5 and request.num_tokens == 6
    assert len(scheduler.kv_cache_manager.get_block_ids("r")) == 2        # 6 tokens: 2 blocks
    nxt = scheduler.schedule().scheduled[0]
    assert nxt.start_pos == 5 and nxt.token_ids == [12] and nxt.num_kept_blocks == 2


def test_a_stop_token_among_accepted_drafts_ends_the_request_there():
    scheduler = make_scheduler()
    request = make_request("r", [1, 2, 3], max_tokens=20, eos=[9])
    scheduler.add_request(request)
    first = scheduler.schedule()
    scheduler.update_from_output(first, RunnerOutput({"r": [10]}, spec_token_ids={"r": [9, 5]}))
    verify = scheduler.schedule()
    updated = scheduler.update_from_output(verify, RunnerOutput({"r": [9, 5, 6]}))
    assert updated == [(request, [9])]
    assert request.output_token_ids == [10, 9] and request.status is RequestStatus.FINISHED_STOPPED
    assert_all_blocks_free(scheduler)


def test_drafts_are_not_scheduled_with_async_scheduling():
    scheduler = make_scheduler(async_scheduling=True)
    scheduler.add_request(make_request("r", [1, 2, 3], max_tokens=20))
    first = scheduler.schedule()
    scheduler.update_from_output(first, RunnerOutput({"r": [10]}, spec_token_ids={"r": [4, 4]}))
    assert all(not s.spec_token_ids for s in scheduler.schedule().scheduled)
