"""Collectives over gloo with 2 processes: a rank that joins later than the serving timeout
still starts (the start-up timeout), the self-test's figures, and once serving, a rank that
never joins an all-reduce makes the other fail within the short timeout, naming it."""
from __future__ import annotations

import socket
import time

import torch
import torch.multiprocessing as mp


def _port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _rank(rank: int, port: int, results) -> None:
    from ferry.distributed.collectives import CollectiveError, end_of_startup, tp_all_reduce
    from ferry.distributed.selftest import run_self_test
    from ferry.distributed.state import RankLayout, init_distributed

    torch.set_num_threads(1)
    if rank == 1:
        time.sleep(5)   # joins later than the 3 s serving timeout: start-up must wait
    layout = RankLayout(rank=rank, tp_size=2, master_port=port, timeout_seconds=3,
                        startup_timeout_seconds=60)
    ctx = init_distributed(layout, torch.device("cpu"))
    test = run_self_test(ctx, torch.device("cpu"), size_bytes=2**20)
    if rank == 1:
        time.sleep(5)   # "loads" longer than the serving timeout too
    end_of_startup(ctx)
    results.put((rank, "selftest", test.backend, test.bus_bandwidth_gbps))
    if rank == 1:
        time.sleep(8)   # never joins the all-reduce below
        return
    start = time.monotonic()
    try:
        tp_all_reduce(ctx, torch.ones(4))
        results.put((rank, "no error", "", 0.0))
    except CollectiveError as exc:
        results.put((rank, str(exc), "", time.monotonic() - start))


def test_self_test_and_a_hang_reported_naming_the_rank():
    context = mp.get_context("spawn")
    results = context.Queue()
    port = _port()
    procs = [context.Process(target=_rank, args=(r, port, results)) for r in range(2)]
    for p in procs:
        p.start()
    got = [results.get(timeout=120) for _ in range(3)]
    for p in procs:
        p.join(timeout=30)
    tests = [g for g in got if g[1] == "selftest"]
    assert len(tests) == 2 and all(g[2] == "gloo" and g[3] > 0 for g in tests)
    error = next(g for g in got if g[1] != "selftest")
    assert "rank 0/2" in error[1] and "tensor-parallel all_reduce" in error[1], error
    assert "distributed_timeout_seconds" in error[1], error
    assert error[3] < 10   # the 3 s serving timeout, not the 60 s start-up one
