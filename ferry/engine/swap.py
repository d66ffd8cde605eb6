"""Swap accounting: host-memory KV blocks of requests preempted by swapping.

The host pool has ``num_host_blocks`` blocks (``swap_space`` GiB over the bytes of one
block), tracked like the device pool: a request swapped out holds a list of host blocks
until it is swapped back in, finishes or is aborted. The scheduler emits the copies as
``SchedulerOutput.swap_out`` / ``swap_in`` block pairs; the runner makes them before the
step's forward, swap-outs first.

NOTE: host blocks released in a step become free only at the next step
(:meth:`SwapSpace.end_step`): the runner copies a step's swap-outs before its swap-ins, so a
host block read by a swap-in must not be written by a swap-out of the same step.
Pure Python.
"""
from __future__ import annotations


class SwapSpace:
    """Host KV blocks: a free list and each swapped-out request's blocks, in table order."""

    def __init__(self, num_host_blocks: int) -> None:
        if not isinstance(num_host_blocks, int) or num_host_blocks < 0:
            raise ValueError(f"num_host_blocks must be an integer >= 0, got {num_host_blocks!r}")
        self.num_blocks = num_host_blocks
        self._free: list[int] = list(range(num_host_blocks - 1, -1, -1))   # pop() gives 0 first
        self._released: list[int] = []
        self._held: dict[str, list[int]] = {}

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        """Blocks held by swapped-out requests (the ``llm_swapped_blocks`` gauge)."""
        return sum(len(blocks) for blocks in self._held.values())

    def is_swapped(self, request_id: str) -> bool:
        return request_id in self._held

    def num_swapped_blocks(self, request_id: str) -> int:
        return len(self._held.get(request_id, ()))

    def swap_out(self, request_id: str, device_blocks: list[int]) -> list[tuple[int, int]]:
        """Take a host block per device block; returns the (device, host) copies."""
        if request_id in self._held:
            raise ValueError(f"request {request_id!r} is already swapped out")
        if len(device_blocks) > len(self._free):
            raise ValueError(f"swap-out of {len(device_blocks)} blocks but only "
                             f"{len(self._free)} host blocks are free")
        host = [self._free.pop() for _ in device_blocks]
        self._held[request_id] = host
        return list(zip(device_blocks, host))

    def swap_in(self, request_id: str, device_blocks: list[int]) -> list[tuple[int, int]]:
        """Copy the request's host blocks into ``device_blocks`` (its new table's first
        entries); returns the (host, device) copies and releases the host blocks."""
        host = self._held.pop(request_id)
        if len(device_blocks) < len(host):
            raise ValueError(f"swap-in of {len(host)} blocks into {len(device_blocks)}")
        self._released.extend(host)
        return list(zip(host, device_blocks))

    def discard(self, request_id: str) -> None:
        """Drop a swapped-out request's host blocks (it finished or was aborted)."""
        self._released.extend(self._held.pop(request_id, ()))

    def end_step(self) -> None:
        """Host blocks released this step become free for the next."""
        self._free.extend(reversed(self._released))
        self._released.clear()
