"""Two checkouts of ferry side by side, same run, same machine: is the new one slower?

Runs, interleaved per repeat (A B, then B A, ...), so that drift of the machine's load
hits both alike:

- offline: ``run_ferry`` of ``benchmarks/offline_throughput.py`` (64 requests, prompts
  32-256, outputs 16-256 with ignore_eos, a 15M Llama-shape random model, float32);
- serve: ``ferry serve`` with no model (the bundled demo model, default settings) under
  ``ferry bench serve`` (this checkout's client for both) at each concurrency: random
  prompts of 128 tokens, 64 generated tokens each.

Each checkout runs with ``PYTHONPATH`` set to its root; give the older one as
``--baseline`` (e.g. ``git worktree add /tmp/base <commit>``). Prints medians and the
ratio new / baseline (tokens/s: higher is better; TPOT: lower is better).

    python benchmarks/ab_commits.py --baseline /tmp/base [--repeats 5] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
NEW = HERE.parent


def _env(tree: Path) -> dict[str, str]:
    """``tree``'s ferry first on the path; threads as each side sets them by default."""
    return {**os.environ, "PYTHONPATH": str(tree)}


def offline_tokens_per_s(tree: Path, model_dir: Path, threads: int) -> float:
    """One ferry offline run of the workload, in a fresh process on ``tree``'s ferry."""
    code = (f"import sys, torch; sys.path.insert(0, {str(HERE)!r}); torch.set_num_threads({threads});"
            "import offline_throughput as o; from pathlib import Path;"
            f"print(o.run_ferry(Path({str(model_dir)!r}), o.make_workload(64, 0, 8000)))")
    out = subprocess.run([sys.executable, "-c", code], env=_env(tree), check=True,
                         capture_output=True, text=True, cwd=tree).stdout
    return float(out.strip().splitlines()[-1])


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_healthy(url: str, server: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"the server exited with {server.returncode}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError("the server did not become healthy")


def serve_figures(tree: Path, concurrency: int) -> dict[str, float]:
    """Output tokens/s and mean TPOT of ``tree``'s ``ferry serve`` on the demo model."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "ferry", "serve", "--port", str(port)],
                              env=_env(tree), cwd=tree, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        _wait_healthy(url, server)
        with tempfile.TemporaryDirectory() as tmp:
            result_path = Path(tmp) / "result.json"
            subprocess.run([sys.executable, "-m", "ferry", "bench", "serve", "--base-url", url,
                            "--max-concurrency", str(concurrency), "--num-prompts", "48",
                            "--input-len", "128", "--output-len", "64", "--warmup", "4",
                            "--seed", "10", "--extra-body", '{"skip_special_tokens": false}',
                            "--no-progress", "--result-json", str(result_path)],
                           env=_env(NEW), cwd=NEW, check=True, capture_output=True)
            summary = json.loads(result_path.read_text())["summary"]
    finally:
        server.terminate()
        server.wait(timeout=60)
    if summary["completed"] != summary["num_requests"]:
        raise RuntimeError(f"{summary['failed']} requests failed: {summary['errors']}")
    return {"output_tok_s": summary["output_throughput"], "tpot_ms": summary["tpot_ms"]["mean"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--baseline", type=Path, required=True, help="the older checkout's root")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2, help="offline run's torch threads")
    parser.add_argument("--concurrencies", default="1,4,16")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    trees = {"baseline": args.baseline.resolve(), "new": NEW}
    concurrencies = [int(c) for c in args.concurrencies.split(",")]
    runs: dict[str, dict[str, list[float]]] = {name: {} for name in trees}
    load_before = os.getloadavg()[0]

    sys.path.insert(0, str(HERE))
    import offline_throughput

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = offline_throughput.build_model(Path(tmp) / "llama-15m")
        for repeat in range(args.repeats):
            order = list(trees) if repeat % 2 == 0 else list(reversed(trees))
            for name in order:
                figures = {"offline_tok_s": offline_tokens_per_s(trees[name], model_dir,
                                                                  args.threads)}
                for c in concurrencies:
                    serve = serve_figures(trees[name], c)
                    figures[f"serve_c{c}_tok_s"] = serve["output_tok_s"]
                    figures[f"serve_c{c}_tpot_ms"] = serve["tpot_ms"]
                for key, value in figures.items():
                    runs[name].setdefault(key, []).append(value)
                print(f"repeat {repeat + 1} {name}: " +
                      ", ".join(f"{k} {v:.1f}" for k, v in figures.items()), flush=True)

    medians = {name: {k: statistics.median(v) for k, v in figs.items()}
               for name, figs in runs.items()}
    ratios = {k: medians["new"][k] / medians["baseline"][k] for k in medians["new"]}
    print(f"\nmedians of {args.repeats} (1-min load average before {load_before:.2f}, "
          f"after {os.getloadavg()[0]:.2f}):")
    for key, ratio in ratios.items():
        better = "lower is better" if key.endswith("_ms") else "higher is better"
        print(f"  {key:<20} baseline {medians['baseline'][key]:9.1f}  new "
              f"{medians['new'][key]:9.1f}  new/baseline {ratio:.3f} ({better})")
    if args.json:
        args.json.write_text(json.dumps({"medians": medians, "ratios": ratios, "runs": runs,
                                         "repeats": args.repeats, "threads": args.threads,
                                         "load_before": load_before},
                                        indent=2))


if __name__ == "__main__":
    main()
