"""OpenMP's wait policy, set before the OpenMP runtime starts (no torch here).

PyTorch's bundled libgomp (and ferry's C++ kernels, which share it) reads
``OMP_WAIT_POLICY`` and ``GOMP_SPINCOUNT`` once, when the library is loaded by
``import torch``; setting them later changes nothing in this process. ``import ferry``
calls :func:`set_wait_policy_defaults` first, so every entry point (``ferry serve``,
``python -m ferry``, ``LLM``) gets it as long as ferry is imported before torch.
"""
from __future__ import annotations

import os
import sys
from collections.abc import MutableMapping

# Either variable expresses a choice of the user's: then ferry sets neither.
USER_KEYS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")

# Between two parallel regions libgomp's idle threads spin ~300,000 iterations (about
# 3 ms) before sleeping. On a core that another process also wants, the spinning thread
# uses its share of the core on nothing, the scheduler then preempts it for a whole time
# slice, and every region of the step waits for it at the barrier: decoding measured
# 13-80x slower with the cores busy. 1,000 spins (~10 us) still bridge the gaps between
# the ops of one step; a thread that then sleeps is woken promptly (a sleeper preempts a
# busy neighbour). On 2 shared cores a short spin served 200-700 output tok/s where
# libgomp's spin served 29 (58 idle), and 1,000 spins did best of 1,000 / 10,000 /
# PASSIVE (noisy figures: docs/benchmarks.md).
DEFAULTS = {"GOMP_SPINCOUNT": "1000"}


def set_wait_policy_defaults(environ: MutableMapping[str, str] = os.environ) -> dict[str, str]:
    """Set :data:`DEFAULTS` in ``environ`` unless the user set a wait policy; returns what
    was set ({} when the user's choice stands)."""
    if any(key in environ for key in USER_KEYS):
        return {}
    environ.update(DEFAULTS)
    return dict(DEFAULTS)


def openmp_started() -> bool:
    """Whether torch (and so libgomp) was imported before ferry: then the wait policy of
    this process is libgomp's own, whatever the environment now says."""
    return "torch" in sys.modules
