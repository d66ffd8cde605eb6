"""``ferry serve --tensor-parallel-size 2`` as a real process: it answers the openai SDK,
stops with its workers on SIGTERM, leaves no worker behind after SIGKILL, and fails
loudly (non-zero, with a message) when a worker dies. Two "nodes" (two launches on
loopback, one rank each) give one node's tokens."""
from __future__ import annotations

import signal
import subprocess
import sys

import pytest

from process_tree import reap, wait_gone, worker_pids
from ferry_server_process import REPO_ROOT, ServerProcess, free_port, start_server

ARGS = ["--kv-cache-memory", "8MiB", "--max-model-len", "256", "--distributed-timeout-seconds",
        "30", "--cpu-threads", "1"]


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return str(tiny_model_dir("qwen2"))


def _tp2(model: str) -> ServerProcess:
    return start_server(["--model", model, "--tensor-parallel-size", "2", *ARGS])


def test_openai_sdk_then_sigterm_stops_server_and_workers(model):
    openai = pytest.importorskip("openai")
    server = _tp2(model)
    workers = worker_pids(server.process.pid)
    try:
        assert len(workers) == 1, server.output()
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused")
        name = client.models.list().data[0].id
        done = client.completions.create(model=name, prompt="Hello world", max_tokens=6,
                                         temperature=0)
        assert done.usage.completion_tokens >= 1
        chat = client.chat.completions.create(model=name, max_tokens=5, temperature=0,
                                              messages=[{"role": "user", "content": "Hi"}])
        assert chat.choices[0].message.content is not None
        server.send_signal(signal.SIGTERM)
        assert server.wait_exit(60) == 0, server.output()
        assert wait_gone(workers, 15) == [], "a worker outlived the server"
    finally:
        server.stop()
        reap(workers)


def test_sigkill_of_the_server_takes_its_workers(model):
    server = _tp2(model)
    workers = worker_pids(server.process.pid)
    try:
        assert workers
        server.process.kill()
        server.wait_exit(10)
        assert wait_gone(workers, 15) == [], "a worker outlived a SIGKILLed server"
    finally:
        server.stop()
        reap(workers)


def test_a_dead_worker_fails_the_server_loudly(model):
    server = _tp2(model)
    workers = worker_pids(server.process.pid)
    try:
        reap(workers[:1])
        code = server.wait_exit(40)   # within the collective timeout (30 s)
        assert code != 0
        assert "worker process ferry-rank1" in server.output() and "exited" in server.output()
    finally:
        server.stop()
        reap(workers)


def test_two_nodes_on_loopback_give_one_nodes_tokens(model, tmp_path):
    from ferry import LLM, SamplingParams

    port = free_port()
    log = open(tmp_path / "node1.log", "w")
    node_flags = ["--model", model, "--tensor-parallel-size", "2", "--nnodes", "2",
                  "--master-addr", "127.0.0.1", "--master-port", str(port), *ARGS]
    node1 = subprocess.Popen([sys.executable, "-m", "ferry", "serve", *node_flags,
                              "--node-rank", "1"], cwd=REPO_ROOT,
                             stdout=log, stderr=subprocess.STDOUT)
    server = None
    try:
        server = start_server([*node_flags, "--node-rank", "0"])
        import httpx

        prompts = ["The quick brown fox", "Paris is the capital of"]
        got = [httpx.post(f"{server.url}/v1/completions", timeout=60,
                          json={"model": model, "prompt": p, "max_tokens": 8,
                                "temperature": 0, "ignore_eos": True}).json()
               for p in prompts]
        llm = LLM(model, kv_cache_memory="8MiB", max_model_len=256)
        want = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=8,
                                                    ignore_eos=True), use_tqdm=False)
        assert [g["choices"][0]["text"] for g in got] == [w.outputs[0].text for w in want], got
        server.send_signal(signal.SIGTERM)
        assert server.wait_exit(60) == 0, server.output()
        assert node1.wait(timeout=60) == 0, (tmp_path / "node1.log").read_text()[-3000:]
    finally:
        if server is not None:
            server.stop()
        if node1.poll() is None:
            node1.kill()
