"""Device calls: synchronize, memory, peak memory, events, graph capture.

The runner, the start-up code and the benchmarks call these instead of ``torch.cuda``; on
the CPU they are no-ops or host figures, so callers need no vendor branches. ROCm builds of
PyTorch expose AMD GPUs as ``torch.cuda`` devices, so one code path serves both vendors.
"""
from __future__ import annotations

from typing import Any

import torch

from ferry.platform.host import cpu_available_memory_bytes, cpu_total_memory_bytes


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (nothing to wait for on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def set_current_device(device: torch.device) -> None:
    """Make ``device`` the current GPU of this process (a rank's own; nothing on the CPU)."""
    if device.type == "cuda":
        torch.cuda.set_device(device)


def memory_info(device: torch.device) -> tuple[int, int]:
    """(free, total) bytes of the device: the driver's view on a GPU, MemAvailable on the CPU."""
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        return int(free), int(total)
    return cpu_available_memory_bytes(), cpu_total_memory_bytes()


def memory_reserved(device: torch.device) -> int:
    """Bytes this process's allocator holds on the device (0 on the CPU)."""
    return int(torch.cuda.memory_reserved(device)) if device.type == "cuda" else 0


class PeakMemory:
    """Bytes allocated on a GPU at the peak of a block of work, above what was allocated
    when it began: ``with PeakMemory(device) as peak: ...; peak.bytes``. 0 on the CPU."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.bytes = 0
        self._before = 0

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._before = torch.cuda.memory_allocated(self.device)
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.bytes = int(torch.cuda.max_memory_allocated(self.device) - self._before)


def empty_cache(device: torch.device) -> None:
    """Give the allocator's unused cached blocks back to the driver."""
    if device.type == "cuda":
        torch.cuda.empty_cache()


def record_event(device: torch.device) -> Any:
    """An event recorded now on the device's current stream (``.synchronize()`` waits for
    the work queued before it); None on the CPU, where work is done when it returns."""
    if device.type != "cuda":
        return None
    event = torch.cuda.Event()
    event.record()
    return event


class DeviceGraphCapture:
    """Captures device graphs (CUDA graphs; HIP graphs on ROCm, same API) on ``device``;
    all graphs share one memory pool. ``capture(forward)`` returns the replay."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._pool = None

    def capture(self, forward):
        # Warm up outside the graph first: Triton compiles its kernels on the first call,
        # and nothing may compile or allocate from the host during capture.
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            forward()
        torch.cuda.current_stream(self.device).wait_stream(stream)
        torch.cuda.synchronize(self.device)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            forward()
        self._pool = graph.pool()
        return graph.replay
