"""GPU energy counters through the vendors' management libraries (both optional).

NVIDIA: NVML (``pynvml``, from nvidia-ml-py), Volta and newer. AMD: ``amdsmi``. Either may
be missing, or the GPU may have no counter: then there is no reader and no energy metric.
"""
from __future__ import annotations

import importlib
import logging
from collections.abc import Callable
from typing import Any

import torch

logger = logging.getLogger(__name__)

EnergyReader = Callable[[], "float | None"]


def energy_reader(vendor: str, index: int) -> EnergyReader | None:
    """A callable returning GPU ``index``'s energy counter in joules (monotonic, arbitrary
    origin; None on a failed read), or None where the GPU or the library has no counter.

    The library and the device handle are opened once here, not on every read.
    """
    opener = {"nvidia": _nvml_reader, "amd": _amdsmi_reader}.get(vendor)
    reader = opener(index) if opener else None
    if reader is not None and reader() is None:   # a counter that cannot be read now never will
        reader = None
    if reader is None and opener is not None:
        logger.info("GPU energy is not available on this %s GPU; energy metrics are off", vendor)
    return reader


def _smi_index(torch_helper: str, index: int) -> int:
    """The management library's index of torch's GPU ``index``.

    NOTE: NVML / amdsmi count every GPU, torch only the visible ones
    (CUDA_VISIBLE_DEVICES); torch's private helper maps one to the other where it works.
    """
    try:
        return int(getattr(torch.cuda, torch_helper)(index))
    except Exception:  # noqa: BLE001 - private API, may be missing or fail
        return index


def _nvml_reader(index: int) -> EnergyReader | None:
    try:
        pynvml = importlib.import_module("pynvml")
        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(_smi_index("_get_nvml_device_index", index))
    except Exception:  # noqa: BLE001 - optional library, or no such device
        return None

    def read() -> float | None:
        try:
            return pynvml.nvmlDeviceGetTotalEnergyConsumption(handle) / 1000.0   # millijoules
        except Exception:  # noqa: BLE001 - pre-Volta GPUs have no energy counter
            return None
    return read


def _amdsmi_reader(index: int) -> EnergyReader | None:
    try:
        amdsmi = importlib.import_module("amdsmi")
        amdsmi.amdsmi_init()
        handle = amdsmi.amdsmi_get_processor_handles()[_smi_index("_get_amdsmi_device_index", index)]
    except Exception:  # noqa: BLE001 - optional library, or no such device
        return None

    def read() -> float | None:
        try:
            return _amdsmi_joules(amdsmi.amdsmi_get_energy_count(handle))
        except Exception:  # noqa: BLE001
            return None
    return read


def _amdsmi_joules(info: dict[str, Any]) -> float | None:
    # The key names moved between amdsmi releases.
    counter = info.get("energy_accumulator", info.get("power"))
    resolution = info.get("counter_resolution")          # microjoules per count
    if not isinstance(counter, (int, float)) or not isinstance(resolution, (int, float)):
        return None
    return float(counter) * float(resolution) / 1e6


def temperature_reader(vendor: str, index: int) -> EnergyReader | None:
    """A callable returning GPU ``index``'s temperature in degrees C (None on a failed
    read), or None where the library is missing (the thermal guard then stays off)."""
    return _probe(vendor, index, nvml=lambda m, h: float(
        m.nvmlDeviceGetTemperature(h, m.NVML_TEMPERATURE_GPU)),
        amd=lambda m, h: float(m.amdsmi_get_temp_metric(
            h, m.AmdSmiTemperatureType.EDGE, m.AmdSmiTemperatureMetric.CURRENT)))


def power_reader(vendor: str, index: int) -> EnergyReader | None:
    """A callable returning GPU ``index``'s power draw in watts, or None (see above)."""
    return _probe(vendor, index, nvml=lambda m, h: m.nvmlDeviceGetPowerUsage(h) / 1000.0,
                  amd=lambda m, h: float(m.amdsmi_get_power_info(h)["current_socket_power"]))


def _probe(vendor: str, index: int, *, nvml: Callable, amd: Callable) -> EnergyReader | None:
    """A guarded reader: ``nvml(pynvml, handle)`` or ``amd(amdsmi, handle)``; None where the
    library or the device is missing, or the first read fails."""
    try:
        if vendor == "nvidia":
            module = importlib.import_module("pynvml")
            module.nvmlInit()
            handle = module.nvmlDeviceGetHandleByIndex(_smi_index("_get_nvml_device_index", index))
            read_value = nvml
        elif vendor == "amd":
            module = importlib.import_module("amdsmi")   # raises KeyError without ROCm
            module.amdsmi_init()
            handle = module.amdsmi_get_processor_handles()[
                _smi_index("_get_amdsmi_device_index", index)]
            read_value = amd
        else:
            return None
    except Exception:  # noqa: BLE001 - optional library, or no such device
        return None

    def read() -> float | None:
        try:
            return read_value(module, handle)
        except Exception:  # noqa: BLE001 - a flaky driver read is no reading
            return None
    return read if read() is not None else None
