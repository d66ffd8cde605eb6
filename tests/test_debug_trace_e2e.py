"""The attention debug trace end to end: LLM.generate(debug_trace=True) and the HTTP
extension field, against HF's eager attention weights; untraced requests unchanged and
untraced steps never call the trace op; bounded memory; JSON lines; the refusal when off."""
from __future__ import annotations

import json
import random

import pytest
import torch
from starlette.testclient import TestClient

import ferry.kernels
from ferry import LLM, SamplingParams
from ferry.engine.debug_trace import build_trace, entropy_jumps

GREEDY = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)


@pytest.fixture(scope="module")
def llama_dir(tiny_model_dir):
    return str(tiny_model_dir("llama"))


def _prompt(seed: int, n: int = 11) -> dict:
    rng = random.Random(seed)
    return {"prompt_token_ids": [rng.randrange(3, 256) for _ in range(n)]}


@torch.inference_mode()
def _hf_entropy(model_dir: str, ids: list[int]) -> list[torch.Tensor]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32,
                                                 attn_implementation="eager").eval()
    attentions = model(torch.tensor([ids]), output_attentions=True).attentions
    return [-(a[0] * torch.log(a[0].clamp_min(1e-30))).sum(-1) for a in attentions]  # (H, L)


@pytest.mark.parametrize("prompt_too", [False, True])
def test_generate_traces_match_hf(llama_dir, prompt_too):
    llm = LLM(llama_dir, dtype="float32", kv_cache_memory="16MiB", debug_trace="attention",
              debug_trace_prompt=prompt_too, debug_trace_top_k=3, max_num_batched_tokens=8)
    prompt = _prompt(0)
    untraced = llm.generate([prompt, _prompt(1)], [GREEDY, GREEDY], use_tqdm=False)
    out = llm.generate([prompt], GREEDY, use_tqdm=False, debug_trace=True)[0]
    assert out.outputs[0].token_ids == untraced[0].outputs[0].token_ids   # tracing changes nothing
    assert untraced[0].debug_trace is None and untraced[1].debug_trace is None
    trace = out.debug_trace
    n = len(prompt["prompt_token_ids"])
    generated = out.outputs[0].token_ids
    first = 0 if prompt_too else n - 1
    assert trace["positions"] == list(range(first, n + len(generated) - 1))
    ids = prompt["prompt_token_ids"] + generated[:-1]
    assert len(trace["tokens"]) == n + len(generated)
    expected = _hf_entropy(llama_dir, ids)
    for layer, hf in enumerate(expected):
        for head, data in enumerate(trace["layers"][layer]["heads"]):
            got = torch.tensor(data["entropy"])
            torch.testing.assert_close(got, hf[head, trace["positions"]], atol=1e-4, rtol=0)
            assert all(len(top) == min(3, p + 1) for top, p in zip(data["top"], trace["positions"]))
            assert data["flagged"] == entropy_jumps(data["entropy"], trace["entropy_jump"])


def test_untraced_steps_never_call_the_trace_op(llama_dir, monkeypatch):
    calls = []
    original = ferry.kernels.attention_trace
    monkeypatch.setattr(ferry.kernels, "attention_trace",
                        lambda *a, **k: calls.append(1) or original(*a, **k))
    llm = LLM(llama_dir, dtype="float32", kv_cache_memory="16MiB", debug_trace="attention")
    llm.generate([_prompt(2)], GREEDY, use_tqdm=False)
    assert calls == []
    llm.generate([_prompt(2)], GREEDY, use_tqdm=False, debug_trace=True)
    assert len(calls) == GREEDY.max_tokens * llm.engine.executor.runner.model.num_layers


def test_memory_is_bounded_and_json_lines_are_written(llama_dir, tmp_path):
    llm = LLM(llama_dir, dtype="float32", kv_cache_memory="16MiB", debug_trace="attention",
              debug_trace_max_tokens=3, debug_trace_dir=str(tmp_path / "traces"))
    out = llm.generate([_prompt(3)], GREEDY, use_tqdm=False, debug_trace=True)[0]
    assert len(out.debug_trace["positions"]) == 3
    [path] = (tmp_path / "traces").glob("attention-*.jsonl")
    line = json.loads(path.read_text().splitlines()[-1])
    assert line["request_id"] == out.request_id and line["debug_trace"]["positions"] == \
        out.debug_trace["positions"]


def test_n_samples_keep_a_trace_each(llama_dir):
    llm = LLM(llama_dir, dtype="float32", kv_cache_memory="16MiB", debug_trace="attention")
    params = SamplingParams(temperature=1.0, max_tokens=4, n=2, seed=1, ignore_eos=True)
    out = llm.generate([_prompt(4)], params, use_tqdm=False, debug_trace=True)[0]
    assert [len(t["positions"]) for t in out.debug_trace["completions"]] == [4, 4]


def test_refused_when_the_server_does_not_trace(llama_dir):
    llm = LLM(llama_dir, dtype="float32", kv_cache_memory="16MiB")
    with pytest.raises(ValueError, match="--debug-trace attention"):
        llm.generate([_prompt(5)], GREEDY, use_tqdm=False, debug_trace=True)


def test_anomaly_flags_mark_entropy_jumps():
    record = lambda p, e: {"position": p, "entropy": [[e]], "top_positions": [[[0, -1]]],
                           "top_weights": [[[1.0, 0.0]]]}
    trace = build_trace([record(5, 0.1), record(3, 0.2), record(4, 2.0)], entropy_jump=1.0)
    assert trace["positions"] == [3, 4, 5]
    head = trace["layers"][0]["heads"][0]
    assert head["flagged"] == [1, 2] and head["top"][0] == [[0, 1.0]]   # padding dropped
    assert [a["position"] for a in trace["anomalies"]] == [4, 5]


def test_http_extension_and_the_trace_route():
    from ferry.config import EngineConfig, ServerConfig
    from ferry.llm import build_engine
    from ferry.server.api_server import build_app

    engine = build_engine(EngineConfig.from_flat(debug_trace="attention"))   # the demo model
    body = {"messages": [{"role": "user", "content": "Reverse: hello"}], "max_tokens": 8,
            "temperature": 0}
    with TestClient(build_app(engine, ServerConfig(api_key="k"))) as client:
        auth = {"Authorization": "Bearer k"}
        resp = client.post("/v1/chat/completions", json={**body, "debug_trace": True},
                           headers=auth).json()
        choice = resp["choices"][0]
        assert choice["message"]["content"] == "olleh"
        trace = choice["debug_trace"]
        assert trace["num_layers"] == len(trace["layers"]) > 0
        assert client.get(f"/debug/trace/{resp['id']}").status_code == 401
        stored = client.get(f"/debug/trace/{resp['id']}", headers=auth).json()
        assert stored["debug_trace"] == trace
        assert client.get("/debug/trace/nope", headers=auth).status_code == 404
        plain = client.post("/v1/chat/completions", json=body, headers=auth).json()
        assert "debug_trace" not in plain["choices"][0]
        done = client.post("/v1/completions", headers=auth, json={
            "prompt": "<|user|>Uppercase: tree<|end|><|assistant|>", "max_tokens": 8,
            "temperature": 0, "debug_trace": True}).json()
        assert done["choices"][0]["text"] == "TREE" and done["choices"][0]["debug_trace"]
    off = build_engine(EngineConfig.from_flat())
    with TestClient(build_app(off, ServerConfig())) as client:
        resp = client.post("/v1/chat/completions", json={**body, "debug_trace": True})
        assert resp.status_code == 400 and "--debug-trace" in resp.json()["error"]["message"]


def _fake_quantizing_write(real):
    """A float32 cache holding what an FP8 cache would: K/V rounded to e4m3 and back."""
    def fake_quant(x):
        return x.float().clamp(-448, 448).to(torch.float8_e4m3fn).to(x.dtype)
    return lambda key, value, kv_cache, slots: real(fake_quant(key), fake_quant(value),
                                                    kv_cache, slots)


@pytest.mark.parametrize("backend", ["cpp", "reference"])
def test_fp8_kv_cache_traces_match_the_dequantized_cache(llama_dir, monkeypatch, backend):
    """With ``kv_cache_dtype: fp8`` a traced request gets its trace, computed from the
    dequantized keys the FP8 attention reads: equal (float32 rounding) to the trace of a
    float32 cache holding the same fake-quantized K/V. The untraced request beside it in
    the batch gets none and the same tokens."""
    from ferry.kernels import reference

    if backend == "reference":   # every op, the trace included, on the PyTorch reference
        monkeypatch.setitem(ferry.kernels._ops_by_device_type, "cpu", reference)
    elif ferry.kernels.prepare(torch.device("cpu")) != "cpu":
        pytest.skip("the C++ CPU kernels are not available here")
    else:   # the C++ FP8 trace kernel, not a fallback to the PyTorch op
        from ferry.kernels.cpu._lib import functions

        fp8_kernel, calls = functions().attention_trace_fp8, []
        monkeypatch.setattr(functions(), "attention_trace_fp8",
                            lambda *args: calls.append(fp8_kernel(*args)) or calls[-1])
    settings = dict(dtype="float32", kv_cache_memory="16MiB", debug_trace="attention",
                    debug_trace_prompt=True, debug_trace_top_k=3, max_num_batched_tokens=8)
    prompts = [_prompt(6), _prompt(7, n=9)]
    params = [GREEDY.clone(debug_trace=True), GREEDY]

    fp8_llm = LLM(llama_dir, kv_cache_dtype="fp8", **settings)
    assert fp8_llm.engine.executor.runner.kv_caches[0].dtype == torch.float8_e4m3fn
    traced, untraced = fp8_llm.generate(prompts, params, use_tqdm=False)
    monkeypatch.setattr(ferry.kernels, "write_kv_cache",
                        _fake_quantizing_write(ferry.kernels.write_kv_cache))
    want, want_untraced = LLM(llama_dir, **settings).generate(prompts, params, use_tqdm=False)

    if backend == "cpp":
        num_layers = fp8_llm.engine.executor.runner.model.num_layers
        assert calls and set(calls) == {0} and len(calls) % num_layers == 0
    assert untraced.debug_trace is None
    assert untraced.outputs[0].token_ids == want_untraced.outputs[0].token_ids
    assert traced.outputs[0].token_ids == want.outputs[0].token_ids
    got, expected = traced.debug_trace, want.debug_trace
    assert got is not None and got["layers"], "no attention trace over the FP8 KV cache"
    n = len(prompts[0]["prompt_token_ids"])
    assert got["positions"] == expected["positions"] == list(range(n + GREEDY.max_tokens - 1))
    for got_layer, want_layer in zip(got["layers"], expected["layers"], strict=True):
        for got_head, want_head in zip(got_layer["heads"], want_layer["heads"], strict=True):
            torch.testing.assert_close(torch.tensor(got_head["entropy"]),
                                       torch.tensor(want_head["entropy"]), atol=1e-5, rtol=0)
            for got_top, want_top in zip(got_head["top"], want_head["top"], strict=True):
                torch.testing.assert_close(torch.tensor(got_top), torch.tensor(want_top),
                                           atol=1e-5, rtol=0)
