"""Does the wait policy that ``import ferry`` sets reach PyTorch's bundled libgomp and
ferry's C++ kernels? Measured by what idle OpenMP threads burn after a parallel region.

After each region libgomp's worker threads spin before they sleep; with nothing else
running, that spin shows as process CPU time beyond the op itself. The script times, in a
fresh process per policy, 20 parallel ops each followed by a 50 ms pause, for a PyTorch op
(``torch.add`` on 4M floats) and a ferry C++ kernel (``rms_norm`` of 2,048 x 2,048), and
prints the CPU time per op over its wall time: about 1 when idle threads sleep at once,
up to 1 + (threads - 1) x spin / op time when they spin.

    python benchmarks/openmp_spin_check.py [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

POLICIES = {
    "ferry default (import ferry sets it)": {},
    "libgomp default (GOMP_SPINCOUNT=300000)": {"GOMP_SPINCOUNT": "300000"},
    "OMP_WAIT_POLICY=PASSIVE": {"OMP_WAIT_POLICY": "PASSIVE"},
}

CHILD = r"""
import json, os, resource, time
import ferry                      # before torch: sets the wait policy unless the user did
import torch
from ferry import kernels

def cpu_s():
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime

x = torch.randn(1 << 22)
h, w = torch.randn(2048, 2048), torch.ones(2048)
ops = {"torch.add": lambda: torch.add(x, 1.0), "ferry C++ rms_norm": lambda: kernels.rms_norm(h, w, 1e-5)}
out = {"threads": torch.get_num_threads(), "GOMP_SPINCOUNT": os.environ.get("GOMP_SPINCOUNT"),
       "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY")}
for name, op in ops.items():
    for _ in range(3):
        op()
    busy_cpu = busy_wall = idle_cpu = 0.0
    for _ in range(20):
        c0, t0 = cpu_s(), time.perf_counter()
        op()
        c1, t1 = cpu_s(), time.perf_counter()
        time.sleep(0.05)
        c2 = cpu_s()
        busy_cpu += c1 - c0; busy_wall += t1 - t0; idle_cpu += c2 - c1
    out[name] = {"op_ms": 1e3 * busy_wall / 20, "cpu_ms_in_op": 1e3 * busy_cpu / 20,
                 "cpu_ms_in_pause_after": 1e3 * idle_cpu / 20}
print(json.dumps(out))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json")
    args = parser.parse_args()
    clean = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    results = {}
    for name, env in POLICIES.items():
        out = subprocess.run([sys.executable, "-c", CHILD], env={**clean, **env}, check=True,
                             capture_output=True, text=True).stdout
        results[name] = json.loads(out.strip().splitlines()[-1])
        print(name, json.dumps(results[name]), flush=True)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=2)


if __name__ == "__main__":
    main()
