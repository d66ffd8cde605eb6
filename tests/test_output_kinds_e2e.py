"""DELTA outputs through the whole engine equal CUMULATIVE and FINAL_ONLY ones.

A tiny random Llama sampling at temperature 1 with a byte-level tokenizer emits byte
tokens, so its texts hold multi-byte characters split over tokens (and broken ones the
detokenizer must hold back). The same seeded batch runs once per kind (the same batch,
so even the logprobs' last bits agree), and the kinds must agree exactly: text, token
ids, logprobs with their top alternatives, finish and stop reasons.
"""
from __future__ import annotations

import pytest

from ferry import LLM, RequestOutputKind, SamplingParams

KINDS = tuple(RequestOutputKind)
PROMPTS = ["Once upon a time", "The capital of France is", "Numbers: 1 2 3",
           "Hello world! How", "A journey of a thousand", "Questions, answers"]


@pytest.fixture(scope="module")
def llm(tiny_model_dir):
    return LLM(str(tiny_model_dir("llama")), dtype="float32", kv_cache_memory="64MiB")


def run_all(llm: LLM, requests: dict[str, tuple[str, SamplingParams]]) -> dict[str, list]:
    """Every output of every request, by request id, all requests in one batch."""
    engine = llm.engine
    seen: dict[str, list] = {request_id: [] for request_id in requests}
    for request_id, (prompt, params) in requests.items():
        engine.add_request(request_id, prompt, params)
    while engine.has_unfinished_requests():
        for output in engine.step():
            seen[output.request_id].append(output)
    return seen


def folded(outputs: list) -> list[tuple]:
    """A DELTA stream's outputs added up, per completion index."""
    texts, tokens, logprobs, last = {}, {}, {}, {}
    for output in outputs:
        for c in output.outputs:
            texts[c.index] = texts.get(c.index, "") + c.text
            tokens.setdefault(c.index, []).extend(c.token_ids)
            if c.logprobs is not None:
                logprobs.setdefault(c.index, []).extend(c.logprobs)
            last[c.index] = c
    return [(i, texts[i], tokens[i], _logprobs(logprobs.get(i)), last[i].finish_reason,
             last[i].stop_reason, last[i].cumulative_logprob, last[i].num_generated_tokens)
            for i in sorted(last)]


def final(output) -> list[tuple]:
    return [(c.index, c.text, list(c.token_ids), _logprobs(c.logprobs), c.finish_reason,
             c.stop_reason, c.cumulative_logprob, c.num_generated_tokens) for c in output.outputs]


def _logprobs(entries):
    return None if not entries else [(e.token_id, e.logprob, list(e.top)) for e in entries]


def stop_strings(outputs: list) -> list[str]:
    """A stop string for the completion of each probe: 3 characters across the boundary
    between two steps' text (so across tokens), found in the middle of its text."""
    cumulative = outputs[-1].outputs[0].text
    boundaries = sorted({len(o.outputs[0].text) for o in outputs})
    for cut in boundaries[len(boundaries) // 3:]:
        piece = cumulative[cut - 1:cut + 2]
        if len(piece) == 3 and piece.strip() and cumulative.find(piece) == cut - 1:
            return [piece, "never-in-the-text"]
    return ["never-in-the-text"]


def test_delta_cumulative_and_final_only_agree_through_the_engine(llm):
    base = dict(temperature=1.0, max_tokens=40, logprobs=3, n=2, ignore_eos=True)
    probes = run_all(llm, {f"probe{i}": (p, SamplingParams(seed=i, **base))
                           for i, p in enumerate(PROMPTS)})
    assert any("\ufffd" in llm.get_tokenizer().decode([t]) for outs in probes.values()
               for t in outs[-1].outputs[0].token_ids), "no byte token was drawn: nothing split"
    requests = {}
    for i, prompt in enumerate(PROMPTS):
        stops = stop_strings(probes[f"probe{i}"])
        requests[str(i)] = (prompt, SamplingParams(
            seed=i, stop=stops, include_stop_str_in_output=i % 2 == 1, **base))
    seen = {kind: run_all(llm, {rid: (prompt, params.clone(output_kind=kind))
                                for rid, (prompt, params) in requests.items()})
            for kind in KINDS}

    stopped = 0
    for rid in requests:
        cumulative, delta, final_only = (seen[kind][rid] for kind in KINDS)
        expected = final(cumulative[-1])
        assert folded(delta) == expected
        assert len(final_only) == 1 and final(final_only[0]) == expected
        assert len(delta) == len(cumulative)   # one output per step, either way
        stopped += sum(c.finish_reason == "stop" for c in cumulative[-1].outputs)
    assert stopped >= len(PROMPTS), "the stop strings should end most completions"
    assert llm.engine.get_stats().kv_cache_usage == 0.0


def test_llm_generate_is_unchanged_by_the_kind(llm):
    """LLM.generate returns final cumulative outputs, whatever output_kind says."""
    outputs = {kind: llm.generate(PROMPTS[:2], SamplingParams(seed=5, temperature=1.0,
                                                               max_tokens=12, output_kind=kind),
                                  use_tqdm=False)
               for kind in KINDS}
    expected = [final(o) for o in outputs[RequestOutputKind.CUMULATIVE]]
    for kind in KINDS:
        assert [final(o) for o in outputs[kind]] == expected
        assert all(len(o.outputs[0].token_ids) == 12 or o.outputs[0].finish_reason == "stop"
                   for o in outputs[kind])
