"""Preemption: which running request gives its blocks up, and how it keeps its work.

Victim choice (:func:`select_victim`): the least urgent candidate (largest ``priority``
under the priority policy; every request ties under FCFS), and among those the one whose
preemption wastes least (fewest computed tokens), then the latest arrival.

Mode choice (:func:`choose_preemption_mode`): recomputing costs the victim's computed tokens
times the measured per-token prefill time; swapping costs its blocks' bytes out and back in
at the measured copy bandwidth. :class:`PreemptionCosts` keeps those measurements (a
running average of step times the engine observes, a bandwidth the runner measured).
Pure functions and plain state: the scheduler tests inject the measurements.
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

from ferry.request import Request

Mode = Literal["swap", "recompute"]

# Priors until something is measured: a modest accelerator's prefill and a PCIe link.
DEFAULT_SECONDS_PER_PREFILL_TOKEN = 5e-5
DEFAULT_COPY_BYTES_PER_SECOND = 10e9
_SMOOTHING = 0.2            # weight of a new step time in the running average
_MIN_TOKENS_TO_MEASURE = 32  # smaller steps are dominated by fixed per-step costs


def victim_key(request: Request, by_priority: bool) -> tuple:
    """Larger is preempted first: lowest priority, least computed work, latest arrival."""
    priority = request.priority if by_priority else 0
    return (priority, -request.num_computed_tokens, request.arrival_time, request.request_id)


def select_victim(candidates: Iterable[Request], by_priority: bool) -> Request | None:
    """The candidate to preempt (see the module docstring); None when there is none."""
    return max(candidates, key=lambda r: victim_key(r, by_priority), default=None)


def choose_preemption_mode(num_computed_tokens: int, num_blocks: int, block_bytes: int, *,
                           seconds_per_token: float, copy_bytes_per_second: float,
                           host_blocks_free: int) -> Mode:
    """Swap when the host has room and copying out and back is cheaper than recomputing."""
    if num_blocks == 0 or num_blocks > host_blocks_free or copy_bytes_per_second <= 0:
        return "recompute"
    recompute_s = num_computed_tokens * seconds_per_token
    swap_s = 2 * num_blocks * block_bytes / copy_bytes_per_second
    return "swap" if swap_s < recompute_s else "recompute"


class PreemptionCosts:
    """The measurements :func:`choose_preemption_mode` needs."""

    def __init__(self, seconds_per_token: float = DEFAULT_SECONDS_PER_PREFILL_TOKEN,
                 copy_bytes_per_second: float = DEFAULT_COPY_BYTES_PER_SECOND) -> None:
        self.seconds_per_token = seconds_per_token
        self.copy_bytes_per_second = copy_bytes_per_second

    def observe_step(self, num_tokens: int, seconds: float) -> None:
        """A step of ``num_tokens`` tokens took ``seconds``: update the per-token time."""
        if num_tokens < _MIN_TOKENS_TO_MEASURE or seconds <= 0:
            return
        per_token = seconds / num_tokens
        self.seconds_per_token += _SMOOTHING * (per_token - self.seconds_per_token)
