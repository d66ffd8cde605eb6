"""The host CPU: its name, its memory, and huge-page backed tensors (Linux)."""
from __future__ import annotations

import ctypes
import functools
import os
import sys

import torch

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


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what Python's ``platform`` knows."""
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform as std_platform
    return std_platform.processor() or std_platform.machine() or "cpu"


def cpu_total_memory_bytes() -> int:
    """Physical memory in bytes (MemTotal), 0 where it cannot be read."""
    return _memory_bytes("MemTotal", "SC_PHYS_PAGES")


def cpu_available_memory_bytes() -> int:
    """Memory the host can still give without swapping (MemAvailable), 0 where unknown."""
    return _memory_bytes("MemAvailable", "SC_AVPHYS_PAGES")


def _memory_bytes(meminfo_key: str, sysconf_pages: str) -> int:
    from_meminfo = _meminfo_bytes(meminfo_key)
    if from_meminfo is not None:
        return from_meminfo
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf(sysconf_pages)
    except (ValueError, OSError, AttributeError):
        return 0


def _meminfo_bytes(key: str) -> int | None:
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024   # reported in kB
    except (OSError, ValueError, IndexError):
        pass
    return None
