"""import ferry raises glibc's mmap/trim thresholds unless the user chose a malloc policy."""
from __future__ import annotations

import subprocess
import sys

import pytest

from ferry.malloc_tuning import MMAP_THRESHOLD, TRIM_THRESHOLD, tune_malloc


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_thresholds_are_set_by_default():
    assert tune_malloc({}) == {"mmap_threshold": MMAP_THRESHOLD, "trim_threshold": TRIM_THRESHOLD}


@pytest.mark.parametrize("environ", [{"FERRY_MALLOC_TUNING": "0"}, {"LD_PRELOAD": "libjemalloc.so"},
                                     {"MALLOC_MMAP_THRESHOLD_": "131072"},
                                     {"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=1"}])
def test_a_users_choice_is_left_alone(environ):
    assert tune_malloc(environ) == {}


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_freed_large_blocks_are_reused_instead_of_faulted_in_again():
    # Minor page faults of 60 cycles of a step's worth of tensors (five 8 MiB ones alive at
    # once, then freed): with glibc's defaults the freed top of the heap (40 MiB) is past
    # the trim threshold, so cycles fault their pages in again; tuned, the heap keeps them.
    script = """
import resource, sys
import torch
if sys.argv[1] == "1":
    import ferry  # noqa: F401  (tunes malloc on import)
def step():
    tensors = [torch.ones(2**21) for _ in range(5)]
    del tensors
step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(60):
    step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""
    def faults(tuned: str) -> int:
        env = {"FERRY_MALLOC_TUNING": "1"}
        out = subprocess.run([sys.executable, "-c", script, tuned], capture_output=True,
                             text=True, check=True, env={**__import__("os").environ, **env})
        return int(out.stdout.strip().splitlines()[-1])
    tuned, default = faults("1"), faults("0")
    # measured here: tuned 6,144-8,192 (the heap's first growth), default 16,381-34,813
    assert tuned * 2 < default, (tuned, default)
