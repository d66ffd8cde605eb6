"""Config hot reload: ``POST /admin/reload`` and SIGHUP re-read the config file, apply the
keys that may change while serving, and report the rest; a bad file changes nothing.

The plan is checked as a pure function; a real ``ferry serve --config`` shows a changed
limit taking effect while a stream started before the reload runs to its end.
"""
from __future__ import annotations

import json
import signal
import threading
import time

import httpx
import pytest
import yaml
from ferry_server_process import API_KEY, MAX_MODEL_LEN, metric, scrape, start_server

from ferry.config import FerryConfig
from ferry.server.reload import ConfigSource, plan_reload

AUTH = {"Authorization": f"Bearer {API_KEY}"}


def test_plan_applies_what_may_change_and_reports_the_rest():
    started = FerryConfig.from_flat(max_num_seqs=8, max_num_batched_tokens=512, api_key="a")
    running = FerryConfig.from_flat(max_num_seqs=4, max_num_batched_tokens=512, api_key="a")
    loaded = FerryConfig.from_flat(max_num_seqs=8, max_num_batched_tokens=1024, api_key="b",
                                   block_size=32, max_waiting_requests=5, log_level="debug")
    plan = plan_reload(running, loaded, started)
    assert plan.applied == {"max_num_seqs": {"running": 4, "file": 8},   # back up to its start
                            "max_waiting_requests": {"running": 1024, "file": 5},
                            "log_level": {"running": "info", "file": "debug"}}
    assert set(plan.needs_restart) == {"max_num_batched_tokens", "block_size", "api_key"}
    assert "start value 512" in plan.needs_restart["max_num_batched_tokens"]["reason"]
    assert plan.needs_restart["api_key"]["file"] == "<hidden>"   # never echoed
    assert plan_reload(running, running, started).to_json()["status"] == "unchanged"


def test_flags_still_win_over_the_reloaded_file(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("max_num_seqs: 3\nport: 9000\n")
    source = ConfigSource(path, {"port": "9100"})
    assert (source.load().server.port, source.load().engine.scheduler.max_num_seqs) == (9100, 3)


# ---------------------------------------------------------------------------- a real server
def _write(path, **values) -> None:
    path.write_text(yaml.safe_dump(values))


@pytest.fixture(scope="module")
def config_file(tmp_path_factory):
    return tmp_path_factory.mktemp("reload") / "config.yaml"


BASE = {"served_model_name": "tiny", "kv_cache_memory": "64MiB", "api_key": API_KEY,
        "max_model_len": MAX_MODEL_LEN, "max_num_seqs": 4, "max_request_body_bytes": "1MiB"}


@pytest.fixture(scope="module")
def reloadable(server_model_dir, config_file):
    _write(config_file, model=str(server_model_dir), **BASE)
    proc = start_server(["--config", str(config_file)])
    yield proc
    proc.stop()


def _reload(server, **kw) -> httpx.Response:
    return httpx.post(f"{server.url}/admin/reload", timeout=30, **kw)


def _body_of(size: int) -> dict:
    return {"model": "tiny", "prompt": "x" * size}


def _tokenize(server, size: int) -> int:
    return httpx.post(f"{server.url}/tokenize", json=_body_of(size), headers=AUTH,
                      timeout=30).status_code


def _long_stream(server, result: dict) -> None:
    """A streamed completion of 600 tokens; ``result`` gets its tokens and finish reason."""
    body = {"model": "tiny", "prompt": "Once upon a time", "max_tokens": 600,
            "temperature": 0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    tokens, finish = 0, None
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, headers=AUTH,
                      timeout=120) as resp:
        result["status"] = resp.status_code
        for line in resp.iter_lines():
            if line.startswith("data: {"):
                chunk = json.loads(line[6:])
                for choice in chunk["choices"]:
                    finish = choice["finish_reason"] or finish
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
            result["started"] = True
    result.update(tokens=tokens, finish=finish)


def _wait(predicate, timeout: float = 60.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_a_changed_limit_applies_without_restart_or_dropped_streams(reloadable, config_file,
                                                                    server_model_dir):
    assert _tokenize(reloadable, 4000) == 200                  # under the 1 MiB limit
    first: dict = {}
    stream = threading.Thread(target=_long_stream, args=(reloadable, first))
    stream.start()
    _wait(lambda: first.get("started"), what="the first stream")

    _write(config_file, model=str(server_model_dir), **{
        **BASE, "max_request_body_bytes": 2000, "max_num_seqs": 1, "block_size": 32})
    assert _reload(reloadable).status_code == 401               # under the API key
    resp = _reload(reloadable, headers=AUTH)
    assert resp.status_code == 200, resp.text
    report = resp.json()
    assert report["applied"] == {"max_request_body_bytes": {"running": 2**20, "file": 2000},
                                 "max_num_seqs": {"running": 4, "file": 1}}
    assert list(report["needs_restart"]) == ["block_size"]

    assert _tokenize(reloadable, 4000) == 413                  # the new body limit
    second: dict = {}
    waiting = threading.Thread(target=_long_stream, args=(reloadable, second))
    waiting.start()
    # One seat now: the second request waits while the first still streams.
    _wait(lambda: metric(scrape(reloadable.url), "llm_requests_waiting") == 1,
          what="the second request to wait")
    assert metric(scrape(reloadable.url), "llm_requests_running") == 1
    stream.join(120)
    waiting.join(120)
    for result in (first, second):
        assert (result["status"], result["finish"], result["tokens"]) == (200, "length", 600)


def test_an_invalid_file_is_refused_and_the_old_config_stays(reloadable, config_file,
                                                             server_model_dir):
    good = {**BASE, "model": str(server_model_dir), "max_request_body_bytes": 2000,
            "max_num_seqs": 1, "block_size": 32}
    _write(config_file, **good)
    assert _reload(reloadable, headers=AUTH).status_code == 200   # the state of the test above
    for bad in ("max_num_seqs: -1\n", "max_num_seqs: [\n", "no_such_key: 1\n"):
        config_file.write_text(bad)
        resp = _reload(reloadable, headers=AUTH)
        assert resp.status_code == 400, resp.text
        error = resp.json()["error"]
        assert error["code"] == "invalid_config" and "running configuration stays" in error["message"]
        assert _tokenize(reloadable, 4000) == 413               # still the old limit
    _write(config_file, **good)
    assert _reload(reloadable, headers=AUTH).json()["status"] == "unchanged"


def test_sighup_reloads(reloadable, config_file, server_model_dir):
    _write(config_file, model=str(server_model_dir), **{**BASE, "max_request_body_bytes": 2000})
    assert _reload(reloadable, headers=AUTH).status_code == 200
    assert _tokenize(reloadable, 4000) == 413
    _write(config_file, model=str(server_model_dir), **BASE)       # back to 1 MiB
    reloadable.send_signal(signal.SIGHUP)
    _wait(lambda: _tokenize(reloadable, 4000) == 200, 30, "SIGHUP to apply the file")
    assert reloadable.process.poll() is None                       # still serving
    assert "config reloaded" in reloadable.output()


def test_without_a_config_file_there_is_nothing_to_reload(server, auth):
    resp = httpx.post(f"{server.url}/admin/reload", headers=auth, timeout=30)
    assert resp.status_code == 400 and "--config" in resp.json()["error"]["message"]
