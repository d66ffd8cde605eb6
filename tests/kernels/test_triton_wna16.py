"""Triton w4a16 / w8a16 dequant-GEMM against the PyTorch reference (quant_reference).

Through Triton's interpreter on CPU tensors without a GPU (TRITON_INTERPRET=1, set by
tests/conftest.py), compiled on "cuda" with one. Small shapes: the interpreter is slow.
"""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from triton_devices import DEVICES  # noqa: E402
from ferry.kernels import quant_reference as ref  # noqa: E402
from ferry.kernels.triton import wna16 as triton_wna16  # noqa: E402


def _case(t, k, n, bits, group_size, symmetric, dtype, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q, s, z = ref.quantize_rtn(torch.randn(n, k, generator=gen).to(dtype), bits, group_size, symmetric)
    x = torch.randn(t, k, generator=gen).to(dtype)
    bias = torch.randn(n, generator=gen).to(dtype)
    return [a.to(device) for a in (x, q, s, z, bias)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group_size,k", [(32, 64), (64, 128), (128, 128), (96, 96)])
@pytest.mark.parametrize("symmetric", [True, False])
def test_fused_kernel_matches_reference(device, bits, group_size, k, symmetric):
    # 3 tokens (a decode batch, partial M tile), 72 outputs (partial N tile)
    x, q, s, z, bias = _case(3, k, 72, bits, group_size, symmetric, torch.float32, device)
    for b in (None, bias):
        out = triton_wna16.wna16_linear(x, q, s, z, bits, group_size, b)
        expected = ref.wna16_linear(x.cpu(), q.cpu(), s.cpu(), z.cpu(), bits, group_size,
                                    None if b is None else b.cpu())
        torch.testing.assert_close(out.cpu(), expected, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("tokens", [1, 17, 64, 65])    # M tiles 16/32/64, then dequant + GEMM
def test_token_counts_pick_their_tile_or_the_prefill_path(device, tokens):
    x, q, s, z, _ = _case(tokens, 64, 40, 4, 32, False, torch.float32, device, seed=tokens)
    torch.testing.assert_close(triton_wna16.wna16_linear(x, q, s, z, 4, 32).cpu(),
                               ref.wna16_linear(x.cpu(), q.cpu(), s.cpu(), z.cpu(), 4, 32),
                               rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("device", DEVICES)
def test_float16(device):
    x, q, s, z, bias = _case(4, 128, 64, 4, 128, True, torch.float16, device)
    out = triton_wna16.wna16_linear(x, q, s, z, 4, 128, bias)
    expected = ref.wna16_linear(x.cpu().float(), q.cpu(), s.cpu().float(), z.cpu().float(), 4,
                                128, bias.cpu().float())
    assert out.dtype == torch.float16
    torch.testing.assert_close(out.cpu().float(), expected, rtol=1e-2, atol=5e-2)


def test_block_k_divides_the_group():
    assert triton_wna16.block_k_for(128) == 32 and triton_wna16.block_k_for(96) == 32
    assert triton_wna16.block_k_for(24) is None and triton_wna16.block_k_for(48) == 16
