"""Platform layer: which device ferry runs on and what it can do.

This is the only module that looks at the GPU vendor. Everything else asks the
``Platform`` returned by :func:`detect_platform` (``use_triton_kernels``, memory, power).

PyTorch's ROCm builds expose AMD GPUs through the ``torch.cuda`` API and set
``torch.version.hip``; that is how ROCm is told apart from CUDA here.
"""
from __future__ import annotations

import ctypes
import functools
import importlib
import os
import re
import sys
from dataclasses import dataclass
from typing import Any, Literal

import torch

_DEVICE_CHOICES = ("auto", "cuda", "rocm", "cpu")


@dataclass(frozen=True)
class Platform:
    """What the engine runs on. Built by :func:`detect_platform`; plain data plus probes."""

    kind: Literal["cuda", "rocm", "cpu"]
    vendor: Literal["nvidia", "amd", "cpu"]
    device_name: str
    total_memory_bytes: int
    torch_device: torch.device
    triton_available: bool
    use_triton_kernels: bool
    compute_capability: tuple[int, int] | None = None   # NVIDIA only, e.g. (9, 0)
    gfx_arch: str | None = None                          # AMD only, e.g. "gfx942"

    @property
    def is_gpu(self) -> bool:
        return self.kind != "cpu"

    @property
    def arch(self) -> str:
        """Compiler target: ``sm_90`` (NVIDIA), ``gfx942`` (AMD) or ``cpu``."""
        if self.compute_capability is not None:
            return "sm_{}{}".format(*self.compute_capability)
        return self.gfx_arch or self.kind

    def free_memory_bytes(self) -> int:
        """Bytes the device can still allocate (GPU: driver's view; CPU: MemAvailable)."""
        if self.is_gpu:
            free, _total = torch.cuda.mem_get_info(self.torch_device)
            return int(free)
        return _cpu_available_memory_bytes()

    def power_watts(self) -> float | None:
        """Current board power in watts, or None where the device does not report it."""
        if not self.is_gpu:
            return None
        index = _device_index(self.torch_device)
        reading = _torch_power_watts(index)
        if reading is not None:
            return reading
        if self.vendor == "nvidia":
            return _nvml_power_watts(index)
        return _amdsmi_power_watts(index)

    def energy_joules(self) -> float | None:
        """Energy counter of the GPU in joules (monotonic, arbitrary origin), or None."""
        if not self.is_gpu:
            return None
        index = _device_index(self.torch_device)
        if self.vendor == "nvidia":
            return _nvml_energy_joules(index)
        return _amdsmi_energy_joules(index)


def detect_platform(device: str = "auto") -> Platform:
    """Find the device to run on.

    ``device`` is ``auto`` (GPU if one is usable, else CPU), ``cuda``, ``rocm`` or ``cpu``;
    ``cuda:N`` / ``rocm:N`` pick GPU N. ``cuda`` on a ROCm build is accepted (PyTorch's
    ROCm builds name AMD GPUs ``cuda`` too) and yields ``kind="rocm"``.

    Raises ``ValueError`` when the requested device cannot be used here.
    """
    kind_requested, index = _parse_device(device)
    if kind_requested == "cpu":
        return _cpu_platform()
    if kind_requested == "auto":
        return _gpu_platform(0 if index is None else index) if torch.cuda.is_available() \
            else _cpu_platform()
    _check_gpu_request(kind_requested)
    return _gpu_platform(0 if index is None else index)


def device_arch(device: torch.device) -> str:
    """Compiler target of the device holding a tensor: ``sm_90``, ``gfx942``, ... or ``cpu``."""
    if device.type != "cuda":
        return "cpu"
    props = torch.cuda.get_device_properties(device)
    if torch.version.hip is not None:
        return str(getattr(props, "gcnArchName", "") or "gfx").split(":")[0]
    return f"sm_{props.major}{props.minor}"


def arch_family(arch: str) -> Literal["nvidia", "amd_cdna", "amd_rdna", "cpu"]:
    """Tuning family of a compiler target (kernel block sizes differ by family).

    AMD's data-centre GPUs (CDNA: gfx90a, gfx942, gfx950) are gfx9*; its consumer GPUs
    (RDNA: gfx10*, gfx11*, gfx12*) have wave32, smaller register files per tile and LDS.
    """
    if arch.startswith("sm_"):
        return "nvidia"
    if arch.startswith("gfx9"):
        return "amd_cdna"
    if arch.startswith("gfx"):
        return "amd_rdna"
    return "cpu"


def _parse_device(device: str) -> tuple[str, int | None]:
    text = str(device).strip().lower()
    match = re.fullmatch(r"(auto|cuda|rocm|cpu)(?::(\d+))?", text)
    if not match:
        raise ValueError(f"unknown device {device!r}: choose one of {', '.join(_DEVICE_CHOICES)} "
                         "(optionally with a GPU index, e.g. cuda:1)")
    kind, index = match.group(1), match.group(2)
    if index is not None and kind in ("auto", "cpu"):
        raise ValueError(f"device {device!r}: a GPU index only applies to cuda or rocm")
    return kind, None if index is None else int(index)


def _check_gpu_request(kind: str) -> None:
    hip_build = torch.version.hip is not None
    if kind == "rocm" and not hip_build:
        build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "CPU-only"
        raise ValueError(f"device 'rocm' requested, but this PyTorch is a {build} build; "
                         "install a ROCm build of PyTorch for AMD GPUs, or use device: auto")
    if not torch.cuda.is_available():
        raise ValueError(f"device '{kind}' requested, but PyTorch sees no usable GPU "
                         f"(torch {torch.__version__}); check drivers and visible devices "
                         "(CUDA_VISIBLE_DEVICES / HIP_VISIBLE_DEVICES), or use device: cpu")


def _gpu_platform(index: int) -> Platform:
    count = torch.cuda.device_count()
    if index >= count:
        raise ValueError(f"GPU index {index} requested, but only {count} GPU(s) are visible")
    props = torch.cuda.get_device_properties(index)
    triton_ok = triton_importable()
    common = dict(device_name=str(props.name), total_memory_bytes=int(props.total_memory),
                  torch_device=torch.device("cuda", index), triton_available=triton_ok,
                  use_triton_kernels=triton_ok)
    if torch.version.hip is not None:
        arch = str(getattr(props, "gcnArchName", "") or "").split(":")[0] or None
        return Platform(kind="rocm", vendor="amd", gfx_arch=arch, **common)
    return Platform(kind="cuda", vendor="nvidia",
                    compute_capability=(int(props.major), int(props.minor)), **common)


def _cpu_platform() -> Platform:
    return Platform(kind="cpu", vendor="cpu", device_name=_cpu_name(),
                    total_memory_bytes=_cpu_total_memory_bytes(), torch_device=torch.device("cpu"),
                    triton_available=triton_importable(), use_triton_kernels=False)


def triton_importable() -> bool:
    """True when ``import triton`` works (it may be absent or broken on CPU-only installs)."""
    try:
        importlib.import_module("triton")
    except Exception:  # noqa: BLE001 - a broken install is as good as none
        return False
    return True


# ---- device calls: synchronize, memory, events, graphs -------------------------------------
# The runner and the start-up code call these instead of ``torch.cuda``; on the CPU they are
# no-ops or host figures, so callers need no vendor branches.

def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (nothing to wait for on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def memory_info(device: torch.device) -> tuple[int, int]:
    """(free, total) bytes of the device: the driver's view on a GPU, MemAvailable on the CPU."""
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        return int(free), int(total)
    return _cpu_available_memory_bytes(), _cpu_total_memory_bytes()


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


# ---- CPU probes -------------------------------------------------------------------------

_HUGE_PAGE = 2 << 20
_MADV_HUGEPAGE = 14


def empty_on_huge_pages(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised CPU tensor that Linux may back with 2 MiB transparent huge pages.

    The KV cache and the weights are read in scattered blocks every step; on 4 KiB pages
    that is a TLB miss per block. Where THP is in "madvise" mode (a common default) the
    pages are only huge if asked for, before they are first touched: this asks. Anywhere
    else (another OS, THP off) it is a plain ``torch.empty``.
    """
    tensor = torch.empty(shape, dtype=dtype)
    start = tensor.data_ptr()
    end = start + tensor.numel() * tensor.element_size()
    first, last = -(-start // _HUGE_PAGE) * _HUGE_PAGE, end // _HUGE_PAGE * _HUGE_PAGE
    if last > first and (madvise := _libc_madvise()) is not None:
        madvise(first, last - first, _MADV_HUGEPAGE)   # advice only: failure is harmless
    return tensor


@functools.cache
def _libc_madvise():
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes, fn.restype = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int], ctypes.c_int
    return fn


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform as std_platform
    return std_platform.processor() or std_platform.machine() or "cpu"


def _meminfo_bytes(key: str) -> int | None:
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024   # reported in kB
    except (OSError, ValueError, IndexError):
        pass
    return None


def _cpu_total_memory_bytes() -> int:
    from_meminfo = _meminfo_bytes("MemTotal")
    if from_meminfo is not None:
        return from_meminfo
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def _cpu_available_memory_bytes() -> int:
    from_meminfo = _meminfo_bytes("MemAvailable")
    if from_meminfo is not None:
        return from_meminfo
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


# ---- GPU power and energy probes (all optional: None when unavailable) -------------------

def _device_index(device: torch.device) -> int:
    return 0 if device.index is None else int(device.index)


def _torch_power_watts(index: int) -> float | None:
    """torch.cuda.power_draw (milliwatts; backed by pynvml or amdsmi when installed)."""
    power_draw = getattr(torch.cuda, "power_draw", None)
    if power_draw is None:
        return None
    try:
        return float(power_draw(index)) / 1000.0
    except Exception:  # noqa: BLE001 - the backing library is optional
        return None


def _smi_index(torch_helper: str, index: int) -> int:
    """The management library's index of torch's GPU ``index``.

    NOTE: NVML / amdsmi count every GPU, torch only the visible ones
    (CUDA_VISIBLE_DEVICES); torch's private helper maps one to the other where it works.
    """
    try:
        return int(getattr(torch.cuda, torch_helper)(index))
    except Exception:  # noqa: BLE001 - private API, may be missing or fail
        return index


def _nvml_handle(index: int) -> tuple[Any, Any] | None:
    try:
        pynvml = importlib.import_module("pynvml")
        pynvml.nvmlInit()
        return pynvml, pynvml.nvmlDeviceGetHandleByIndex(_smi_index("_get_nvml_device_index", index))
    except Exception:  # noqa: BLE001
        return None


def _nvml_power_watts(index: int) -> float | None:
    found = _nvml_handle(index)
    if found is None:
        return None
    pynvml, handle = found
    try:
        return pynvml.nvmlDeviceGetPowerUsage(handle) / 1000.0          # milliwatts
    except Exception:  # noqa: BLE001
        return None


def _nvml_energy_joules(index: int) -> float | None:
    found = _nvml_handle(index)
    if found is None:
        return None
    pynvml, handle = found
    try:
        return pynvml.nvmlDeviceGetTotalEnergyConsumption(handle) / 1000.0   # millijoules
    except Exception:  # noqa: BLE001 - pre-Volta GPUs have no energy counter
        return None


def _amdsmi_handle(index: int) -> tuple[Any, Any] | None:
    try:
        amdsmi = importlib.import_module("amdsmi")
        amdsmi.amdsmi_init()
        return amdsmi, amdsmi.amdsmi_get_processor_handles()[_smi_index("_get_amdsmi_device_index", index)]
    except Exception:  # noqa: BLE001
        return None


def _amdsmi_power_watts(index: int) -> float | None:
    found = _amdsmi_handle(index)
    if found is None:
        return None
    amdsmi, handle = found
    try:
        info = amdsmi.amdsmi_get_power_info(handle)
    except Exception:  # noqa: BLE001
        return None
    # The key names moved between amdsmi releases; take the first that holds a number.
    for key in ("current_socket_power", "average_socket_power", "socket_power"):
        value = info.get(key)
        if isinstance(value, (int, float)):
            return float(value)
    return None


def _amdsmi_energy_joules(index: int) -> float | None:
    found = _amdsmi_handle(index)
    if found is None:
        return None
    amdsmi, handle = found
    try:
        info = amdsmi.amdsmi_get_energy_count(handle)
    except Exception:  # noqa: BLE001
        return None
    counter = info.get("energy_accumulator", info.get("power"))
    resolution = info.get("counter_resolution")          # microjoules per count
    if not isinstance(counter, (int, float)) or not isinstance(resolution, (int, float)):
        return None
    return float(counter) * float(resolution) / 1e6
