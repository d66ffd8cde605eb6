"""The single dispatch point for compute kernels.

Layers call ops through this module (``from ferry import kernels; kernels.rms_norm(...)``),
never a backend directly, so the backend is chosen in one place.

Ops (signatures and semantics are defined by ``ferry.kernels.reference``):
``write_kv_cache``, ``paged_attention``, ``rms_norm``, ``fused_add_rms_norm``,
``apply_rotary``, ``silu_and_mul``.
"""
from __future__ import annotations

from ferry.kernels.reference import (
    apply_rotary,
    fused_add_rms_norm,
    paged_attention,
    rms_norm,
    silu_and_mul,
    write_kv_cache,
)

# --- Backend selection ------------------------------------------------------------------
# TODO(triton): select the Triton twins (``ferry/kernels/triton/``, same names and
# signatures) here from the platform's capabilities, i.e. when
# ``ferry.platform.detect_platform().use_triton_kernels`` is true, e.g.
#
#     if platform.use_triton_kernels:
#         from ferry.kernels.triton import paged_attention, write_kv_cache, ...
#
# keeping these reference versions as the CPU path (and for CPU tensors). Nothing else in
# ferry should import a backend directly.
# -----------------------------------------------------------------------------------------

__all__ = [
    "apply_rotary",
    "fused_add_rms_norm",
    "paged_attention",
    "rms_norm",
    "silu_and_mul",
    "write_kv_cache",
]
