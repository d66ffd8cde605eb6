"""Compile ferry's C++ CPU kernels on first use and load them with ctypes.

The sources (``csrc/*.cpp``) are plain C++ with a C ABI and no PyTorch headers, so a build
takes a second or two with the system compiler; the library is cached under
``$FERRY_CACHE_DIR`` (default ``~/.cache/ferry``) keyed by the sources, the flags, the
compiler and the CPU, and rebuilt only when one of them changes. ``-march=native`` is why
the CPU is part of the key. The kernels split their work over ferry's own worker pool
(``csrc/thread_pool.h``), not OpenMP: OpenMP is used only for ``#pragma omp simd``
(``-fopenmp-simd``, no runtime), so no OpenMP region of theirs waits at a barrier for a
thread the scheduler has not run.

Without a compiler (or with ``FERRY_CPU_KERNELS=0``) :func:`load_library` returns None and
the PyTorch reference runs instead.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import subprocess
import tempfile
from pathlib import Path

# The platform decides whether the C++ kernels may run (opt-out, compiler); named here as
# this module's own so that the tests can replace them.
from ferry.platform import cpu_kernels_enabled as enabled
from ferry.platform import cxx_compiler as find_compiler

logger = logging.getLogger(__name__)

CSRC = Path(__file__).parent / "csrc"
SOURCES = sorted(CSRC.glob("*.cpp"))
FLAGS = ["-O3", "-march=native", "-ffast-math", "-fopenmp-simd", "-pthread", "-fPIC", "-std=c++17",
         "-fno-exceptions"]
# Linked without -ffast-math: given at link time (like -Ofast) it pulls in crtfastmath.o,
# which switches the WHOLE process to flush-to-zero when the library loads, so every
# PyTorch op after it would round subnormals to 0. Compiled with it: glibc's vector exp
# (libmvec) is only declared under __FAST_MATH__, and the kernels' exp loops need it.
LINK_FLAGS = ["-pthread", "-shared"]


def cache_dir() -> Path:
    root = os.environ.get("FERRY_CACHE_DIR") or Path.home() / ".cache" / "ferry"
    return Path(root) / "cpu_kernels"


@functools.cache
def load_library() -> ctypes.CDLL | None:
    """The compiled kernels, building them if needed; None where they cannot be built."""
    if not enabled():
        return None
    compiler = find_compiler()
    if compiler is None:
        logger.warning("No C++ compiler found (set CXX or install g++): ferry's CPU kernels "
                       "are off and the slower PyTorch reference path runs instead.")
        return None
    path = cache_dir() / f"ferry_cpu_kernels_{_build_key(compiler)}.so"
    try:
        if not path.exists():
            _compile(compiler, path)
        return ctypes.CDLL(str(path))
    except (OSError, subprocess.SubprocessError) as exc:
        logger.warning("Could not build ferry's CPU kernels (%s): using the PyTorch reference "
                       "path instead.", exc)
        return None


def _build_key(compiler: str) -> str:
    digest = hashlib.sha256()
    for source in sorted(CSRC.iterdir()):  # headers too
        digest.update(source.name.encode() + source.read_bytes())
    digest.update(" ".join(FLAGS + LINK_FLAGS).encode())
    digest.update(_compiler_version(compiler).encode())
    digest.update(_cpu_flags().encode())
    return digest.hexdigest()[:20]


def _compiler_version(compiler: str) -> str:
    try:
        return subprocess.run([compiler, "--version"], capture_output=True, text=True,
                              timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return compiler


def _cpu_flags() -> str:
    """The CPU's feature flags: a library built with -march=native only runs where they match."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    import platform
    return platform.processor() or platform.machine()


def _compile(compiler: str, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # Build under a temporary name, then rename: concurrent processes never load half a file.
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=path.parent)
    os.close(fd)
    try:
        with tempfile.TemporaryDirectory(dir=path.parent) as objects:
            object_files = [str(Path(objects) / f"{src.stem}.o") for src in SOURCES]
            for source, obj in zip(SOURCES, object_files):
                _run(compiler, [*FLAGS, "-c", str(source), "-o", obj])
            _run(compiler, [*LINK_FLAGS, *object_files, "-o", tmp, "-lm"])
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _run(compiler: str, args: list[str]) -> None:
    command = [compiler, *args]
    logger.info("Building ferry's CPU kernels: %s", " ".join(command))
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    if result.returncode != 0:
        raise OSError(f"{Path(compiler).name} exited with {result.returncode}: "
                      f"{result.stderr.strip()[-2000:]}")
