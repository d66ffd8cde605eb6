"""Which device ferry runs on and what it can do: :func:`detect_platform` -> :class:`Platform`.

PyTorch's ROCm builds expose AMD GPUs through the ``torch.cuda`` API and set
``torch.version.hip``; that is how ROCm is told apart from CUDA here.
"""
from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch

from ferry.platform import capabilities
from ferry.platform.device import memory_info, memory_reserved
from ferry.platform.energy import energy_reader, power_reader, temperature_reader
from ferry.platform.rapl import rapl_reader
from ferry.platform.host import cpu_name, cpu_total_memory_bytes

_DEVICE_CHOICES = ("auto", "cuda", "rocm", "cpu")

Probe = Callable[[], "float | None"]


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
        return memory_info(self.torch_device)[0]

    def memory_used_bytes(self) -> int:
        """Bytes this process holds on the GPU (weights, KV cache, activations); 0 on the CPU."""
        return memory_reserved(self.torch_device)

    def memory_probe(self) -> Probe | None:
        """:meth:`memory_used_bytes` as a metrics probe; None on the CPU (nothing to report)."""
        return self.memory_used_bytes if self.is_gpu else None

    def energy_probe(self) -> Probe | None:
        """A callable reading the GPU's energy counter in joules (monotonic, arbitrary
        origin), or None where there is none: a GPU without a counter, no vendor library
        (NVML on NVIDIA, amdsmi on AMD), or a CPU without readable RAPL. Opens it once."""
        if not self.is_gpu:
            return rapl_reader()
        return energy_reader(self.vendor, self._index)

    def temperature_probe(self) -> Probe | None:
        """A callable reading the GPU's temperature in degrees C, or None (CPU, no library)."""
        return temperature_reader(self.vendor, self._index) if self.is_gpu else None

    def power_probe(self) -> Probe | None:
        """A callable reading the GPU's power draw in watts, or None (CPU, no library)."""
        return power_reader(self.vendor, self._index) if self.is_gpu else None

    @property
    def _index(self) -> int:
        return 0 if self.torch_device.index is None else int(self.torch_device.index)

    def energy_joules(self) -> float | None:
        """One reading of the GPU's energy counter in joules, or None (see :meth:`energy_probe`)."""
        probe = self.energy_probe()
        return probe() if probe is not None else None


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
    triton_ok = capabilities.triton_importable()
    common = dict(device_name=str(props.name), total_memory_bytes=int(props.total_memory),
                  torch_device=torch.device("cuda", index), triton_available=triton_ok,
                  use_triton_kernels=capabilities.kernel_backend("cuda") == "triton")
    if torch.version.hip is not None:
        arch = str(getattr(props, "gcnArchName", "") or "").split(":")[0] or None
        return Platform(kind="rocm", vendor="amd", gfx_arch=arch, **common)
    return Platform(kind="cuda", vendor="nvidia",
                    compute_capability=(int(props.major), int(props.minor)), **common)


def _cpu_platform() -> Platform:
    return Platform(kind="cpu", vendor="cpu", device_name=cpu_name(),
                    total_memory_bytes=cpu_total_memory_bytes(), torch_device=torch.device("cpu"),
                    triton_available=capabilities.triton_importable(), use_triton_kernels=False)
