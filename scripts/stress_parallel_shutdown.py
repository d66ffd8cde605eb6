"""Start ``ferry serve`` in a multi-rank layout, answer one request, SIGTERM it; N times.

Counts the runs whose processes did not exit 0 (the server, and in the two-node layout
the second node too) and prints the tail of their logs, so a rare shutdown race shows up
as a number instead of a one-off CI failure. Layouts: ``tp2`` (one server, one spawned
worker) and ``two-node`` (``--nnodes 2``: the server is node 0, a second launch is node 1).

    PYTHONPATH=. nice -n 19 python scripts/stress_parallel_shutdown.py --runs 5
"""
from __future__ import annotations

import argparse
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "tests"), str(REPO / "tests" / "server")]

from ferry_server_process import ServerProcess, free_port  # noqa: E402
from tiny_models import make_tiny_model  # noqa: E402

ARGS = ["--kv-cache-memory", "8MiB", "--max-model-len", "256", "--distributed-timeout-seconds",
        "30", "--cpu-threads", "1"]


def _one_request(url: str) -> None:
    import httpx

    reply = httpx.post(f"{url}/v1/completions", timeout=60,
                       json={"model": "m", "prompt": "Hello", "max_tokens": 4, "temperature": 0})
    if reply.status_code != 200:
        raise RuntimeError(f"the request failed: {reply.status_code} {reply.text[:300]}")


IDLE_MAX_SECONDS = [0.0]   # set from --idle-max: a random idle wait before SIGTERM


def _idle() -> None:
    """Let the server idle a random while, so SIGTERM also meets rank 0's pings."""
    time.sleep(random.uniform(0.0, IDLE_MAX_SECONDS[0]))


def run_tp2(model: str) -> dict[str, tuple[int, str]]:
    server = ServerProcess(["--model", model, "--served-model-name", "m",
                            "--tensor-parallel-size", "2", *ARGS])
    try:
        server.wait_ready()
        _one_request(server.url)
        _idle()
        server.send_signal(signal.SIGTERM)
        return {"server": (server.wait_exit(90), server.output())}
    finally:
        server.stop()


def run_two_nodes(model: str) -> dict[str, tuple[int, str]]:
    flags = ["--model", model, "--served-model-name", "m", "--tensor-parallel-size", "2",
             "--nnodes", "2", "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
             *ARGS]
    log = tempfile.NamedTemporaryFile("w+", prefix="ferry-node1-", suffix=".log")
    node1 = subprocess.Popen([sys.executable, "-m", "ferry", "serve", *flags, "--node-rank", "1"],
                             cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    server = ServerProcess([*flags, "--node-rank", "0"])
    try:
        server.wait_ready()
        _one_request(server.url)
        _idle()
        server.send_signal(signal.SIGTERM)
        codes = {"server": (server.wait_exit(90), server.output())}
        node1_code = node1.wait(timeout=90)
        log.flush()
        codes["node1"] = (node1_code, Path(log.name).read_text(errors="replace")[-4000:])
        return codes
    finally:
        server.stop()
        if node1.poll() is None:
            node1.kill()
            node1.wait()
        log.close()


LAYOUTS = {"tp2": run_tp2, "two-node": run_two_nodes}
# What ferry/distributed/teardown.py logs when a rank did not leave in order.
OUT_OF_ORDER = ("not every rank", "could not tell rank 0", "could not tell the workers")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=list(LAYOUTS))
    parser.add_argument("--idle-max", type=float, default=0.0,
                        help="idle up to this many seconds (random) before SIGTERM")
    parser.add_argument("--show-logs", action="store_true", help="print every failed run's log")
    args = parser.parse_args()
    IDLE_MAX_SECONDS[0] = args.idle_max
    model = str(make_tiny_model("qwen2", Path(tempfile.mkdtemp(prefix="ferry-stress-"))))
    failures = 0
    for layout in args.layouts:
        bad = unordered = 0
        for run in range(args.runs):
            started = time.monotonic()
            try:
                codes = LAYOUTS[layout](model)
            except Exception as exc:  # noqa: BLE001 - a run that never got to SIGTERM
                codes = {"start": (-999, repr(exc)[-3000:])}
            failed = {name: c for name, c in codes.items() if c[0] != 0}
            bad += bool(failed)
            unordered += any(m in text for _, text in codes.values() for m in OUT_OF_ORDER)
            print(f"{layout} run {run + 1}: " + ", ".join(f"{n}={c[0]}" for n, c in codes.items())
                  + f" ({time.monotonic() - started:.0f}s)", flush=True)
            for name, (code, text) in failed.items():
                print(f"--- {layout} run {run + 1} {name} exited {code}; log tail:\n"
                      f"{text if args.show_logs else text[-1500:]}\n---", flush=True)
        print(f"{layout}: {bad} of {args.runs} runs with a non-zero exit, {unordered} with a "
              f"rank that did not leave in order (logged)", flush=True)
        failures += bad
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
