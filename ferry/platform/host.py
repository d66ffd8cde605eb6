"""The host CPU: its name, its memory, the cores this process may use, and tensors whose
pages the OS maps on demand or backs with huge pages (Linux)."""
from __future__ import annotations

import ctypes
import functools
import logging
import mmap
import os
import sys
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

_HUGE_PAGE = 2 << 20
_MADV_HUGEPAGE = 14
CGROUP_ROOT = Path("/sys/fs/cgroup")


def empty_on_huge_pages(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised CPU tensor that Linux may back with 2 MiB transparent huge pages.

    The KV cache and the weights are read in scattered blocks every step; on 4 KiB pages
    that is a TLB miss per block. Where THP is in "madvise" mode (a common default) the
    pages are only huge if asked for, before they are first touched: this asks. Anywhere
    else (another OS, THP off) it is a plain ``torch.empty``.
    """
    tensor = torch.empty(shape, dtype=dtype)
    _advise_huge_pages(tensor)
    return tensor


def zeros_on_demand(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A CPU tensor that reads as zeros and takes memory only where it is written.

    ``torch.zeros`` writes every byte (PyTorch's CPU allocator has no calloc), so a 4 GiB
    KV cache would be resident from the start. A private anonymous mapping is zero by
    definition: the kernel maps a page on its first write (a read of a page never
    written sees the shared zero page), so the cache's memory follows the blocks in use.
    It is advised for huge pages like :func:`empty_on_huge_pages`: advice, not a touch.
    """
    numel = 1
    for size in shape:
        numel *= size
    if numel == 0 or not hasattr(mmap, "MAP_PRIVATE"):    # Windows: no such mapping
        return torch.zeros(shape, dtype=dtype)
    nbytes = numel * torch.empty((), dtype=dtype).element_size()
    # fileno -1: anonymous. MAP_PRIVATE: ordinary process memory that THP may back; a
    # shared mapping would be shmem, which THP usually does not.
    buffer = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE)
    tensor = torch.frombuffer(buffer, dtype=dtype, count=numel).view(shape)  # keeps buffer alive
    _advise_huge_pages(tensor)
    return tensor


def _advise_huge_pages(tensor: torch.Tensor) -> None:
    start = tensor.data_ptr()
    end = start + tensor.numel() * tensor.element_size()
    first, last = -(-start // _HUGE_PAGE) * _HUGE_PAGE, end // _HUGE_PAGE * _HUGE_PAGE
    if last > first and (madvise := _libc_madvise()) is not None:
        madvise(first, last - first, _MADV_HUGEPAGE)   # advice only: failure is harmless


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


def process_rss_bytes(pid: int | str = "self") -> int:
    """Resident memory of a process (VmRSS in ``/proc/<pid>/status``), 0 where unknown."""
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


# ---------------------------------------------------------------------------- threads
def usable_cpu_count(cgroup_root: Path = CGROUP_ROOT,
                     proc_cgroup: Path = Path("/proc/self/cgroup")) -> int:
    """How many cores this process may keep busy: its CPU affinity, capped by the CPU
    quota of its cgroup (v2 ``cpu.max``, v1 ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``).

    ``os.cpu_count()`` is the host's count: in a container limited to 2 CPUs of a 64-core
    host an OpenMP team of 64 threads would be throttled mid-step, and a thread waiting at
    a barrier for one that is descheduled waits a whole scheduler period.
    """
    count = affinity_cpu_count()
    quota = cgroup_cpu_quota(cgroup_root, proc_cgroup)
    return max(1, min(count, quota)) if quota is not None else count


def affinity_cpu_count() -> int:
    """Cores in this process's affinity mask (``taskset``, cpusets), else the host's."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):   # not Linux
        return os.cpu_count() or 1


def cgroup_cpu_quota(cgroup_root: Path = CGROUP_ROOT,
                     proc_cgroup: Path = Path("/proc/self/cgroup")) -> int | None:
    """Whole CPUs of the cgroup's quota (at least 1), or None when there is no quota.

    Rounded down: a team sized for 1.5 CPUs as 2 threads would spend its third half
    throttled. Read in this process's own group (``/proc/self/cgroup``), then at
    ``cgroup_root``, which is the group itself inside a container with its own namespace.
    """
    paths = _own_cgroup_paths(proc_cgroup)
    for group in _candidates(cgroup_root, paths.get("", "/")):
        words = _read_words(group / "cpu.max")                          # v2: "max 100000"
        if words is not None:
            return _whole_cpus(*words[:2]) if len(words) >= 2 else None
    for controller in ("cpu", "cpu,cpuacct", "cpuacct,cpu"):            # v1
        for group in _candidates(cgroup_root / controller, paths.get("cpu", "/")):
            quota = _read_words(group / "cpu.cfs_quota_us")
            period = _read_words(group / "cpu.cfs_period_us")
            if quota and period:
                return _whole_cpus(quota[0], period[0])
    return None


def _own_cgroup_paths(proc_cgroup: Path) -> dict[str, str]:
    """Controller ("" for the v2 hierarchy) -> this process's group path."""
    paths: dict[str, str] = {}
    for line in (_read_text(proc_cgroup) or "").splitlines():
        parts = line.split(":", 2)
        if len(parts) == 3:
            for controller in parts[1].split(",") if parts[1] else [""]:
                paths[controller] = parts[2]
    return paths


def _candidates(root: Path, own_path: str) -> list[Path]:
    own = root / own_path.strip("/")
    return [own, root] if own != root else [root]


def _whole_cpus(quota: str, period: str) -> int | None:
    """``max`` (v2) or ``-1`` (v1) mean no quota."""
    try:
        quota_us, period_us = int(quota), int(period)
    except ValueError:
        return None
    if quota_us <= 0 or period_us <= 0:
        return None
    return max(1, quota_us // period_us)


def _read_words(path: Path) -> list[str] | None:
    text = _read_text(path)
    return None if text is None else text.split()


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


def apply_cpu_threads(requested: int | None) -> int:
    """Size PyTorch's OpenMP team (and MKL's) for the calling thread: ``requested``, else
    :func:`usable_cpu_count`. Call it on the thread that runs the model: libgomp keeps the
    team size per thread, and PyTorch copies its global setting only into threads that
    have not run a parallel op yet."""
    threads = requested or usable_cpu_count()
    torch.set_num_threads(threads)
    logger.info("CPU threads: %d (%s)", threads,
                "cpu_threads" if requested else "derived from the CPU affinity and cgroup quota")
    return threads
