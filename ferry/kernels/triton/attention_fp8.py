"""The attention kernels over an FP8 (e4m3) KV cache, for the AOT matrix.

The decode and prefill kernels (and the debug trace's, ``attention_trace.py``) read an fp8 cache as they read any cache of another
dtype than the query: cast on load to the dot dtype (the layer folds k_scale into the
softmax scale and v_scale into the output, ``ferry.layers.attention``). This lists the
compilations with an fp8 cache pointer so the matrix proves they build on every target.
"""
from __future__ import annotations

import dataclasses

from ferry.kernels.triton._common import KernelVariant

FP8_AOT_HEAD_DIM = 128   # one head dim per kernel: the cast on load does not depend on it
# Targets with Triton's fp8e4nv (float8_e4m3fn): Hopper and MI300. sm_80 (A100), gfx90a
# (MI250) and gfx1100 have no such type ("fp8e4nv not supported in this architecture"):
# there the engine refuses kv_cache_dtype fp8 at start (ferry/runner/kv_dtype.py).
FP8_KV_TARGETS = ("sm_90", "gfx942")


def fp8_cache_variants(variants: list[KernelVariant], dtype: str, arch: str,
                       cache_pointer: str = "kv_cache_ptr") -> list[KernelVariant]:
    """Copies of the 16-bit variants at FP8_AOT_HEAD_DIM with an fp8 cache (the argument
    named ``cache_pointer``)."""
    if dtype == "fp32" or arch not in FP8_KV_TARGETS:
        return []
    return [dataclasses.replace(v, types={**v.types, cache_pointer: "*fp8e4nv"},
                                config=f"{v.config} kv=fp8")
            for v in variants if v.head_dim == FP8_AOT_HEAD_DIM]
