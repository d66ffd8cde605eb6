"""Async scheduling with constrained requests: the mask for step N+1 is computed while
step N runs (the forward pass of N+1 is launched before step N's tokens are collected,
and N+1 samples once the mask they give is known). Tokens must be exactly those of async
scheduling off (seeded, temperature 1.0), for constrained and free requests alike, and
no KV block may be left behind."""
from __future__ import annotations

import json

import pytest

from ferry import LLM, SamplingParams

jsonschema = pytest.importorskip("jsonschema")
pytest.importorskip("xgrammar")

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["id", "tags"],
          "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 999},
                         "tags": {"type": "array", "maxItems": 3,
                                  "items": {"enum": ["x", "yy", "zzz"]}}}}


def _constrained(seed):
    return SamplingParams(temperature=1.0, seed=seed, max_tokens=60,
                          structured_outputs={"json": SCHEMA})


def _free(seed):
    return SamplingParams(temperature=1.0, seed=seed, max_tokens=12, ignore_eos=True)


def _llm(model_dir, async_scheduling):
    return LLM(model=str(model_dir), kv_cache_memory="64MiB", async_scheduling=async_scheduling)


class CallLog:
    """Records the order of the executor's calls, each with the step it belongs to."""

    def __init__(self, executor):
        self.events: list[tuple[str, int]] = []
        self._steps: dict[int, int] = {}   # id(handle) -> step number (live handles)
        self._launched = 0
        for name in ("launch", "launch_deferred", "collect", "sample_deferred"):
            setattr(executor, name, self._wrap(name, getattr(executor, name)))

    def _wrap(self, name, method):
        def call(first, *args):
            if name.startswith("launch"):
                handle = method(first, *args)
                self._steps[id(handle)] = step = self._launched
                self._launched += 1
                self.events.append((name, step))
                return handle
            self.events.append((name, self._steps[id(first)]))
            return method(first, *args)
        return call


def _assert_blocks_free(llm):
    pool = llm.engine.scheduler.kv_cache_manager.block_pool
    assert pool.num_free_blocks == pool.num_blocks
    assert llm.engine.scheduler.get_stats().kv_cache_usage == 0.0


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir):
    return tiny_model_dir("llama")


def test_constrained_and_free_tokens_equal_async_off(model_dir):
    prompts = ["Hi", "Data:", "free one", "free two", "{"]
    params = [_constrained(1), _constrained(2), _free(3), _free(4), _constrained(5)]
    results = {}
    for mode in ("off", "on"):
        llm = _llm(model_dir, mode)
        outs = llm.generate(prompts, params, use_tqdm=False)
        results[mode] = [list(o.outputs[0].token_ids) for o in outs]
        for out, p in zip(outs, params):
            if p.structured_outputs is not None:
                jsonschema.validate(json.loads(out.outputs[0].text), SCHEMA)
        _assert_blocks_free(llm)
        if mode == "on":
            assert llm.engine.num_deferred_samplings > 0   # the overlapping path ran
    assert results["on"] == results["off"]


def test_the_next_step_launches_before_the_step_in_flight_is_collected(model_dir):
    llm = _llm(model_dir, "on")
    log = CallLog(llm.engine.executor)
    outs = llm.generate(["a", "b"], [_constrained(7), _constrained(8)], use_tqdm=False)
    for out in outs:
        jsonschema.validate(json.loads(out.outputs[0].text), SCHEMA)
    events = log.events
    deferred = [step for name, step in events if name == "launch_deferred"]
    assert len(deferred) >= 5   # every decode step of the constrained requests overlapped
    for step in deferred:
        # Step N+1's forward was launched before step N was collected; it sampled after.
        assert (events.index(("launch_deferred", step)) < events.index(("collect", step - 1))
                < events.index(("sample_deferred", step)) < events.index(("collect", step)))
    # No step waited for the one in flight before launching (only constrained requests).
    plain = [step for name, step in events if name == "launch"]
    for step in plain[1:]:
        assert ("collect", step - 1) not in events[:events.index(("launch", step))]
    _assert_blocks_free(llm)
