"""The start-up all-reduce check: every rank sums a known tensor and times a larger one.

A hang here (NCCL/RCCL misconfiguration, a firewall between nodes) fails start-up within
``distributed_startup_timeout_seconds`` with the rank named, instead of the first request
hanging. The figures (backend, latency, bus bandwidth) are logged and returned.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from ferry.distributed.collectives import CollectiveError, barrier, world_all_reduce
from ferry.distributed.state import ParallelContext
from ferry.platform import synchronize

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SelfTestResult:
    backend: str
    world_size: int
    tp_size: int
    latency_us: float          # one small all-reduce
    bus_bandwidth_gbps: float  # nccl-tests' bus bandwidth of the large one, GB/s
    size_bytes: int

    def describe(self) -> str:
        return (f"all-reduce self-test passed over {self.backend} across {self.world_size} "
                f"ranks: {self.latency_us:.0f} us for 4 bytes, "
                f"{self.bus_bandwidth_gbps:.2f} GB/s bus bandwidth for "
                f"{self.size_bytes / 2**20:.0f} MiB")


def run_self_test(ctx: ParallelContext, device: torch.device,
                  size_bytes: int = 16 * 2**20, repeats: int = 3) -> SelfTestResult:
    """Check that an all-reduce over all ranks is right, and measure it.

    Raises ``CollectiveError`` naming this rank when the sum is wrong or a rank does not
    answer within the timeout.
    """
    barrier(ctx)
    ranks = torch.full((1,), float(ctx.rank + 1), device=device)
    world_all_reduce(ctx, ranks)
    n = ctx.layout.world_size
    want = n * (n + 1) / 2
    if float(ranks.item()) != want:
        raise CollectiveError(f"all-reduce self-test on {ctx.layout.describe()} over "
                              f"{ctx.backend} summed to {ranks.item()}, expected {want}: the "
                              f"collective library returns wrong results")
    small = torch.ones(1, device=device)
    start = time.perf_counter()
    for _ in range(repeats):
        world_all_reduce(ctx, small)
    synchronize(device)
    latency = (time.perf_counter() - start) / repeats
    big = torch.ones(size_bytes // 4, device=device)
    world_all_reduce(ctx, big)   # warm-up
    synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        world_all_reduce(ctx, big)
    synchronize(device)
    elapsed = (time.perf_counter() - start) / repeats
    bus = size_bytes * 2 * (n - 1) / n / elapsed / 1e9 if n > 1 else 0.0
    result = SelfTestResult(ctx.backend, n, ctx.tp_size, latency * 1e6, bus, size_bytes)
    if ctx.rank == 0:
        logger.info("%s", result.describe())
    return result
