"""Run the parity tests, record their outcomes, write docs/parity.md.

    python scripts/parity_matrix.py --run-cpu            # both CPU columns, here (minutes)
    python scripts/parity_matrix.py --junit gpu.xml --column nvidia --device "NVIDIA H200"
    python scripts/parity_matrix.py                      # only re-render from the records

A GPU run: on the GPU machine, ``pytest -o junit_family=xunit1 --junitxml=gpu.xml`` over
the tests this script prints with ``--list-tests``, then ``--junit`` here. Cells come only
from recorded runs and the AOT kernel matrix (docs/kernels.md); see ferry/tools/parity.py.
"""
from __future__ import annotations

import argparse
import datetime
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))   # run from a checkout

from ferry.tools.parity import (COLUMNS, gather, junit_outcomes, record_run, render,  # noqa: E402
                                replace_block, tests_for)
from ferry.tools.parity_features import FEATURES  # noqa: E402

RESULTS = ROOT / "docs" / "parity_results.json"
DOC = ROOT / "docs" / "parity.md"
KERNELS = ROOT / "docs" / "kernels.md"


def all_tests(column: str = "cpu-cpp") -> list[str]:
    return sorted({t for f in FEATURES for t in tests_for(f, column)})


def run_pytest(column: str, env_extra: dict[str, str]) -> dict[str, str]:
    with tempfile.TemporaryDirectory() as tmp:
        xml = Path(tmp) / "junit.xml"
        command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                   "-o", "junit_family=xunit1", f"--junitxml={xml}", *all_tests(column)]
        subprocess.run(command, cwd=ROOT, env={**os.environ, **env_extra}, check=False)
        return junit_outcomes(xml)


def commit() -> str:
    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True,
                          capture_output=True).stdout.strip() or "unknown"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-cpu", action="store_true", help="run the tests on this CPU, "
                        "with the C++ kernels and with the reference")
    parser.add_argument("--junit", type=Path, help="record a JUnit XML of another machine")
    parser.add_argument("--column", choices=list(COLUMNS))
    parser.add_argument("--device", help="the device of --junit, e.g. 'NVIDIA H200'")
    parser.add_argument("--list-tests", action="store_true", help="print the tests and exit")
    args = parser.parse_args()
    if args.list_tests:
        print("\n".join(all_tests("nvidia")))   # a GPU run: the Triton tests too
        return 0
    today = datetime.date.today().isoformat()
    if args.run_cpu:
        from ferry.platform.host import cpu_name, usable_cpu_count

        device = f"{cpu_name()} ({usable_cpu_count()} cores)"
        for column, env in (("cpu-cpp", {}), ("cpu-reference", {"FERRY_CPU_KERNELS": "0"})):
            record_run(RESULTS, column, device, today, commit(), run_pytest(column, env))
    if args.junit:
        if not (args.column and args.device):
            parser.error("--junit needs --column and --device")
        record_run(RESULTS, args.column, args.device, today, commit(),
                   junit_outcomes(args.junit))
    document = DOC.read_text() if DOC.exists() else ""
    DOC.write_text(replace_block(document, render(gather(RESULTS, KERNELS))))
    print(f"wrote {DOC.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
