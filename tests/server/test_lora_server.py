"""LoRA over HTTP on a real ``ferry serve``: list, use, load, reload in place, unload, the
watched adapters directory, and the 4xx table (path escapes, bad adapters) with no leak.

Every "use" compares the tokens the server sampled with PEFT's merged model on the same
weights, so an adapter served with stale or wrong weights (or a prefix-cache hit across
versions) fails here.
"""
from __future__ import annotations

import json
import os
import shutil
import threading
import time

import httpx
import pytest

pytest.importorskip("peft")

from ferry_server_process import API_KEY, metric, scrape, start_server  # noqa: E402
from peft_adapters import make_adapter, merged_greedy  # noqa: E402

STEPS = 5
PROMPT = [(7 * i + 3) % 250 + 3 for i in range(40)]   # > 2 blocks: cached blocks to (not) hit
AUTH = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture(scope="module")
def lora_env(server_model_dir, tmp_path_factory):
    base = str(server_model_dir)
    tmp = tmp_path_factory.mktemp("lora_server")
    root, outside, source = tmp / "adapters", tmp / "outside", tmp / "source"
    root.mkdir()
    adapters = {}
    for name, seed in [("alpha", 21), ("beta", 22), ("gamma", 23), ("gamma2", 24),
                       ("delta", 25), ("delta2", 26)]:
        adapters[name] = str(make_adapter(base, source / name, seed=seed, r=8, alpha=16))
    shutil.copytree(adapters["alpha"], root / "alpha")          # watched from the start
    staging = root / ".staging"                                # inside, but not watched
    for name in ("gamma", "gamma2"):
        shutil.copytree(adapters[name], staging / name)
    bad = staging / "dora"
    shutil.copytree(adapters["gamma"], bad)
    (bad / "adapter_config.json").write_text(
        (bad / "adapter_config.json").read_text().replace('"use_dora": false', '"use_dora": true'))
    outside.mkdir()
    shutil.copytree(adapters["gamma"], outside / "gamma")
    os.symlink(outside / "gamma", root / ".staging" / "escape")
    server = start_server(["--model", base, "--served-model-name", "tiny",
                           "--kv-cache-memory", "64MiB", "--api-key", API_KEY,
                           "--lora-adapters-dir", str(root),
                           "--lora-modules", f"beta={adapters['beta']}",
                           "--max-loras", "2", "--max-lora-rank", "16"])
    yield dict(server=server, base=base, root=root, adapters=adapters, outside=outside)
    server.stop()


def _post(env, route, body, headers=AUTH):
    return httpx.post(f"{env['server'].url}{route}", json=body, headers=headers, timeout=60)


def _models(env):
    r = httpx.get(f"{env['server'].url}/v1/models", headers=AUTH, timeout=10)
    assert r.status_code == 200
    return {card["id"]: card for card in r.json()["data"]}


def _wait_for(predicate, timeout=20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.25)
    return False


def _complete(env, model, max_tokens=STEPS):
    r = _post(env, "/v1/completions", {"model": model, "prompt": PROMPT, "max_tokens": max_tokens,
                                        "temperature": 0, "ignore_eos": True, "logprobs": 0})
    return r


def _assert_matches(env, model, adapter_dir):
    r = _complete(env, model)
    assert r.status_code == 200, r.text
    logprobs = r.json()["choices"][0]["logprobs"]
    want = merged_greedy(env["base"], adapter_dir, PROMPT, STEPS)
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(env["base"])
    assert logprobs["tokens"] == [tok.decode([t]) for t, _, _ in want], model
    for got, (token, logsoftmax, _) in zip(logprobs["token_logprobs"], want):
        assert abs(got - float(logsoftmax[token])) < 1e-3


def test_list_and_use_adapters(lora_env):
    assert _wait_for(lambda: "alpha" in _models(lora_env)), "the watched adapter never appeared"
    models = _models(lora_env)
    assert models["tiny"].get("parent") is None
    assert models["alpha"]["parent"] == "tiny" and models["beta"]["parent"] == "tiny"
    _assert_matches(lora_env, "tiny", None)
    _assert_matches(lora_env, "alpha", lora_env["adapters"]["alpha"])
    _assert_matches(lora_env, "beta", lora_env["adapters"]["beta"])
    r = httpx.get(f"{lora_env['server'].url}/v1/models/alpha", headers=AUTH, timeout=10)
    assert r.status_code == 200 and r.json()["parent"] == "tiny"


def test_load_reload_in_place_and_unload(lora_env):
    r = _post(lora_env, "/v1/load_lora_adapter", {"lora_name": "gamma", "lora_path": ".staging/gamma"})
    assert r.status_code == 200 and r.json()["status"] == "loaded", r.text
    _assert_matches(lora_env, "gamma", lora_env["adapters"]["gamma"])
    r = _post(lora_env, "/v1/load_lora_adapter", {"lora_name": "gamma", "lora_path": ".staging/gamma2"})
    assert r.status_code == 400 and "load_inplace" in r.json()["error"]["message"]
    r = _post(lora_env, "/v1/load_lora_adapter", {"lora_name": "gamma", "lora_path":
                                                  ".staging/gamma2", "load_inplace": True})
    assert r.status_code == 200 and r.json()["status"] == "reloaded", r.text
    # Same prompt again: a prefix-cache hit on gamma's KV would give gamma's tokens here.
    _assert_matches(lora_env, "gamma", lora_env["adapters"]["gamma2"])
    r = _post(lora_env, "/v1/unload_lora_adapter", {"lora_name": "gamma"})
    assert r.status_code == 200 and r.json()["status"] == "unloaded"
    assert "gamma" not in _models(lora_env)
    assert _complete(lora_env, "gamma").status_code == 404
    assert _post(lora_env, "/v1/unload_lora_adapter", {"lora_name": "gamma"}).status_code == 404


@pytest.mark.parametrize("body,status,words", [
    ({"lora_name": "x", "lora_path": "../outside/gamma"}, 400, "'..'"),
    ({"lora_name": "x", "lora_path": "/etc"}, 400, "not allowed"),
    ({"lora_name": "x", "lora_path": ".staging/escape"}, 400, "not allowed"),   # symlink out
    ({"lora_name": "x", "lora_path": "nothing-here"}, 404, "no such directory"),
    ({"lora_name": "x", "lora_path": ".staging/dora"}, 400, "DoRA"),
    ({"lora_name": "tiny", "lora_path": ".staging/gamma"}, 400, "base model"),
    ({"lora_name": "../x", "lora_path": ".staging/gamma"}, 400, "invalid LoRA adapter name"),
    ({"lora_name": "x"}, 400, "lora_path"),
    ({"lora_name": "x", "lora_path": ".staging/gamma", "extra": 1}, 400, "extra"),
])
def test_bad_loads_are_4xx_and_change_nothing(lora_env, body, status, words):
    before = set(_models(lora_env))
    r = _post(lora_env, "/v1/load_lora_adapter", body)
    assert r.status_code == status, r.text
    assert words in r.json()["error"]["message"] or words in str(r.json())
    assert set(_models(lora_env)) == before


def test_routes_need_the_api_key(lora_env):
    body = {"lora_name": "x", "lora_path": ".staging/gamma"}
    assert _post(lora_env, "/v1/load_lora_adapter", body, headers={}).status_code == 401
    assert _post(lora_env, "/v1/unload_lora_adapter", {"lora_name": "alpha"}, headers={}).status_code == 401
    assert "alpha" in _models(lora_env)


def _install(src, root, name):
    """Write-then-rename: the watcher never sees a half-written adapter."""
    tmp = root / f".tmp-{name}-{time.monotonic_ns()}"
    shutil.copytree(src, tmp)
    target = root / name
    if target.exists():
        old = root / f".old-{name}-{time.monotonic_ns()}"
        os.rename(target, old)
        os.rename(tmp, target)
        shutil.rmtree(old)
    else:
        os.rename(tmp, target)


def test_watched_directory_while_requests_stream(lora_env):
    root, adapters = lora_env["root"], lora_env["adapters"]
    _install(adapters["delta"], root, "delta")
    assert _wait_for(lambda: "delta" in _models(lora_env)), "new subdirectory not loaded"
    _assert_matches(lora_env, "delta", adapters["delta"])
    errors = []

    def stream():
        body = {"model": "delta", "prompt": PROMPT, "max_tokens": 300, "temperature": 0,
                "ignore_eos": True, "stream": True}
        with httpx.stream("POST", f"{lora_env['server'].url}/v1/completions", json=body,
                          headers=AUTH, timeout=120) as r:
            text = "".join(r.iter_text())
            if r.status_code != 200 or "[DONE]" not in text or '"error"' in text:
                errors.append((r.status_code, text[-300:]))

    worker = threading.Thread(target=stream)
    worker.start()
    _install(adapters["delta2"], root, "delta")          # changed while a request streams
    assert _wait_for(lambda: _complete(lora_env, "delta").json()["choices"][0]["logprobs"]["tokens"]
                     != _complete_tokens(lora_env, adapters["delta"])), "change not reloaded"
    _assert_matches(lora_env, "delta", adapters["delta2"])
    shutil.rmtree(root / "delta")                        # removed while it may still stream
    assert _wait_for(lambda: "delta" not in _models(lora_env)), "removed adapter still listed"
    worker.join(timeout=120)
    assert not errors, errors
    assert _complete(lora_env, "delta").status_code == 404


def _complete_tokens(env, adapter_dir):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(env["base"])
    return [tok.decode([t]) for t, _, _ in merged_greedy(env["base"], adapter_dir, PROMPT, STEPS)]


def test_metrics_and_nothing_leaked(lora_env):
    assert _wait_for(lambda: metric(scrape(lora_env["server"].url), "llm_requests_running") == 0)
    values = scrape(lora_env["server"].url)
    assert metric(values, "llm_lora_adapters_loaded") == len(_models(lora_env)) - 1
    assert metric(values, "llm_lora_requests_total", adapter="alpha") >= 1
    assert metric(values, "llm_lora_swaps_total", direction="in") >= 1
    assert metric(values, "llm_kv_cache_usage_ratio") == 0.0


def test_response_model_names_the_adapter(lora_env):
    """vLLM's convention: a request for an adapter is answered as that adapter."""
    chat = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3, "temperature": 0}
    for model, answered in (("beta", "beta"), ("tiny", "tiny"), (lora_env["base"], "tiny")):
        r = _complete(lora_env, model, max_tokens=2)
        assert r.status_code == 200 and r.json()["model"] == answered, (model, r.text)
        r = _post(lora_env, "/v1/chat/completions", {**chat, "model": model})
        assert r.status_code == 200 and r.json()["model"] == answered, (model, r.text)
        for route, body in (("/v1/completions", {"prompt": PROMPT, "max_tokens": 3}),
                            ("/v1/chat/completions", chat)):
            body = {**body, "model": model, "stream": True,
                    "stream_options": {"include_usage": True}}
            with httpx.stream("POST", f"{lora_env['server'].url}{route}", json=body,
                              headers=AUTH, timeout=60) as r:
                chunks = [line[6:] for line in r.iter_lines()
                          if line.startswith("data: ") and line != "data: [DONE]"]
            assert r.status_code == 200 and len(chunks) >= 2, route
            assert {json.loads(c)["model"] for c in chunks} == {answered}


def test_request_metrics_are_labelled_by_adapter(lora_env):
    url = lora_env["server"].url
    before = scrape(url)
    assert _complete(lora_env, "beta").status_code == 200
    assert _complete(lora_env, "tiny").status_code == 200
    assert _wait_for(lambda: metric(scrape(url), "llm_requests_running") == 0)
    after = scrape(url)

    def grew(name, adapter, **labels):
        return (metric(after, name, adapter=adapter, **labels)
                - metric(before, name, adapter=adapter, **labels))

    for adapter in ("beta", ""):     # "" is the base model
        assert grew("llm_requests_total", adapter, status="ok") == 1
        assert grew("llm_time_to_first_token_seconds_count", adapter) == 1
        assert grew("llm_inference_latency_seconds_count", adapter) == 1
        assert grew("llm_time_per_output_token_seconds_count", adapter) == 1
        assert grew("llm_prompt_tokens_total", adapter) == len(PROMPT)
        assert grew("llm_generation_tokens_total", adapter) == STEPS
    # Unloaded adapters (gamma, delta) have no series left: at most the loaded ones.
    labels = {key.split('adapter="')[1].split('"')[0] for key in after
              if key.startswith("llm_requests_total{")}
    assert labels == {"", *[name for name in _models(lora_env) if name != "tiny"]}, labels
