"""Accelerator probes for the metrics: memory in use and cumulative energy.

Each returns a zero-argument callable, or None when the platform cannot report the value
(the CPU reports neither; energy needs NVML on NVIDIA). A platform object may provide
``memory_used_bytes()`` / ``energy_joules()`` itself; those win.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

logger = logging.getLogger(__name__)


def memory_probe(platform: Any) -> Callable[[], float | None] | None:
    own = getattr(platform, "memory_used_bytes", None)
    if callable(own):
        return own
    if getattr(platform, "vendor", "cpu") not in ("nvidia", "amd"):
        return None
    import torch

    if not torch.cuda.is_available():
        return None
    # Memory this process holds on its device (weights, KV cache, activations).
    return lambda: float(torch.cuda.memory_reserved())


def energy_probe(platform: Any) -> Callable[[], float | None] | None:
    own = getattr(platform, "energy_joules", None)
    if callable(own):
        return own
    if getattr(platform, "vendor", "cpu") != "nvidia":
        return None
    return _nvml_energy_probe()


def _nvml_energy_probe() -> Callable[[], float | None] | None:
    try:
        import pynvml  # optional: nvidia-ml-py

        pynvml.nvmlInit()
        import torch

        handle = pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device())
        pynvml.nvmlDeviceGetTotalEnergyConsumption(handle)  # raises if unsupported
    except Exception as exc:  # noqa: BLE001 - energy is optional
        logger.info("GPU energy is not available (%s); energy metrics are off", exc)
        return None
    # NVML reports millijoules since the driver loaded.
    return lambda: pynvml.nvmlDeviceGetTotalEnergyConsumption(handle) / 1000.0
