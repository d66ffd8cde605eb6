"""Platform layer: which device ferry runs on, what it can do, and every call to the device.

This package is the only place in ferry that calls vendor APIs (``torch.cuda``, NVML,
amdsmi) or checks the GPU vendor; everything else imports from here:

- ``detect``: :func:`detect_platform` -> :class:`Platform` (kind, vendor, arch, memory,
  metrics probes), :func:`device_arch`, :func:`arch_family`;
- ``device``: synchronize, memory figures, peak memory, events, graph capture (no-ops or
  host figures on the CPU);
- ``capabilities``: which kernel backend runs on a device type (:func:`kernel_backend`);
- ``energy``: GPU energy counters (NVML / amdsmi, both optional);
- ``host``: the CPU's name and memory, the cores this process may use and the thread
  count from them, huge-page backed and on-demand zeroed tensors.
"""
from __future__ import annotations

from ferry.platform.capabilities import (KernelBackend, cpu_kernels_enabled, cxx_compiler,
                                         has_fp8_matmul, kernel_backend, triton_importable)
from ferry.platform.detect import Platform, arch_family, detect_platform, device_arch
from ferry.platform.device import (DeviceGraphCapture, PeakMemory, empty_cache, memory_info,
                                   memory_reserved, record_event, set_current_device,
                                   synchronize)
from ferry.platform.host import (apply_cpu_threads, empty_on_huge_pages, process_rss_bytes,
                                 usable_cpu_count, zeros_on_demand)

__all__ = ["DeviceGraphCapture", "KernelBackend", "PeakMemory", "Platform", "apply_cpu_threads",
           "arch_family", "cpu_kernels_enabled", "cxx_compiler", "detect_platform", "device_arch",
           "empty_cache", "empty_on_huge_pages", "has_fp8_matmul", "kernel_backend", "memory_info",
           "memory_reserved", "process_rss_bytes", "record_event", "set_current_device", "synchronize",
           "triton_importable", "usable_cpu_count", "zeros_on_demand"]
