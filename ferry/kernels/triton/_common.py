"""Helpers shared by the Triton kernels: launching, block-size arithmetic, AOT variants.

Kernels run compiled on CUDA/ROCm tensors. On a machine without a GPU they can run on CPU
tensors through Triton's interpreter, which Triton only enables when ``TRITON_INTERPRET=1``
is set before ``triton`` is first imported (``tl.sum`` and friends are themselves
``@triton.jit`` functions, fixed at import). A process is therefore either interpreting or
compiling: the tests set the variable, ahead-of-time compilation runs without it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

# Head dims the AOT matrix compiles for. The kernels accept any even head dim up to 256;
# the block configurations depend on the head dim only through these three classes
# (below 128, 128, above 128: see attention_configs.py), so the matrix covers them all.
AOT_HEAD_DIMS = (64, 128, 256)
# KV-cache page size the AOT matrix compiles for (the engine's default block_size).
AOT_PAGE_SIZE = 16
# Element types of the activations the kernels take (Triton's names).
AOT_DTYPES = ("bf16", "fp16", "fp32")

_TRITON_DTYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def next_power_of_2(n: int) -> int:
    """Smallest power of two >= n (1 for n <= 1)."""
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def triton_dtype(dtype: torch.dtype) -> str:
    """Triton's name of a supported activation dtype; ValueError for others."""
    if dtype not in _TRITON_DTYPES:
        raise ValueError(f"Triton kernels support bfloat16, float16 and float32 tensors, got {dtype}")
    return _TRITON_DTYPES[dtype]


def check_same_device(*tensors: torch.Tensor) -> None:
    devices = {t.device for t in tensors}
    if len(devices) > 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devices))}")


def last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    """x itself when its last dim has stride 1 (kernels index rows by stride), else a copy."""
    return x if x.stride(-1) == 1 else x.contiguous()


def interpreter_active() -> bool:
    """True when Triton runs kernels through its CPU interpreter (TRITON_INTERPRET=1)."""
    import triton.language.standard as standard
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(standard.sum, InterpretedFunction)


def interpreting_bf16(x: torch.Tensor) -> bool:
    """bf16 on the CPU interpreter, whose ``tl.dot`` multiplies bf16 bit patterns as integers."""
    return x.dtype == torch.bfloat16 and x.device.type == "cpu"


def launch(kernel: Any, grid: tuple[int, ...], *args: Any, **meta: Any) -> None:
    """Run ``kernel[grid](*args, **meta)`` after checking the tensors can reach it."""
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    on_cpu = any(t.device.type == "cpu" for t in tensors)
    if on_cpu and not interpreter_active():
        raise ValueError("Triton kernels need CUDA/ROCm tensors; CPU tensors only work through "
                         "Triton's interpreter (set TRITON_INTERPRET=1 before importing triton), "
                         "otherwise use ferry.kernels.reference on the CPU")
    kernel[grid](*args, **meta)


@dataclass(frozen=True)
class KernelVariant:
    """One compilation of a kernel: what the dispatcher may launch, for the AOT matrix.

    ``types`` gives the Triton type of each runtime argument ("*bf16", "i32", "fp32");
    arguments named ``stride_*`` default to "i32". Pointers and ``stride_*`` arguments are
    compiled as multiples of 16, as the JIT specialises them at usual shapes, except those
    in ``unaligned``. ``config`` labels the block configuration in reports.
    """

    kernel: Any
    types: dict[str, str]
    constexprs: dict[str, Any]
    num_warps: int = 4
    num_stages: int = 2
    config: str = ""
    dtype: str = ""
    unaligned: tuple[str, ...] = ()
    head_dim: int | None = None       # for kernels compiled per head dim
    name: str = field(default="")

    @property
    def kernel_name(self) -> str:
        return self.name or getattr(self.kernel, "__name__", "kernel")

    def aligned_args(self, arg_names: Sequence[str]) -> list[int]:
        """Indices of the arguments to hint as divisible by 16."""
        signature = self.signature(arg_names)
        return [i for i, name in enumerate(arg_names) if name not in self.unaligned
                and (signature[name].startswith("*") or name.startswith("stride_"))]

    def signature(self, arg_names: Sequence[str]) -> dict[str, str]:
        """Triton signature over all kernel arguments (constexprs included, as 'constexpr')."""
        signature = {}
        for name in arg_names:
            if name in self.constexprs:
                signature[name] = "constexpr"
            elif name in self.types:
                signature[name] = self.types[name]
            elif name.startswith("stride_"):
                signature[name] = "i32"
            else:
                raise ValueError(f"{self.kernel_name}: no type given for argument {name!r}")
        return signature


VariantFactory = Callable[[str], list[KernelVariant]]
