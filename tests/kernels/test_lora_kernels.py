"""The segmented LoRA shrink/expand: reference, C++ and Triton (interpreted) against a naive loop.

Each backend gets the same mixed batch (base-model tokens between adapters, one slot used
by two requests, a segment longer than a kernel block) on sliced slot stacks (the rank the
step reads is below the stack's, the output is a column slice of a merged projection).
"""
from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")   # before the first `import triton`

from ferry.kernels import lora_reference
from lora_cases import make_mapping, naive_delta

SLOTS, MAX_RANK, IN, OUT_TOTAL = 4, 16, 48, 1100   # > 2 column blocks of the C++ expand


def _backends():
    backends = [("reference", lora_reference)]
    from ferry.kernels.cpu import build
    if build.find_compiler() is not None:
        from ferry.kernels import cpu
        backends.append(("cpu", cpu))
    try:
        import ferry.kernels.triton as triton_ops
        from ferry.kernels.triton._common import interpreter_active
        if torch.cuda.is_available() or interpreter_active():
            backends.append(("triton", triton_ops))
    except ImportError:
        pass
    return backends


def _case(dtype, device):
    gen = torch.Generator().manual_seed(0)
    mapping = make_mapping(device=device)
    x = torch.randn(mapping.num_tokens, IN, generator=gen).to(dtype)
    a_stack = (torch.randn(SLOTS, MAX_RANK, IN, generator=gen) * 0.2).to(dtype)
    b_stack = (torch.randn(SLOTS, MAX_RANK, OUT_TOTAL, generator=gen) * 0.2).to(dtype)
    y = torch.randn(mapping.num_tokens, OUT_TOTAL, generator=gen).to(dtype)
    return [t.to(device) for t in (x, a_stack, b_stack, y)] + [mapping]


@pytest.mark.parametrize("name,ops", _backends(), ids=[n for n, _ in _backends()])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_shrink_expand_match_naive(name, ops, dtype):
    device = "cuda" if name == "triton" and torch.cuda.is_available() else "cpu"
    x, a_stack, b_stack, y, mapping = _case(dtype, device)
    rank, cols = 8, slice(24, 1090)                     # sliced rank, one sub-projection's columns
    a, b = a_stack[:, :rank, :], b_stack[:, :rank, cols]
    v = ops.lora_shrink(x, a, mapping)
    assert v.dtype == torch.float32 and v.shape == (mapping.num_tokens, rank)
    base = y.clone()
    ops.lora_expand(v, b, y[:, cols], mapping)
    want = naive_delta(x.cpu(), a.cpu(), b.cpu(), mapping.__class__(
        mapping.token_slots.cpu(), mapping.segments, mapping.segment_table.cpu(),
        mapping.max_rank, mapping.max_segment_len))
    got = (y[:, cols].double() - base[:, cols].double()).cpu()
    tol = 1e-4 if dtype == torch.float32 else 6e-2
    torch.testing.assert_close(got, want, atol=tol, rtol=tol)
    # columns outside the slice and base-model rows are untouched
    assert torch.equal(y[:, :24], base[:, :24]) and torch.equal(y[:, 1090:], base[:, 1090:])
    base_rows = (mapping.token_slots < 0).nonzero().flatten()
    assert torch.equal(y[base_rows], base[base_rows])


@pytest.mark.parametrize("name,ops", _backends(), ids=[n for n, _ in _backends()])
def test_no_segments_is_a_no_op(name, ops):
    device = "cuda" if name == "triton" and torch.cuda.is_available() else "cpu"
    mapping = make_mapping([(3, -1), (2, -1)], device=device)
    x = torch.randn(5, IN, device=device)
    a, b = torch.randn(SLOTS, 8, IN, device=device), torch.randn(SLOTS, 8, OUT_TOTAL, device=device)
    y = torch.randn(5, OUT_TOTAL, device=device)
    base = y.clone()
    ops.lora_expand(ops.lora_shrink(x, a, mapping), b, y, mapping)
    assert torch.equal(y, base)
