"""The bundled demo model through the engine: its answers are checkable, so accuracy on a
fixed held-out set is an end-to-end correctness test. Batching, prefix caching, chunked
prefill and preemption must not change a single greedy answer."""
from __future__ import annotations

import pytest

from ferry import LLM, SamplingParams
from ferry.demo import DEMO_MODEL_DIR
from ferry.demo.tasks import accuracy_by_kind, check, make_problems

PROBLEMS = make_problems(200, seed=0, split="test")
GREEDY = SamplingParams(temperature=0.0, max_tokens=16)
MIN_ACCURACY = 0.85


def _answers(**config) -> tuple[list[str], "LLM"]:
    llm = LLM(**config)  # no model: the bundled demo model
    outs = llm.chat([p.messages for p in PROBLEMS], GREEDY, use_tqdm=False)
    return [o.outputs[0].text for o in outs], llm


@pytest.fixture(scope="module")
def baseline():
    return _answers()


def test_demo_model_is_bundled_and_served_by_default(baseline):
    _, llm = baseline
    assert llm.engine.model_dir == DEMO_MODEL_DIR
    assert llm.engine.served_model_name == "ferry-demo"


def test_demo_accuracy_with_all_requests_at_once(baseline):
    answers, llm = baseline
    accuracy = accuracy_by_kind(PROBLEMS, answers)
    assert accuracy["all"] >= MIN_ACCURACY, accuracy
    stats = llm.engine.get_stats()
    assert stats.kv_cache_usage == 0.0 and stats.num_running == 0


@pytest.mark.parametrize("mode", [
    dict(enable_prefix_caching=False),
    dict(max_num_batched_tokens=32, max_num_seqs=16),          # chunked prefill, small batches
    dict(kv_cache_memory="1MiB", block_size=4),                # preemption under memory pressure
])
def test_demo_answers_identical_under_batching_modes(baseline, mode):
    answers, _ = baseline
    other, llm = _answers(**mode)
    assert other == answers
    if "kv_cache_memory" in mode:
        assert llm.engine.get_stats().preemptions > 0
    assert sum(check(p, a) for p, a in zip(PROBLEMS, other)) == sum(
        check(p, a) for p, a in zip(PROBLEMS, answers))


def test_stop_reason_is_none_on_eos_and_the_id_for_stop_token_ids():
    llm = LLM()
    chat = [{"role": "user", "content": "Reverse: hello"}]
    eos = llm.chat(chat, SamplingParams(max_tokens=16), use_tqdm=False)[0].outputs[0]
    assert (eos.text, eos.finish_reason, eos.stop_reason) == ("olleh", "stop", None)
    end = llm.engine.eos_token_ids[0]
    asked = llm.chat(chat, SamplingParams(max_tokens=16, stop_token_ids=[end]),
                     use_tqdm=False)[0].outputs[0]
    assert (asked.finish_reason, asked.stop_reason) == ("stop", end)
