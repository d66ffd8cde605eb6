"""LoRA adapters on a model split over 2 ranks (gloo, 2 processes): tensor parallel (adapters
sharded like their layers) and pipeline parallel (each stage its layers' adapters).

A batch mixing two random adapters and the base model gives, for every request, the same
greedy tokens and top logprobs as PEFT's ``merge_and_unload()`` model and the same tokens
as one rank; under TP=2 an adapter is loaded while the engine runs, a bad one is refused
by every rank with the reason (and the engine keeps serving), and an unloaded one is gone.
"""
from __future__ import annotations

import json
import random
import shutil

import pytest

pytest.importorskip("peft")

from ferry import LLM, LoRARequest, SamplingParams  # noqa: E402
from ferry.lora.adapter_config import LoRAError  # noqa: E402
from hf_reference import NEAR_TIE  # noqa: E402
from peft_adapters import make_adapter, merged_greedy  # noqa: E402

STEPS = 5
ADAPTERS = {
    "all-r8": dict(seed=21, r=8, alpha=16),
    "mlp-o-r4-rslora": dict(seed=22, r=4, alpha=8, use_rslora=True,
                            targets=("q_proj", "o_proj", "gate_proj", "up_proj", "down_proj")),
}


@pytest.fixture(scope="module")
def setup(tiny_model_dir, tmp_path_factory):
    base = tiny_model_dir("llama", num_key_value_heads=1)   # 1 KV head: replicated on both ranks
    root = tmp_path_factory.mktemp("parallel_adapters")
    adapters = {name: str(make_adapter(base, root / name, **opts)) for name, opts in ADAPTERS.items()}
    return str(base), adapters, root


def _prompts(seed: int = 5) -> tuple[list[list[int]], list[str | None]]:
    rng = random.Random(seed)
    prefix = [rng.randrange(3, 256) for _ in range(8)]
    prompts = [prefix + [rng.randrange(3, 256) for _ in range(rng.randint(2, 20))] for _ in range(6)]
    names = [None, *ADAPTERS]
    return prompts, [names[i % 3] for i in range(6)]


def _llm(base: str, **kwargs) -> LLM:
    return LLM(base, dtype="float32", block_size=4, enable_lora=True, max_lora_rank=8,
               kv_cache_memory="16MiB", max_num_batched_tokens=16, distributed_timeout_seconds=60,
               **kwargs)


def _generate(llm: LLM, adapters: dict[str, str], prompts, loras):
    params = SamplingParams(temperature=0.0, max_tokens=STEPS, ignore_eos=True, logprobs=3)
    requests = [None if n is None else LoRARequest(n, i + 1, adapters[n]) for i, n in enumerate(loras)]
    return llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False,
                        lora_request=requests)


def _check_against_peft(base: str, adapters: dict[str, str], prompts, loras, outs, context: str):
    for prompt, name, out in zip(prompts, loras, outs):
        completion = out.outputs[0]
        want = merged_greedy(base, adapters.get(name), prompt, STEPS)
        for step, (got, lp, (token, logsoftmax, gap)) in enumerate(
                zip(completion.token_ids, completion.logprobs, want)):
            if got != token:
                assert gap < NEAR_TIE, f"{context}/{name}: step {step}: {got} != PEFT {token}"
                break
            for top_id, top_logprob in lp.top:
                assert abs(top_logprob - float(logsoftmax[top_id])) < 2e-4, (
                    f"{context}/{name}: step {step}: logprob of {top_id}")


def _tokens(outs) -> list[list[int]]:
    return [list(o.outputs[0].token_ids) for o in outs]


@pytest.fixture(scope="module")
def one_rank(setup):
    """The mixed batch on one process (in-process executor): (prompts, adapters, outputs)."""
    base, adapters, _ = setup
    prompts, loras = _prompts()
    return prompts, loras, _generate(_llm(base), adapters, prompts, loras)


def _top(outs) -> list[list[list[tuple[int, float]]]]:
    return [[list(lp.top) for lp in o.outputs[0].logprobs] for o in outs]


def test_adapters_change_outputs_and_one_rank_matches_peft(setup, one_rank):
    base, adapters, _ = setup
    prompts, loras, outs = one_rank
    _check_against_peft(base, adapters, prompts, loras, outs, "tp1")
    plain = [[t for t, _, _ in merged_greedy(base, None, p, STEPS)] for p in prompts]
    assert sum(got != ref for got, ref, n in zip(_tokens(outs), plain, loras) if n) >= 2, (
        "the adapters must change the outputs, or the test proves nothing")


@pytest.mark.parametrize("tp,pp,extra", [(2, 1, {}), (2, 1, {"async_scheduling": "on"}),
                                         (1, 2, {})], ids=["tp2", "tp2-async", "pp2"])
def test_mixed_adapters_over_two_ranks_match_peft_and_one_rank(setup, one_rank, tp, pp, extra):
    base, adapters, _ = setup
    prompts, loras, single = one_rank
    llm = _llm(base, tensor_parallel_size=tp, pipeline_parallel_size=pp, **extra)
    try:
        outs = _generate(llm, adapters, prompts, loras)
        _check_against_peft(base, adapters, prompts, loras, outs, f"tp{tp}-pp{pp}")
        assert _tokens(outs) == _tokens(single)
        for got, want in zip(_top(outs), _top(single)):   # the same logits as one rank
            for got_step, want_step in zip(got, want):
                assert [i for i, _ in got_step] == [i for i, _ in want_step]
                assert max(abs(a - b) for (_, a), (_, b) in zip(got_step, want_step)) < 1e-5
        stats = llm.engine.get_stats()
        assert stats.num_running == 0 and stats.kv_cache_usage == 0.0
        assert llm.engine.lora.num_in_flight() == 0
    finally:
        llm.engine.executor.shutdown()


def test_dynamic_load_bad_adapter_and_unload_under_tp2(setup, tmp_path):
    base, adapters, _ = setup
    prompts, _ = _prompts(seed=9)
    llm = _llm(base, tensor_parallel_size=2, max_loras=1, max_cpu_loras=1)
    try:
        before = _generate(llm, adapters, prompts[:2], [None, None])
        _check_against_peft(base, adapters, prompts[:2], [None, None], before, "base")
        broken = tmp_path / "broken"
        shutil.copytree(adapters["all-r8"], broken)
        config = json.loads((broken / "adapter_config.json").read_text())
        (broken / "adapter_config.json").write_text(json.dumps({**config, "r": 32}))
        with pytest.raises(LoRAError, match="rank"):
            llm.load_lora("broken", str(broken))
        assert llm.engine.lora.registry.get("broken") is None
        # Loaded while running, one slot for two adapters: swaps on every rank alike.
        llm.load_lora("all-r8", adapters["all-r8"])
        llm.load_lora("mlp-o-r4-rslora", adapters["mlp-o-r4-rslora"])
        names = ["all-r8", "mlp-o-r4-rslora", None, "all-r8"]
        outs = _generate(llm, adapters, prompts[:4], names)
        _check_against_peft(base, adapters, prompts[:4], names, outs, "dynamic")
        assert llm.engine.executor.lora_stats()["swaps_out"] > 0
        llm.unload_lora("all-r8")
        with pytest.raises(Exception, match="all-r8"):
            _generate(llm, {"all-r8": None}, prompts[:1], ["all-r8"])
    finally:
        llm.engine.executor.shutdown()


def test_an_adapter_another_rank_refused_is_loaded_on_no_rank(monkeypatch):
    """The agreement: a rank that accepted an adapter drops it when another refused it."""
    from types import SimpleNamespace

    from ferry.executor import rank_worker

    removed = []
    worker = SimpleNamespace(lora=SimpleNamespace(add=lambda lora_id, path: None,
                                                  remove=removed.append), ctx=None)
    monkeypatch.setattr(rank_worker, "all_reduce_min", lambda ctx, value, what: 0)
    with pytest.raises(LoRAError, match="refused by another rank"):
        rank_worker.RankWorker.add_lora(worker, 7, "/adapters/x")
    assert removed == [7]
    monkeypatch.setattr(rank_worker, "all_reduce_min", lambda ctx, value, what: value)
    rank_worker.RankWorker.add_lora(worker, 8, "/adapters/x")   # every rank accepted
    assert removed == [7]


def test_tp2_server_loads_an_adapter_while_a_request_streams(setup):
    """``ferry serve --tensor-parallel-size 2``: POST /v1/load_lora_adapter during a stream,
    then the adapter answers with PEFT's tokens, named in the response and in /metrics."""
    import threading

    import httpx
    from process_tree import reap, wait_gone, worker_pids   # first: puts tests/server on the path
    from ferry_server_process import metric, scrape, start_server
    from transformers import AutoTokenizer

    base, adapters, root = setup
    served = root / "served"
    shutil.copytree(adapters["all-r8"], served / ".staging" / "a")
    prompt = [(5 * i + 7) % 250 + 3 for i in range(24)]
    server = start_server(["--model", base, "--tensor-parallel-size", "2", "--kv-cache-memory",
                           "8MiB", "--max-model-len", "256", "--distributed-timeout-seconds", "30",
                           "--cpu-threads", "1", "--lora-adapters-dir", str(served),
                           "--max-lora-rank", "8"])
    workers = worker_pids(server.process.pid)
    try:
        streamed, started, ended = [], threading.Event(), threading.Event()

        def stream_base():
            name = httpx.get(f"{server.url}/v1/models").json()["data"][0]["id"]
            body = {"model": name, "prompt": prompt, "max_tokens": 200, "temperature": 0,
                    "ignore_eos": True, "stream": True}
            with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=120) as r:
                for line in r.iter_lines():
                    started.set()
                    streamed.append(line)
            ended.set()

        worker = threading.Thread(target=stream_base)
        worker.start()
        assert started.wait(60), "the base stream never started"
        r = httpx.post(f"{server.url}/v1/load_lora_adapter", timeout=60,
                       json={"lora_name": "a", "lora_path": ".staging/a"})
        assert r.status_code == 200 and r.json()["status"] == "loaded", r.text
        assert not ended.is_set(), "the stream ended before the load: nothing was shown"
        r = httpx.post(f"{server.url}/v1/completions", timeout=60, json={
            "model": "a", "prompt": prompt, "max_tokens": STEPS, "temperature": 0,
            "ignore_eos": True, "logprobs": 0})
        assert r.status_code == 200 and r.json()["model"] == "a", r.text
        tok = AutoTokenizer.from_pretrained(base)
        want = merged_greedy(base, adapters["all-r8"], prompt, STEPS)
        logprobs = r.json()["choices"][0]["logprobs"]
        assert logprobs["tokens"] == [tok.decode([t]) for t, _, _ in want]
        for got, (token, logsoftmax, _) in zip(logprobs["token_logprobs"], want):
            assert abs(got - float(logsoftmax[token])) < 1e-3
        worker.join(timeout=120)
        assert "data: [DONE]" in streamed and not any('"error"' in line for line in streamed)
        values = scrape(server.url)
        assert metric(values, "llm_requests_total", adapter="a", status="ok") == 1
        assert metric(values, "llm_generation_tokens_total", adapter="a") == STEPS
        assert metric(values, "llm_lora_adapters_loaded") == 1
    finally:
        server.stop()
        reap(workers)
    assert wait_gone(workers, 15) == [], "a worker outlived the server"
