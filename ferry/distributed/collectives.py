"""The collectives ferry uses, each turning a timeout or a dead peer into an error in words.

Every call takes the ``ParallelContext``; with one rank in the group it does nothing (so
a TP=1 model pays nothing). The timeout is the process group's:
``distributed_startup_timeout_seconds`` while the ranks start, then
``distributed_timeout_seconds`` (``end_of_startup``).
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
import torch.distributed as dist

from ferry.distributed.state import ParallelContext, set_serving_timeout


class CollectiveError(RuntimeError):
    """A collective failed or timed out; the message names this rank and the op."""


@contextlib.contextmanager
def _named(ctx: ParallelContext, op: str) -> Iterator[None]:
    try:
        yield
    except CollectiveError:
        raise
    except RuntimeError as exc:  # DistBackendError and gloo's timeouts are RuntimeErrors
        raise CollectiveError(
            f"{op} failed on {ctx.layout.describe()} after at most "
            f"{ctx.timeout_seconds:.0f}s ({ctx.timeout_setting}): another rank "
            f"died, hung or is unreachable ({type(exc).__name__}: {str(exc).strip()[:300]})"
        ) from exc


def tp_all_reduce(ctx: ParallelContext, tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over the tensor-parallel ranks, in place; returns it."""
    if ctx.tp_size == 1:
        return tensor
    with _named(ctx, "tensor-parallel all_reduce"):
        dist.all_reduce(tensor, group=ctx.tp_group)
    return tensor


def world_all_reduce(ctx: ParallelContext, tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over every rank (the device backend's default group), in place."""
    if ctx.layout.world_size == 1:
        return tensor
    with _named(ctx, "all_reduce over all ranks"):
        dist.all_reduce(tensor)
    return tensor


def tp_all_gather(ctx: ParallelContext, tensor: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Concatenate every tensor rank's ``tensor`` along ``dim``, in rank order."""
    if ctx.tp_size == 1:
        return tensor
    tensor = tensor.contiguous()
    parts = [torch.empty_like(tensor) for _ in range(ctx.tp_size)]
    with _named(ctx, "tensor-parallel all_gather"):
        dist.all_gather(parts, tensor, group=ctx.tp_group)
    return torch.cat(parts, dim=dim)


def broadcast_object(ctx: ParallelContext, obj: Any = None, src: int = 0) -> Any:
    """Rank ``src``'s picklable ``obj`` on every rank (over the CPU group)."""
    if ctx.layout.world_size == 1:
        return obj
    box = [obj if ctx.rank == src else None]
    with _named(ctx, "broadcast of the step's message"):
        dist.broadcast_object_list(box, src=src, group=ctx.cpu_group)
    return box[0]


def send_object(ctx: ParallelContext, obj: Any, dst: int) -> None:
    with _named(ctx, f"send to rank {dst}"):
        dist.send_object_list([obj], dst=dst, group=ctx.cpu_group)


def recv_object(ctx: ParallelContext, src: int) -> Any:
    box = [None]
    with _named(ctx, f"receive from rank {src}"):
        dist.recv_object_list(box, src=src, group=ctx.cpu_group)
    return box[0]


def isend_tensor(ctx: ParallelContext, tensor: torch.Tensor, dst: int) -> Any:
    """Start sending ``tensor`` to global rank ``dst``; returns the work to ``wait()``."""
    with _named(ctx, f"send of activations to rank {dst}"):
        return dist.isend(tensor.contiguous(), dst=dst)


def recv_tensor(ctx: ParallelContext, tensor: torch.Tensor, src: int) -> torch.Tensor:
    """Receive into ``tensor`` (its shape and dtype must match the sender's) from ``src``."""
    with _named(ctx, f"receive of activations from rank {src}"):
        dist.recv(tensor, src=src)
    return tensor


def wait(ctx: ParallelContext, work: Any, what: str) -> None:
    with _named(ctx, what):
        work.wait()


def barrier(ctx: ParallelContext) -> None:
    if ctx.layout.world_size > 1:
        with _named(ctx, "barrier"):
            dist.barrier(group=ctx.cpu_group)


def all_reduce_min(ctx: ParallelContext, value: int, what: str = "the KV block counts") -> int:
    """The smallest ``value`` over all ranks (e.g. the KV blocks every rank can hold)."""
    if ctx.layout.world_size == 1:
        return value
    tensor = torch.tensor([value], dtype=torch.int64)
    with _named(ctx, f"all_reduce of {what}"):
        dist.all_reduce(tensor, op=dist.ReduceOp.MIN, group=ctx.cpu_group)
    return int(tensor.item())


def end_of_startup(ctx: ParallelContext) -> None:
    """Wait (start-up timeout) until every rank has loaded its part, then give the groups
    the serving timeout: all ranks switch at the same point, so no rank waits for a slower
    peer's loading under the short timeout."""
    barrier(ctx)
    set_serving_timeout(ctx)
