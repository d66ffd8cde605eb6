"""Leaving the process group in order, so that a requested stop exits 0 on every rank.

Why an order: rank 0 hosts the rendezvous store (``tcp://`` init) and is the sender of the
last message (``("stop",)``). A rank that tears its group down while a peer still reads
that message, or a store host that exits while a peer is still leaving, turns a clean
stop into an error or a crash on the slower rank, and only sometimes (it depends on which
process the loaded machine runs first). So, after the stop message, every rank calls
``leave``:

1. a barrier over the CPU group, bounded by ``leave_timeout`` (``dist.monitored_barrier``:
   it names a rank that does not come): after it no message is in flight;
2. the ranks other than 0 destroy their groups, then each sets ``ferry/left/<rank>`` in
   the store (a key outlives the group: the store is its own object);
3. rank 0 waits (bounded) for those keys, then destroys its groups: it leaves last, so
   the store it hosts is there for as long as any rank needs it.

A peer that is already gone (killed, crashed) makes step 1 or 3 fail or time out: that is
logged as a warning and ``leave`` returns False, but the caller still exits 0, since a stop
was asked for; only a failure while serving is an error (exit code 1).
"""
from __future__ import annotations

import logging
import os
import sys
from datetime import timedelta

import torch.distributed as dist

from ferry.distributed.state import ParallelContext

logger = logging.getLogger(__name__)

LEAVE_TIMEOUT_CAP_SECONDS = 30.0   # the whole of a stop: a gone peer must not stall exit


def leave_timeout(ctx: ParallelContext) -> float:
    return min(LEAVE_TIMEOUT_CAP_SECONDS, ctx.layout.timeout_seconds)


def _left_key(rank: int) -> str:
    return f"ferry/left/{rank}"


def leave(ctx: ParallelContext) -> bool:
    """Leave the group in the order above; True when every rank left with us."""
    world = ctx.layout.world_size
    if world == 1 or not dist.is_initialized():
        destroy_group()
        return True
    timeout = timedelta(seconds=leave_timeout(ctx))
    store = dist.distributed_c10d._get_default_store()   # outlives the group
    in_order = True
    try:
        dist.monitored_barrier(group=ctx.cpu_group, timeout=timeout)
    except RuntimeError as exc:
        logger.warning("%s: not every rank reached the stop barrier (%s); leaving anyway",
                       ctx.layout.describe(), str(exc).strip()[:300])
        in_order = False
    if ctx.rank != 0:
        destroy_group()
        try:
            store.set(_left_key(ctx.rank), "1")
        except RuntimeError as exc:   # rank 0 is gone: nobody waits for the key
            logger.warning("%s: could not tell rank 0 it left (%s)", ctx.layout.describe(), exc)
            in_order = False
        return in_order
    if in_order:
        try:
            store.wait([_left_key(rank) for rank in range(1, world)], timeout)
        except RuntimeError as exc:
            logger.warning("rank 0: not every rank said it left within %.0fs (%s)",
                           timeout.total_seconds(), str(exc).strip()[:300])
            in_order = False
    destroy_group()
    return in_order


def destroy_group() -> None:
    """Destroy this process's groups, if any; a group already broken is no error here."""
    if not dist.is_initialized():
        return
    try:
        dist.destroy_process_group()
    except Exception as exc:  # noqa: BLE001 - leaving must not fail the exit
        logger.warning("destroying the process group failed: %s", exc)


def exit_process(code: int) -> None:
    """End a rank's process now with ``code``, after flushing its output: the interpreter's
    own teardown would race torch's threads (gloo's, the store's) and can crash, which
    would turn a clean exit code into a signal."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
