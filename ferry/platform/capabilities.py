"""Which kernel backend can run on a device type: Triton, the C++ CPU kernels, or neither.

``ferry.kernels`` asks :func:`kernel_backend` once per device type and caches the answer;
nothing here runs per op. Nothing here imports Triton at module import either: the CPU
tests set ``TRITON_INTERPRET`` before Triton's first import, so the import must wait for
the first question about a GPU device.
"""
from __future__ import annotations

import importlib
import os
import shutil
from typing import Literal

KernelBackend = Literal["triton", "cpu", "reference"]

_OFF = ("0", "false", "no", "off")


def triton_importable() -> bool:
    """True when ``import triton`` works (it may be absent or broken on CPU-only installs)."""
    try:
        importlib.import_module("triton")
    except Exception:  # noqa: BLE001 - a broken install is as good as none
        return False
    return True


def cpu_kernels_enabled() -> bool:
    """False when ``FERRY_CPU_KERNELS`` is 0 / false / no / off (the user opted out)."""
    return os.environ.get("FERRY_CPU_KERNELS", "1").strip().lower() not in _OFF


def cxx_compiler() -> str | None:
    """Path of the C++ compiler for the CPU kernels ($CXX, c++, g++, clang++), or None."""
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and (path := shutil.which(name)):
            return path
    return None


def kernel_backend(device_type: str) -> KernelBackend:
    """The backend for tensors on ``device_type`` (``torch.device.type``):

    - ``"cuda"`` (CUDA and ROCm alike): ``"triton"`` when Triton imports;
    - ``"cpu"``: ``"cpu"`` when the C++ kernels are enabled and a compiler exists (the
      build itself may still fail; ``ferry.kernels`` then falls back to the reference);
    - anything else, or when the above are missing: ``"reference"`` (PyTorch).

    Not cached: it looks at the environment and may import Triton; callers cache it.
    """
    if device_type == "cuda":
        return "triton" if triton_importable() else "reference"
    if device_type == "cpu" and cpu_kernels_enabled() and cxx_compiler() is not None:
        return "cpu"
    return "reference"


def has_fp8_matmul(device) -> bool:
    """True where ``torch._scaled_mm`` runs FP8 matmuls: CUDA compute capability 8.9+
    (Ada, Hopper and later) or ROCm MI300 (gfx94x/gfx95x)."""
    import torch
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    if torch.version.hip:
        arch = torch.cuda.get_device_properties(device).gcnArchName
        return arch.startswith(("gfx94", "gfx95"))
    return torch.cuda.get_device_capability(device) >= (8, 9)
