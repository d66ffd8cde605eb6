"""Start ``ferry serve`` in a subprocess, load it with ``ferry bench serve``, read its RSS.

Shared by ``shared_cores.py`` and ``serve_memory.py``; every process runs this checkout's
ferry (``PYTHONPATH`` is inherited).
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def served(args: list[str], env: dict[str, str] | None = None, timeout: float = 180.0):
    """``python -m ferry serve ARGS`` on a free port until /health answers; yields
    (process, base_url) and stops it with SIGTERM."""
    port = free_port()
    log = tempfile.NamedTemporaryFile("w+", prefix="ferry-serve-", suffix=".log", delete=False)
    proc = subprocess.Popen([sys.executable, "-m", "ferry", "serve", "--port", str(port), *args],
                            env={**os.environ, **(env or {})}, stdout=log,
                            stderr=subprocess.STDOUT)
    base_url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(proc, base_url, timeout, log.name)
        yield proc, base_url
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def wait_healthy(proc: subprocess.Popen, base_url: str, timeout: float, log_path: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"ferry serve exited ({proc.returncode}):\n"
                               + Path(log_path).read_text()[-3000:])
        try:
            with urllib.request.urlopen(base_url + "/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"ferry serve did not become healthy in {timeout:.0f} s")


def bench_serve(base_url: str, *, num_prompts: int, input_len: int, output_len: int,
                concurrency: int, warmup: int = 2, max_duration: float = 120.0) -> dict:
    """One ``ferry bench serve`` run (cut at ``max_duration`` seconds); returns its summary."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        subprocess.run([sys.executable, "-m", "ferry", "bench", "serve", "--base-url", base_url,
                        "--num-prompts", str(num_prompts), "--input-len", str(input_len),
                        "--output-len", str(output_len), "--max-concurrency", str(concurrency),
                        "--warmup", str(warmup), "--max-duration", str(max_duration),
                        "--no-progress", "--result-json", str(out)],
                       check=True, stdout=subprocess.DEVNULL)
        return json.loads(out.read_text())["summary"]


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def machine() -> dict:
    """CPU model, cores this process may use, and the load average (``uptime``)."""
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                if line.startswith("model name")), "cpu")
    return {"cpu": cpu, "cores": len(os.sched_getaffinity(0)),
            "uptime": subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()}
