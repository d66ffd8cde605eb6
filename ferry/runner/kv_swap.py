"""Host copies of KV blocks for requests preempted by swapping.

One host tensor per layer, shaped like the device cache: ``(2, num_host_blocks,
block_size, num_kv_heads, head_dim)``; pinned on a GPU host so the copies run on the
device's stream without a host sync, private on-demand pages on the CPU (the "host memory"
there is a separate pool with the same accounting). The scheduler decides which blocks
move; :meth:`HostKVCache.apply` makes a step's copies before its forward, swap-outs first
(a device block a swap-out frees may be a swap-in's target in the same step).
"""
from __future__ import annotations

import time

import torch

from ferry.outputs import SchedulerOutput
from ferry.platform import synchronize, zeros_on_demand


class HostKVCache:
    """The host block pool's tensors and the block copies to and from the device cache."""

    def __init__(self, device_caches: list[torch.Tensor], num_host_blocks: int) -> None:
        self.device_caches = device_caches
        self.num_blocks = num_host_blocks
        self.caches: list[torch.Tensor] = []
        if num_host_blocks == 0:
            return
        first = device_caches[0]
        shape = (2, num_host_blocks) + tuple(first.shape[2:])
        on_gpu = first.device.type != "cpu"
        for _ in device_caches:
            if on_gpu:
                self.caches.append(torch.empty(shape, dtype=first.dtype, pin_memory=True))
            else:
                self.caches.append(zeros_on_demand(shape, first.dtype))

    @property
    def block_bytes(self) -> int:
        """Bytes of one block over all layers (what one block's swap copies)."""
        if not self.device_caches:
            return 0
        per_layer = self.device_caches[0][:, 0].numel() * self.device_caches[0].element_size()
        return per_layer * len(self.device_caches)

    def apply(self, sched: SchedulerOutput) -> None:
        """The step's copies: device -> host for ``swap_out``, then host -> device."""
        for device_block, host_block in sched.swap_out:
            for device, host in zip(self.device_caches, self.caches):
                host[:, host_block].copy_(device[:, device_block], non_blocking=True)   # (2, B, H, D)
        for host_block, device_block in sched.swap_in:
            for device, host in zip(self.device_caches, self.caches):
                device[:, device_block].copy_(host[:, host_block], non_blocking=True)

    def measure_bandwidth(self, num_blocks: int = 4) -> float:
        """Bytes per second of a swap copy, timed out and back on a few blocks (0 if none).

        NOTE: it overwrites device blocks 0.. with their own content only (out, then back).
        """
        count = min(num_blocks, self.num_blocks, self.device_caches[0].shape[1] if
                    self.device_caches else 0)
        if count == 0:
            return 0.0
        pairs = [(i, i) for i in range(count)]
        device = self.device_caches[0].device
        self.apply(SchedulerOutput(swap_out=pairs))        # warm-up (page faults, pinning)
        synchronize(device)
        start = time.perf_counter()
        self.apply(SchedulerOutput(swap_out=pairs))
        self.apply(SchedulerOutput(swap_in=pairs))
        synchronize(device)
        seconds = time.perf_counter() - start
        return 2 * count * self.block_bytes / seconds if seconds > 0 else 0.0

