"""Nothing reaches the runner outside the SchedulerOutput message.

A mixed workload (prefix hits, chunked prefill, preemption, aborts, seeds, penalties,
async scheduling on) runs through an executor that pickles every message it is given.
The pickles are then replayed, in order, into a fresh runner built from the same
checkpoint: every step must sample the same tokens. A runner that read live engine state
(a request's token list, its whole block table) would diverge or fail here, since the
replayed one only has the bytes.
"""
from __future__ import annotations

import pickle
import random

import pytest

from ferry.config import EngineConfig
from ferry.engine.engine import Engine
from ferry.executor.in_process import InProcessExecutor
from ferry.sampling_params import SamplingParams
from test_engine_e2e import _budget_for_blocks
from tiny_models import make_tiny_model


class RecordingExecutor(InProcessExecutor):
    """Pickles each message on its way in, and each step's output on its way out."""

    def __init__(self, config):
        super().__init__(config)
        self.messages: list[bytes] = []
        self.outputs: dict[int, object] = {}    # message index -> what its step sampled

    def launch(self, scheduler_output):
        self.messages.append(pickle.dumps(scheduler_output))
        return len(self.messages) - 1, super().launch(scheduler_output)

    def collect(self, handle):
        index, pending = handle
        self.outputs[index] = output = super().collect(pending)
        return output

    def execute(self, scheduler_output):
        return self.collect(self.launch(scheduler_output))


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return str(make_tiny_model("llama", tmp_path_factory.mktemp("replay") / "llama"))


def _mixed_workload(engine: Engine) -> None:
    """Shared prefixes, long prompts, more requests than the KV cache holds, aborts."""
    rng = random.Random(7)
    prefix = [rng.randrange(3, 256) for _ in range(24)]
    params = [SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True),
              SamplingParams(temperature=0.9, top_p=0.8, seed=5, max_tokens=9, ignore_eos=True),
              SamplingParams(temperature=0.0, repetition_penalty=1.3, max_tokens=8, ignore_eos=True)]
    for i in range(10):
        prompt = (prefix if i % 2 else []) + [rng.randrange(3, 256) for _ in range(rng.randint(4, 30))]
        engine.add_request(f"r{i}", prompt, params[i % 3])
    for step in range(400):
        if step == 3:
            engine.abort_request(["r4", "r7"])
        if step == 6:
            engine.add_request("late", prefix + [9, 9, 9], params[0])
        if not engine.has_unfinished_requests():
            return
        engine.step()
    raise AssertionError("the workload did not finish")


def test_replayed_pickles_give_a_fresh_runner_the_same_tokens(llama_dir):
    config = EngineConfig.from_flat(
        model=llama_dir, dtype="float32", block_size=4, max_num_batched_tokens=24,
        max_num_seqs=6, kv_cache_memory=_budget_for_blocks(llama_dir, 24),
        async_scheduling="on")
    recorder = RecordingExecutor(config)
    engine = Engine(config, recorder)
    _mixed_workload(engine)
    stats = engine.get_stats()
    assert stats.preemptions > 0 and stats.prefix_cache_hits > 0 and stats.kv_cache_usage == 0.0
    messages = [pickle.loads(m) for m in recorder.messages]
    assert any(not s.sample for m in messages for s in m.scheduled), "no chunked prefill"
    assert any(s.num_placeholders for m in messages for s in m.scheduled), "async was off"

    fresh = InProcessExecutor(config)
    fresh.initialize_cache(engine.num_blocks)
    replayed = [fresh.collect(fresh.launch(message)) for message in messages]
    assert len(recorder.outputs) > 20
    for index, output in recorder.outputs.items():
        assert replayed[index] == output, f"step {index}"
