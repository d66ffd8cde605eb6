"""Ahead-of-time compilation of every Triton kernel for NVIDIA and AMD GPUs, without a GPU.

``triton.compile`` with an explicit target runs the whole compiler (ptxas for cubin, LLVM
for hsaco), so a kernel or block configuration that would not build on sm_80/sm_90 or
gfx90a/gfx942/gfx1100 fails here. The whole matrix is compiled: every kernel, for every
dtype, head-dim class and block configuration the dispatcher can choose, for every target
(744 compilations, about 110 s on 2 cores, the targets split over two compiler processes).
``scripts/kernel_matrix.py`` writes the same matrix into docs/kernels.md.

Compilation runs in a subprocess: the kernel tests set TRITON_INTERPRET=1, which turns
Triton's own helpers into interpreter functions for the rest of this process.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

if not torch.cuda.is_available():
    # Like the kernel tests, so whichever module imports triton first leaves it interpreting.
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

from ferry.tools import aot  # noqa: E402


@pytest.fixture(scope="module")
def matrix_results():
    """Every variant on every target, compiled in two processes (one per core here)."""
    targets = list(aot.TARGETS)
    halves = [targets[0::2], targets[1::2]]
    with ThreadPoolExecutor(len(halves)) as pool:
        parts = list(pool.map(lambda half: aot.compile_matrix_in_subprocess(targets=half), halves))
    return [result for part in parts for result in part]


def _kernel_names_in_package() -> set[str]:
    """Every @triton.jit kernel (``*_kernel``) defined in ferry.kernels.triton, interpreted
    or not. Other @triton.jit functions are device helpers: they are inlined into, and
    compiled with, the kernels that call them."""
    import importlib
    import pkgutil

    import ferry.kernels.triton as package

    names = set()
    for module_info in pkgutil.iter_modules(package.__path__):
        module = importlib.import_module(f"{package.__name__}.{module_info.name}")
        for value in vars(module).values():
            fn = getattr(value, "fn", None)
            if (callable(fn) and hasattr(value, "run") and fn.__name__.endswith("_kernel")
                    and getattr(fn, "__module__", "") == module.__name__):
                names.add(fn.__name__)
    return names


def test_matrix_lists_every_kernel_for_every_target():
    defined = _kernel_names_in_package()
    assert len(defined) >= 8
    for target in aot.TARGETS:
        listed = {v.kernel_name for v in aot.all_variants(target)}
        assert listed == defined, f"{target}: kernels missing from the AOT matrix: {defined - listed}"


def test_variant_signatures_cover_every_argument():
    """A signature built from the variant types every kernel argument (else compile fails late)."""
    for variant in aot.all_variants("sm_90"):
        arg_names = variant.kernel.arg_names      # JITFunction and InterpretedFunction alike
        signature = variant.signature(arg_names)
        assert set(signature) == set(arg_names)
        assert all(signature[name] == "constexpr" for name in variant.constexprs)


def test_unknown_target_is_a_value_error():
    with pytest.raises(ValueError, match="unknown target"):
        aot.gpu_target("sm_75x")


def test_every_variant_compiles_on_every_target(matrix_results):
    kernels = _kernel_names_in_package()
    covered = {(r.kernel, r.target) for r in matrix_results}
    assert covered == {(k, t) for k in kernels for t in aot.TARGETS}
    expected = sum(len(aot.all_variants(target)) for target in aot.TARGETS)
    assert len(matrix_results) == expected
    assert {r.dtype for r in matrix_results} == {"bf16", "fp16", "fp32"}
    failed = [f"{r.kernel} [{r.config}] {r.dtype} {r.target}: "
              f"{r.error or f'shared {r.shared} B over limit'}"
              for r in matrix_results if not r.fits]
    assert not failed, "\n".join(failed)


def test_compiled_kernels_report_resources(matrix_results):
    for r in matrix_results:
        assert r.n_regs is not None and r.n_regs > 0, r
        assert r.n_spills is not None and r.shared is not None, r


def test_half_precision_attention_uses_matrix_cores_without_spilling(matrix_results):
    """In bf16 and fp16, tl.dot must lower to mma/wgmma (NVIDIA) or mfma/wmma (AMD), and the
    chosen block configurations must fit the register file: a spill here means a config to
    retune. (fp32, the "where cheap" dtype, runs its dots on FMA units and may spill.)"""
    half = [r for r in matrix_results if r.dtype in ("bf16", "fp16")]
    attention = [r for r in half if r.kernel in ("paged_decode_kernel", "paged_prefill_kernel")]
    assert attention
    assert all(r.matrix_ops for r in attention), [(r.kernel, r.target) for r in attention if not r.matrix_ops]
    spilling = [(r.kernel, r.config, r.dtype, r.target, r.n_spills) for r in half if r.n_spills]
    assert not spilling, spilling
