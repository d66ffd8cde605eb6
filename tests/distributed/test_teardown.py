"""Leaving the group in order (gloo, 2 processes): rank 0 leaves after rank 1 has, both
report an orderly exit; a rank 1 that is already gone makes rank 0's ``leave`` return
False within the bound, without raising (a requested stop still exits 0)."""
from __future__ import annotations

import os
import socket
import time

import torch
import torch.multiprocessing as mp


def _port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _rank(rank: int, port: int, peer_dies: bool, results) -> None:
    import torch.distributed as dist

    from ferry.distributed import teardown
    from ferry.distributed.state import RankLayout, init_distributed

    torch.set_num_threads(1)
    ctx = init_distributed(RankLayout(rank=rank, tp_size=2, master_port=port, timeout_seconds=3,
                                      startup_timeout_seconds=60), torch.device("cpu"))
    dist.barrier()
    if rank == 1 and peer_dies:
        os._exit(9)          # gone before the stop: no barrier, no key
    if rank == 1:            # the slower rank: 1 s to leave after the barrier
        destroy = teardown.destroy_group
        teardown.destroy_group = lambda: (time.sleep(1), destroy())
    start = time.monotonic()
    in_order = teardown.leave(ctx)
    results.put((rank, in_order, time.monotonic() - start, dist.is_initialized()))


def _run(peer_dies: bool) -> dict[int, tuple]:
    context = mp.get_context("spawn")
    results = context.Queue()
    port = _port()
    procs = [context.Process(target=_rank, args=(r, port, peer_dies, results)) for r in range(2)]
    for p in procs:
        p.start()
    got = {}
    for _ in range(1 if peer_dies else 2):
        rank, *rest = results.get(timeout=120)
        got[rank] = tuple(rest)
    for p in procs:
        p.join(timeout=30)
    return got


def test_both_leave_in_order_rank0_last():
    got = _run(peer_dies=False)
    assert got[0][0] is True and got[1][0] is True, got
    assert got[0][1] >= 0.9, f"rank 0 (the store's host) did not wait for rank 1: {got}"
    assert got[0][2] is False and got[1][2] is False   # both groups destroyed


def test_a_gone_peer_is_logged_not_raised_and_bounded():
    got = _run(peer_dies=True)
    in_order, took, initialized = got[0]
    assert in_order is False
    assert took < 10            # min(30 s, the 3 s timeout) per wait, not a hang
    assert initialized is False
