"""Ahead-of-time compilation of ferry's Triton kernels for GPUs this machine does not have.

``triton.compile`` with an explicit ``GPUTarget`` needs no GPU: it runs the whole compiler
(TTIR -> TTGIR -> LLVM -> PTX/cubin via ptxas, or AMDGCN/hsaco via LLVM). That proves each
kernel and block configuration compiles for NVIDIA sm_80/sm_90 and AMD gfx90a/gfx942/
gfx1100, and reports registers, spills and shared memory per configuration.

Triton API differences handled here:

* ``ASTSource(fn, signature, constexprs=, attrs=)`` in Triton 3.6 and 3.9 (both checked):
  the signature names every argument, constexprs included (typed ``"constexpr"``), and
  ``attrs`` is ``{(arg_index,): [["tt.divisibility", 16]]}``. Older releases named the
  keyword ``constants=`` and took other attrs; that form is passed through untested.
* ``CompiledKernel.metadata`` has ``shared`` but no register counts before a GPU loads the
  binary: registers and spills are read from the binary (``cuobjdump`` for cubin, the
  AMDGCN assembly's metadata for hsaco).

Compilation cannot run in a process where ``TRITON_INTERPRET=1`` was set before Triton was
imported (the language's own helpers are then interpreter functions): use
:func:`compile_matrix_in_subprocess` from such processes (the kernel tests).
"""
from __future__ import annotations

import importlib
import inspect
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from typing import Any, Iterable

# name -> (backend, arch, warp size)
TARGETS: dict[str, tuple[str, int | str, int]] = {
    "sm_80": ("cuda", 80, 32),        # A100
    "sm_90": ("cuda", 90, 32),        # H100 / H200
    "gfx942": ("hip", "gfx942", 64),  # MI300X
    "gfx90a": ("hip", "gfx90a", 64),  # MI250X
    "gfx1100": ("hip", "gfx1100", 32),  # RDNA3 (Radeon 7900)
}
# Shared memory (LDS) one workgroup may use, in bytes.
SHARED_LIMITS = {"sm_80": 166912, "sm_90": 232448, "gfx942": 65536, "gfx90a": 65536, "gfx1100": 65536}


@dataclass
class CompileResult:
    """One kernel variant compiled for one target."""

    kernel: str
    config: str
    dtype: str
    target: str
    compiled: bool
    n_regs: int | None = None
    n_spills: int | None = None
    shared: int | None = None
    matrix_ops: int | None = None     # tensor/matrix-core instructions (mma, wgmma, mfma, wmma)
    seconds: float = 0.0
    error: str = ""

    @property
    def fits(self) -> bool:
        """Compiled and within the target's shared-memory limit."""
        return self.compiled and (self.shared or 0) <= SHARED_LIMITS[self.target]


def all_variants(target: str, dtypes: Iterable[str] | None = None) -> list[Any]:
    """Every (kernel, dtype, block configuration) the dispatcher can launch on ``target``."""
    from ferry.kernels.triton._common import AOT_DTYPES

    # By module path: the package re-exports functions under the same names as the modules.
    modules = {name: importlib.import_module(f"ferry.kernels.triton.{name}") for name in (
        "write_kv_cache", "paged_decode", "paged_prefill", "rms_norm", "fused_add_rms_norm",
        "rotary", "silu_and_mul", "wna16", "lora", "attention_trace")}
    factories = [modules["write_kv_cache"].aot_variants, modules["paged_decode"].aot_variants,
                 modules["paged_decode"].aot_reduce_variants, modules["paged_prefill"].aot_variants,
                 modules["rms_norm"].aot_variants, modules["fused_add_rms_norm"].aot_variants,
                 modules["rotary"].aot_variants, modules["silu_and_mul"].aot_variants,
                 modules["wna16"].aot_variants, modules["lora"].aot_variants,
                 modules["attention_trace"].aot_variants]
    return [v for dtype in (dtypes or AOT_DTYPES) for factory in factories
            for v in factory(dtype, target)]


def gpu_target(name: str) -> Any:
    from triton.backends.compiler import GPUTarget

    if name not in TARGETS:
        raise ValueError(f"unknown target {name!r}: choose from {', '.join(TARGETS)}")
    return GPUTarget(*TARGETS[name])


def as_jit_function(kernel: Any) -> Any:
    """The compilable ``JITFunction`` of a kernel; RuntimeError when Triton is interpreting."""
    from triton.runtime.jit import JITFunction

    if isinstance(kernel, JITFunction):
        return kernel
    raise RuntimeError(f"{getattr(kernel, '__name__', kernel)} is not a compilable JITFunction: "
                       "TRITON_INTERPRET=1 was set before triton was imported; compile in a "
                       "subprocess without it (compile_matrix_in_subprocess)")


def ast_source(fn: Any, signature: dict[str, str], constexprs: dict[str, Any],
               divisible_by_16: Iterable[int] = ()) -> Any:
    """``ASTSource`` for this Triton version.

    ``divisible_by_16``: indices of arguments to hint as multiples of 16, as the JIT does for
    aligned pointers and strides; without the hints loads are not vectorised and register
    counts are not those of a real launch.
    """
    from triton.compiler import ASTSource

    params = inspect.signature(ASTSource.__init__).parameters
    attrs = {(i,): [["tt.divisibility", 16]] for i in divisible_by_16}
    if "constexprs" in params:
        return ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    if "constants" in params:   # older Triton (untested): attrs had another format
        return ASTSource(fn=fn, signature=signature, constants=constexprs)
    raise RuntimeError(f"unsupported triton.compiler.ASTSource signature: {list(params)}")


def compile_variant(variant: Any, target_name: str) -> CompileResult:
    """Compile one variant for one target; failures are returned, not raised."""
    import triton

    result = CompileResult(variant.kernel_name, variant.config, variant.dtype, target_name, False)
    started = time.perf_counter()
    try:
        fn = as_jit_function(variant.kernel)
        source = ast_source(fn, variant.signature(fn.arg_names), variant.constexprs,
                            variant.aligned_args(fn.arg_names))
        compiled = triton.compile(source, target=gpu_target(target_name),
                                  options={"num_warps": variant.num_warps,
                                           "num_stages": variant.num_stages})
        result.n_regs, result.n_spills = _registers_and_spills(compiled, target_name)
        result.shared = int(compiled.metadata.shared)
        result.matrix_ops = _count_matrix_ops(compiled)
        result.compiled = True
    except Exception as exc:  # noqa: BLE001 - the report records why a variant failed
        result.error = f"{type(exc).__name__}: {exc}".strip()[:2000]
    result.seconds = time.perf_counter() - started
    return result


def select_variants(target: str, dtypes: Iterable[str] | None = None,
                    kernels: Iterable[str] | None = None) -> list[Any]:
    """Variants for one target, optionally only some kernels."""
    wanted = set(kernels) if kernels else None
    return [v for v in all_variants(target, dtypes) if wanted is None or v.kernel_name in wanted]


def compile_matrix(targets: Iterable[str] | None = None, dtypes: Iterable[str] | None = None,
                   kernels: Iterable[str] | None = None) -> list[CompileResult]:
    """Compile the selected variants for every target (all of :data:`TARGETS` by default)."""
    return [compile_variant(variant, target) for target in (targets or TARGETS)
            for variant in select_variants(target, dtypes, kernels)]


def compile_matrix_in_subprocess(targets: Iterable[str] | None = None,
                                 dtypes: Iterable[str] | None = None,
                                 kernels: Iterable[str] | None = None,
                                 fresh_cache: bool = True,
                                 timeout: float = 3600) -> list[CompileResult]:
    """:func:`compile_matrix` in a fresh Python without ``TRITON_INTERPRET``.

    ``fresh_cache`` compiles into an empty Triton cache, so nothing passes on a result
    cached by an earlier run.
    """
    request = {"targets": list(targets or []), "dtypes": list(dtypes or []),
               "kernels": list(kernels or [])}
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    with tempfile.TemporaryDirectory() as tmp:
        if fresh_cache:
            env["TRITON_CACHE_DIR"] = os.path.join(tmp, "triton-cache")
        out_path = os.path.join(tmp, "results.json")
        cmd = [sys.executable, "-m", "ferry.tools.aot", json.dumps(request), out_path]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"AOT compile subprocess failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
        with open(out_path) as handle:
            return [CompileResult(**row) for row in json.load(handle)]


def _registers_and_spills(compiled: Any, target_name: str) -> tuple[int | None, int | None]:
    if TARGETS[target_name][0] == "cuda":
        return _cubin_registers_and_spills(compiled.asm["cubin"])
    return _amdgcn_registers_and_spills(compiled.asm["amdgcn"])


def _count_matrix_ops(compiled: Any) -> int:
    """Matrix instructions in the assembly: proves tl.dot reached the tensor/matrix cores."""
    asm = compiled.asm.get("ptx") or compiled.asm.get("amdgcn") or ""
    return len(re.findall(r"\bmma\.sync|\bwgmma\.mma_async|\bv_mfma_|\bv_wmma_", asm))


def _cubin_registers_and_spills(cubin: bytes) -> tuple[int | None, int | None]:
    """Registers and spilled 32-bit words from ``cuobjdump --dump-resource-usage``.

    Spills are the per-thread stack frame plus local memory, in 4-byte words (Triton's
    ``n_spills`` counts local bytes / 4); the kernels use no local arrays or calls.
    """
    with tempfile.NamedTemporaryFile(suffix=".cubin") as handle:
        handle.write(cubin)
        handle.flush()
        proc = subprocess.run([_cuobjdump_path(), "--dump-resource-usage", handle.name],
                              capture_output=True, text=True, check=False)
    fields = dict(re.findall(r"\b(REG|STACK|LOCAL):(\d+)", proc.stdout))
    if "REG" not in fields:
        return None, None
    return int(fields["REG"]), (int(fields.get("STACK", 0)) + int(fields.get("LOCAL", 0))) // 4


def _cuobjdump_path() -> str:
    from triton import knobs

    tool = getattr(getattr(knobs, "nvidia", None), "cuobjdump", None)
    path = getattr(tool, "path", None)
    if path:
        return path
    import triton.backends.nvidia as nvidia
    return os.path.join(os.path.dirname(nvidia.__file__), "bin", "cuobjdump")


def _amdgcn_registers_and_spills(asm: str) -> tuple[int | None, int | None]:
    """VGPRs (the occupancy limit) and VGPRs spilled to scratch memory.

    SGPR spills are left out: they go to VGPR lanes, not memory.
    """
    def field(name: str) -> int | None:
        found = re.search(rf"\.{name}:\s+(\d+)", asm)
        return int(found.group(1)) if found else None

    return field("vgpr_count"), field("vgpr_spill_count")


def _main(argv: list[str]) -> int:
    request, out_path = json.loads(argv[0]), argv[1]
    results = compile_matrix(request.get("targets") or None, request.get("dtypes") or None,
                             request.get("kernels") or None)
    with open(out_path, "w") as handle:
        json.dump([asdict(r) for r in results], handle)
    return 0


if __name__ == "__main__":
    raise SystemExit(_main(sys.argv[1:]))
