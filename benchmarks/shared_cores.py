"""Serving throughput while another process keeps one core busy: thread settings compared.

A CPU-burning neighbour (a Python busy loop pinned to one core with ``sched_setaffinity``)
runs while ``ferry bench serve`` loads ``ferry serve`` of the bundled demo model. Each
setting starts its own server; the figure is the median output throughput over
``--repeats`` runs. Settings:

- ``default``: what ferry does unasked (``cpu_threads: auto``, its OpenMP wait policy);
- ``threads1`` / ``threads2``: ``--cpu-threads 1`` / ``2``;
- ``libgomp_spin``: the default thread count with libgomp's own wait policy
  (``GOMP_SPINCOUNT=300000``, what libgomp spins when nothing is set): ferry before the
  change;
- ``spin1000`` / ``passive``: the default thread count with ``GOMP_SPINCOUNT=1000`` /
  ``OMP_WAIT_POLICY=PASSIVE`` (no spin at all), the candidates for ferry's own default;
- ``*_idle``: the same without the neighbour.

    python benchmarks/shared_cores.py [--settings default threads1 ...] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import time
from contextlib import contextmanager

from serve_harness import bench_serve, machine, served

SETTINGS = {
    "default": ([], {}),
    "threads1": (["--cpu-threads", "1"], {}),
    "threads2": (["--cpu-threads", "2"], {}),
    "libgomp_spin": ([], {"GOMP_SPINCOUNT": "300000"}),
    "spin1000": ([], {"GOMP_SPINCOUNT": "1000"}),
    "passive": ([], {"OMP_WAIT_POLICY": "PASSIVE"}),
}


def burn(core: int) -> None:
    os.sched_setaffinity(0, {core})
    while True:
        pass


@contextmanager
def neighbour(enabled: bool):
    """A busy loop on the first core of this process's affinity, while the block runs."""
    if not enabled:
        yield
        return
    proc = multiprocessing.Process(target=burn, args=(min(os.sched_getaffinity(0)),),
                                   daemon=True)
    proc.start()
    try:
        time.sleep(0.5)
        yield
    finally:
        proc.terminate()
        proc.join()


def run_setting(name: str, args: argparse.Namespace) -> dict:
    base, idle = name.removesuffix("_idle"), name.endswith("_idle")
    flags, env = SETTINGS[base]
    runs = []
    with served(flags, env) as (_, url):
        for _ in range(args.repeats):
            with neighbour(not idle):
                summary = bench_serve(url, num_prompts=args.num_prompts,
                                      input_len=args.input_len, output_len=args.output_len,
                                      concurrency=args.concurrency)
            runs.append(summary["output_throughput"])
    result = {"setting": name, "median_output_tok_s": statistics.median(runs), "runs": runs}
    print(f"{name:20s} {result['median_output_tok_s']:8.1f} output tok/s  "
          f"runs {', '.join(f'{r:.1f}' for r in runs)}", flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--settings", nargs="+",
                        default=["default", "threads1", "threads2", "libgomp_spin",
                                 "default_idle", "libgomp_spin_idle"])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--num-prompts", type=int, default=24)
    parser.add_argument("--input-len", type=int, default=64)
    parser.add_argument("--output-len", type=int, default=32)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--json", help="write every run's figures here")
    args = parser.parse_args()
    info = machine()
    print(info, flush=True)
    results = [run_setting(name, args) for name in args.settings]
    loaded = {r["setting"]: r["median_output_tok_s"] for r in results
              if not r["setting"].endswith("_idle")}
    if "default" in loaded and len(loaded) > 1:
        best = max(loaded.values())
        print(f"best / default under the neighbour: {best / loaded['default']:.2f}x "
              f"(target <= 1.5x)")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"machine": info, "args": vars(args), "results": results,
                       "uptime_after": machine()["uptime"]}, handle, indent=2)


if __name__ == "__main__":
    main()
