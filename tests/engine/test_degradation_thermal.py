"""Graceful degradation (entry, shrink, exit) and the thermal/power guard, with fake runner
outputs and fake probes."""
from ferry.engine.degradation import PressureGuard
from ferry.engine.thermal import ThermalGuard
from test_scheduler import (FakeRunner, assert_all_blocks_free, make_request, make_scheduler,
                            prompt_of, reference_generate, run)


def step(scheduler, runner):
    output = scheduler.schedule()
    scheduler.update_from_output(output, runner.execute(output))
    return output


def test_pressure_guard_enters_at_the_threshold_and_leaves_below_it_with_a_margin():
    guard = PressureGuard(0.8)
    assert not guard.update(0.79)
    assert guard.update(0.8) and guard.num_entries == 1
    assert guard.update(0.77)                 # inside the margin: still degraded
    assert not guard.must_shrink(0.85) and guard.must_shrink(0.95)
    assert not guard.update(0.7)
    assert not PressureGuard(1.0).update(1.0)   # 1.0: degradation off


def test_degraded_scheduler_admits_nothing_until_usage_falls():
    scheduler = make_scheduler(num_blocks=20, block_size=4, memory_pressure_threshold=0.5,
                               short_prompt_threshold=0)
    runner = FakeRunner(scheduler)
    first = [make_request(f"r{i}", prompt_of(20, i), max_tokens=4) for i in range(2)]
    for request in first:
        scheduler.add_request(request)
    step(scheduler, runner)                       # 2 x 5-6 blocks of 20: above 0.5
    late = make_request("late", prompt_of(4, 9), max_tokens=2)
    scheduler.add_request(late)
    output = step(scheduler, runner)
    assert scheduler.get_stats().degraded
    assert "late" not in {s.request_id for s in output.scheduled}
    assert not output.preempted_request_ids       # below the shrink level (0.75)
    while "late" not in {s.request_id for s in output.scheduled}:
        usage_before = scheduler.kv_cache_manager.usage
        output = step(scheduler, runner)
    # Admission resumed only once usage was below the threshold less the margin.
    assert usage_before < 0.45 and not scheduler.get_stats().degraded
    run(scheduler, runner)
    assert late.output_token_ids == reference_generate(late.prompt_token_ids, 2)
    assert_all_blocks_free(scheduler)


def test_degraded_scheduler_shrinks_the_batch_by_swapping_first():
    scheduler = make_scheduler(num_blocks=20, block_size=4, memory_pressure_threshold=0.5,
                               num_host_blocks=20, preemption_mode="swap",
                               scheduling_policy="priority")
    runner = FakeRunner(scheduler)
    requests = [make_request(f"r{i}", prompt_of(23, i), max_tokens=6, priority=i)
                for i in range(3)]
    for request in requests:
        scheduler.add_request(request)
    step(scheduler, runner)                       # 3 x 6 of 20 blocks = 0.9 > 0.75
    output = step(scheduler, runner)
    assert output.preempted_request_ids == {"r2"}         # the least urgent
    assert output.swap_out and scheduler.get_stats().preemptions_swap == 1
    run(scheduler, runner)
    for request in requests:
        assert request.output_token_ids == reference_generate(request.prompt_token_ids, 6)
    assert_all_blocks_free(scheduler)


class FakeSensor:
    def __init__(self, value):
        self.value = value

    def __call__(self):
        return self.value


def test_thermal_guard_throttles_above_the_limit_and_restores_after_cooling():
    sensor = FakeSensor(70.0)
    guard = ThermalGuard(75.0, None, temperature=sensor, read_every=1)
    assert not guard.update()
    sensor.value = 80.0
    assert guard.update() and guard.num_throttles == 1
    sensor.value = 73.0                           # below the limit, not 5 C below: still hot
    assert guard.update()
    sensor.value = 69.0
    assert not guard.update()
    sensor.value = 90.0
    assert guard.update() and guard.num_throttles == 2
    assert guard.temperature_c == 90.0


def test_power_guard_and_missing_probes():
    power = FakeSensor(300.0)
    guard = ThermalGuard(75.0, 250.0, power=power, read_every=1)
    assert guard.update()
    power.value = 240.0                           # within 10% of the limit: still throttled
    assert guard.update()
    power.value = 200.0
    assert not guard.update()
    assert not ThermalGuard(75.0, None).update()          # no probes: never throttles
    flaky = ThermalGuard(75.0, None, temperature=lambda: 1 / 0, read_every=1)
    assert not flaky.update()


def test_throttled_scheduler_lowers_prefill_limits_but_not_decodes():
    scheduler = make_scheduler(max_num_batched_tokens=64, prefill_parallelism=4)
    runner = FakeRunner(scheduler)
    decode = make_request("decode", prompt_of(4, 1), max_tokens=10)
    scheduler.add_request(decode)
    step(scheduler, runner)
    for i in range(3):
        scheduler.add_request(make_request(f"p{i}", prompt_of(30, i), max_tokens=2))
    scheduler.prefill_throttled = True
    output = step(scheduler, runner)
    shares = {s.request_id: s.num_tokens for s in output.scheduled}
    assert shares == {"decode": 1, "p0": 16}      # one prompt, a quarter of the budget
    assert scheduler.get_stats().thermal_throttled
    scheduler.prefill_throttled = False
    shares = {s.request_id: s.num_tokens for s in step(scheduler, runner).scheduled}
    assert len(shares) == 4


def test_degraded_scheduler_still_admits_a_more_urgent_request():
    """Degradation holds back requests no more urgent than the running ones; a more urgent
    one starts at once (priority policy), and the shrink then takes the least urgent."""
    scheduler = make_scheduler(num_blocks=20, block_size=4, memory_pressure_threshold=0.5,
                               short_prompt_threshold=0, scheduling_policy="priority")
    runner = FakeRunner(scheduler)
    lows = [make_request(f"low{i}", prompt_of(20, i), max_tokens=8, priority=5) for i in range(2)]
    for request in lows:
        scheduler.add_request(request)
    step(scheduler, runner)                       # 2 x 6 of 20 blocks: 0.6, degraded
    peer = make_request("peer", prompt_of(4, 7), max_tokens=2, priority=5)
    urgent = make_request("urgent", prompt_of(16, 8), max_tokens=4, priority=-1)
    scheduler.add_request(peer)
    scheduler.add_request(urgent)
    output = step(scheduler, runner)
    assert scheduler.get_stats().degraded
    scheduled = {s.request_id for s in output.scheduled}
    assert "urgent" in scheduled and "peer" not in scheduled
    output = step(scheduler, runner)              # 0.8 > the shrink level 0.75
    assert output.preempted_request_ids and "urgent" not in output.preempted_request_ids
    run(scheduler, runner)
    for request in [*lows, peer, urgent]:
        assert request.output_token_ids == reference_generate(request.prompt_token_ids,
                                                              request.sampling_params.max_tokens)
    assert_all_blocks_free(scheduler)
