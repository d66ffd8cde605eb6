"""Constrained generation through the engine (LLM API, tiny random model at temperature
1.0, so only the mask makes outputs valid): JSON schemas, choice, regex, the length
limit, free requests untouched by constrained neighbours, a request waiting for its
grammar without blocking others, and async scheduling."""
from __future__ import annotations

import json
import re
import threading

import pytest

from ferry import LLM, SamplingParams

jsonschema = pytest.importorskip("jsonschema")
pytest.importorskip("xgrammar")

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["name", "tags"],
          "properties": {"name": {"type": "string", "maxLength": 6},
                         "tags": {"type": "array", "maxItems": 2,
                                  "items": {"enum": ["a", "b", "c"]}}}}


@pytest.fixture(scope="module")
def llm(tiny_model_dir):
    return LLM(model=str(tiny_model_dir("llama")), kv_cache_memory="64MiB")


def _json(seed, schema=SCHEMA, max_tokens=120):
    return SamplingParams(temperature=1.0, seed=seed, max_tokens=max_tokens,
                          structured_outputs={"json": schema})


def test_json_schema_outputs_validate(llm):
    outs = llm.generate(["Hello"] * 4, [_json(seed) for seed in range(4)], use_tqdm=False)
    for out in outs:
        completion = out.outputs[0]
        assert completion.finish_reason == "stop", completion.text
        jsonschema.validate(json.loads(completion.text), SCHEMA)


def test_choice_and_regex(llm):
    choice = SamplingParams(temperature=1.0, seed=1, max_tokens=20,
                            structured_outputs={"choice": ["red", "green", "blue"]})
    regex = SamplingParams(temperature=1.0, seed=2, max_tokens=20,
                           structured_outputs={"regex": r"[0-9]{3}-[a-z]{2}"})
    outs = llm.generate(["Pick", "Code"], [choice, regex], use_tqdm=False)
    assert outs[0].outputs[0].text in ("red", "green", "blue")
    assert re.fullmatch(r"[0-9]{3}-[a-z]{2}", outs[1].outputs[0].text)


def test_running_out_of_max_tokens_is_length_with_the_partial_text(llm):
    out = llm.generate(["Hello"], _json(0, max_tokens=3), use_tqdm=False)[0].outputs[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 3
    assert out.text.startswith('{"')


def test_free_requests_get_the_same_tokens_beside_constrained_ones(llm):
    free = [SamplingParams(temperature=1.0, seed=100 + i, max_tokens=12) for i in range(3)]
    alone = llm.generate(["Once upon", "The sun", "Paris is"], free, use_tqdm=False)
    mixed = llm.generate(["Once upon", "Hello", "The sun", "Pick", "Paris is"],
                         [free[0], _json(7), free[1], _json(8), free[2]], use_tqdm=False)
    assert [o.outputs[0].token_ids for o in alone] == \
           [mixed[i].outputs[0].token_ids for i in (0, 2, 4)]


def test_bad_constraint_raises_before_generation(llm):
    with pytest.raises(ValueError, match="minimum.*greater than maximum"):
        llm.generate(["x"], _json(0, {"type": "integer", "minimum": 9, "maximum": 1}),
                     use_tqdm=False)
    assert not llm.engine.has_unfinished_requests()


class _SlowCompiler:
    """Holds every compile until ``release`` is set (the engine must not wait for it)."""

    def __init__(self, inner) -> None:
        self.inner, self.release = inner, threading.Event()

    def submit(self, spec):
        from concurrent.futures import ThreadPoolExecutor
        pool = ThreadPoolExecutor(1)
        return pool.submit(lambda: (self.release.wait(30), self.inner.compile(spec))[1])


def test_a_request_waiting_for_its_grammar_does_not_block_others(llm):
    engine = llm.engine
    manager = engine.structured_output
    real = manager.compiler
    manager.compiler = slow = _SlowCompiler(real)
    try:
        engine.add_request("constrained", "Hello", _json(3), stream=False)
        engine.add_request("free", "Hello", SamplingParams(max_tokens=5), stream=False)
        finished = {}
        for _ in range(50):
            for out in engine.step():
                finished[out.request_id] = out
            if "free" in finished:
                break
        assert "free" in finished and "constrained" not in finished
        assert engine.get_stats().num_waiting == 1   # waiting for its grammar
        slow.release.set()
        while engine.has_unfinished_requests():
            for out in engine.step():
                finished[out.request_id] = out
        jsonschema.validate(json.loads(finished["constrained"].outputs[0].text), SCHEMA)
    finally:
        manager.compiler = real


def test_async_scheduling_keeps_constraints(tiny_model_dir):
    llm = LLM(model=str(tiny_model_dir("llama")), kv_cache_memory="64MiB",
              async_scheduling="on")
    outs = llm.generate(["Hi"] * 3 + ["free"],
                        [_json(s) for s in range(3)] + [SamplingParams(max_tokens=8)],
                        use_tqdm=False)
    for out in outs[:3]:
        jsonschema.validate(json.loads(out.outputs[0].text), SCHEMA)
    assert len(outs[3].outputs[0].token_ids) == 8


class _FailingCompiler:
    def submit(self, spec):
        from concurrent.futures import Future
        from ferry.structured_output.backend import GrammarError
        future = Future()
        future.set_exception(GrammarError("no"))
        return future


def test_a_grammar_that_fails_in_the_engine_ends_its_request_only(llm):
    engine = llm.engine
    manager = engine.structured_output
    real, manager.compiler = manager.compiler, _FailingCompiler()
    try:
        engine.add_request("bad", "Hello", _json(1), stream=False)
        engine.add_request("good", "Hello", SamplingParams(max_tokens=3), stream=False)
        finished = {}
        while engine.has_unfinished_requests():
            for out in engine.step():
                finished[out.request_id] = out
        assert finished["bad"].outputs[0].finish_reason == "abort"
        assert len(finished["good"].outputs[0].token_ids) == 3
        assert engine.scheduler.kv_cache_manager.usage == 0
    finally:
        manager.compiler = real


def test_ignore_eos_cannot_be_combined_with_a_constraint():
    with pytest.raises(ValueError, match="ignore_eos"):
        SamplingParams(ignore_eos=True, structured_outputs={"regex": "a+"})
