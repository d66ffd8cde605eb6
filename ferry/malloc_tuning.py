"""glibc malloc settings for a process that makes and frees the same large tensors every
step (no torch here; called by ``import ferry``).

glibc serves an allocation above its mmap threshold (128 KiB at start, raised
dynamically up to 32 MiB) with a fresh ``mmap`` and returns it to the system on free, and
it trims the heap's free top past its trim threshold. A CPU decode step allocates the
same tensors each time (logits, softmax, cumsum: 8 MiB each at batch 64 and a
32,000-token vocabulary), so with the defaults every step pays page faults on memory it
had a moment before: sampling a batch of 64 measured 9 ms with them and 1.9 ms with the
memory kept (benchmarks/sampler_speed.py). Raising both thresholds keeps freed blocks in
the heap for the next step; allocations above ``MMAP_THRESHOLD`` (the KV cache, weights
read whole) still come from ``mmap``, and a heap whose free top grows past
``TRIM_THRESHOLD`` is still trimmed, so resident memory stays bounded by the step's peak.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
from collections.abc import Mapping

MMAP_THRESHOLD = 32 * 2**20
TRIM_THRESHOLD = 64 * 2**20
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3   # mallopt parameters (malloc.h)

# A choice of the user's (environment variables glibc reads at start, or an allocator
# preloaded in its place): ferry then leaves malloc alone.
USER_KEYS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES", "LD_PRELOAD")


def tune_malloc(environ: Mapping[str, str] = os.environ) -> dict[str, int]:
    """Raise glibc's mmap and trim thresholds (see the module docstring) unless the user
    chose an allocator policy or ``FERRY_MALLOC_TUNING=0``; returns what was set."""
    if (environ.get("FERRY_MALLOC_TUNING", "1") == "0" or any(k in environ for k in USER_KEYS)
            or not sys.platform.startswith("linux")):
        return {}
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):   # not glibc (musl has no mallopt)
        return {}
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # mallopt returns 1 on success; the mmap threshold first (it also stops the dynamic
    # adjustment, which would otherwise lower the trim threshold again).
    if mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) != 1 or mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) != 1:
        return {}
    return {"mmap_threshold": MMAP_THRESHOLD, "trim_threshold": TRIM_THRESHOLD}
