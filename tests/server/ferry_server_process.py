"""Start ``python -m ferry serve`` as a real subprocess on a free loopback port, for tests.

Every wait has a timeout and the process is always killed at the end, so a broken server
fails the test instead of hanging the suite.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO_ROOT = Path(__file__).resolve().parents[2]
STARTUP_TIMEOUT_S = 120.0
API_KEY = "test-key-123"  # the shared test server's key
MAX_MODEL_LEN = 2048       # its context length


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerProcess:
    """A running ``ferry serve``; ``url`` is its base address (no ``/v1``)."""

    def __init__(self, args: list[str], env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.NamedTemporaryFile("w+", prefix="ferry-serve-", suffix=".log",
                                               delete=False)
        command = [sys.executable, "-m", "ferry", "serve", "--host", "127.0.0.1",
                   "--port", str(self.port), *args]
        full_env = {**os.environ, **(env or {})}
        self.process = subprocess.Popen(command, cwd=REPO_ROOT, env=full_env, stdout=self.log,
                                        stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = STARTUP_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"ferry serve exited with {self.process.returncode}:\n"
                                   f"{self.output()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"ferry serve did not become ready in {timeout} s:\n{self.output()}")

    def output(self) -> str:
        self.log.flush()
        return Path(self.log.name).read_text(errors="replace")[-6000:]

    def send_signal(self, sig: int = signal.SIGTERM) -> None:
        self.process.send_signal(sig)

    def wait_exit(self, timeout: float) -> int:
        return self.process.wait(timeout=timeout)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        self.log.close()
        Path(self.log.name).unlink(missing_ok=True)


def start_server(args: list[str], env: dict[str, str] | None = None) -> ServerProcess:
    server = ServerProcess(args, env)
    try:
        server.wait_ready()
    except BaseException:
        server.stop()
        raise
    return server


def scrape(url: str) -> dict[str, float]:
    """/metrics as {'name{labels}': value} (the exposition lines, comments skipped)."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            values[key] = float(value)
    return values


def metric(values: dict[str, float], name: str, **labels: str) -> float:
    """The value of ``name`` whose labels include ``labels``; KeyError if absent."""
    for key, value in values.items():
        base, _, rest = key.partition("{")
        if base == name and all(f'{k}="{v}"' in rest for k, v in labels.items()):
            return value
    raise KeyError(f"{name}{labels} not in /metrics")
