"""Triton RMSNorm, fused add + RMSNorm, rotary and SwiGLU against plain PyTorch formulas.

Runs through Triton's interpreter on CPU tensors without a GPU (TRITON_INTERPRET=1,
set by tests/conftest.py before triton is first imported), compiled on "cuda" with one.
"""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from triton_devices import DEVICES  # noqa: E402
from ferry.kernels.triton import apply_rotary, fused_add_rms_norm, rms_norm, silu_and_mul  # noqa: E402

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# One rounding step of the dtype (the interpreter truncates where GPUs round to nearest).
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def rand(*shape, dtype=torch.float32, device="cpu", seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype).to(device)


def check(actual, expected, dtype):
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(actual.cpu().float(), expected.cpu().float(), atol=tol, rtol=tol)


def naive_rms_norm(x, weight, eps):
    """HF Llama's RMSNorm: normalise in fp32, round to x's dtype, then scale by the weight."""
    x32 = x.float()
    normed = x32 / torch.sqrt((x32 * x32).mean(-1, keepdim=True) + eps)
    return weight * normed.to(x.dtype)


# 100: one partial block; 1024: a full block; 9000: wider than the largest block (two passes)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 100), (2, 1024), (2, 9000), (2, 3, 48)])
def test_rms_norm(device, dtype, shape):
    x, weight = rand(*shape, dtype=dtype, device=device), rand(shape[-1], dtype=dtype, device=device, seed=1)
    check(rms_norm(x, weight, 1e-6), naive_rms_norm(x, weight, 1e-6), dtype)


@pytest.mark.parametrize("device", DEVICES)
def test_rms_norm_promotes_like_torch(device):
    """A float32 weight on bf16 activations gives float32 out, as ``weight * normed`` does."""
    x, weight = rand(4, 64, dtype=torch.bfloat16, device=device), rand(64, device=device, seed=1)
    check(rms_norm(x, weight, 1e-5), naive_rms_norm(x, weight, 1e-5), torch.bfloat16)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 100), (2, 9000)])
def test_fused_add_rms_norm(device, dtype, shape):
    x, residual = rand(*shape, dtype=dtype, device=device), rand(*shape, dtype=dtype, device=device, seed=2)
    weight = rand(shape[-1], dtype=dtype, device=device, seed=3)
    normed, summed = fused_add_rms_norm(x, residual, weight, 1e-6)
    expected_sum = (x.float() + residual.float()).to(dtype)
    check(summed, expected_sum, dtype)
    check(normed, naive_rms_norm(expected_sum, weight, 1e-6), dtype)
    assert summed.data_ptr() not in (x.data_ptr(), residual.data_ptr())   # new tensors


def naive_rotary(x, positions, cos_sin_cache):
    """Neox rotary: (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin) in float32."""
    half = x.shape[-1] // 2
    cos = cos_sin_cache[positions, :half].float()[:, None, :]     # (T, 1, D/2)
    sin = cos_sin_cache[positions, half:].float()[:, None, :]
    x1, x2 = x.float()[..., :half], x.float()[..., half:]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), -1).to(x.dtype)


def rope_cache(max_pos, head_dim, device):
    inv_freq = 1.0 / 10000 ** (torch.arange(0, head_dim, 2).float() / head_dim)
    angles = torch.arange(max_pos).float()[:, None] * inv_freq[None, :]      # (P, D/2)
    return torch.cat((angles.cos(), angles.sin()), -1).to(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [32, 20])          # 20: half of 10, not a power of two
def test_apply_rotary(device, dtype, head_dim):
    cache = rope_cache(64, head_dim, device)
    positions = torch.tensor([0, 5, 63, 17, 17], device=device)
    query = rand(5, 6, head_dim, dtype=dtype, device=device)                # 6 heads: two programs
    key = rand(5, 2, head_dim, dtype=dtype, device=device, seed=1)
    q_out, k_out = apply_rotary(query, key, positions, cache)
    check(q_out, naive_rotary(query, positions, cache), dtype)
    check(k_out, naive_rotary(key, positions, cache), dtype)
    assert q_out.data_ptr() != query.data_ptr()


@pytest.mark.parametrize("device", DEVICES)
def test_apply_rotary_on_strided_views(device):
    """q and k as views of one fused projection, as the attention layer has them."""
    qkv = rand(3, (4 + 2 + 2) * 16, device=device)
    query, key = qkv[:, :64].view(3, 4, 16), qkv[:, 64:96].view(3, 2, 16)
    cache, positions = rope_cache(8, 16, device), torch.tensor([1, 2, 7], device=device)
    q_out, k_out = apply_rotary(query, key, positions, cache)
    check(q_out, naive_rotary(query, positions, cache), torch.float32)
    check(k_out, naive_rotary(key, positions, cache), torch.float32)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 2 * 5), (2, 2 * 300), (2, 3, 2 * 64)])
def test_silu_and_mul(device, dtype, shape):
    x = rand(*shape, dtype=dtype, device=device)
    inter = shape[-1] // 2
    expected = torch.nn.functional.silu(x[..., :inter].float()).to(dtype) * x[..., inter:]
    check(silu_and_mul(x), expected, dtype)


@pytest.mark.parametrize("device", DEVICES)
def test_invalid_arguments_raise_value_error(device):
    x = rand(2, 8, device=device)
    with pytest.raises(ValueError, match="weight"):
        rms_norm(x, rand(7, device=device), 1e-6)
    with pytest.raises(ValueError, match="residual"):
        fused_add_rms_norm(x, rand(2, 4, device=device), rand(8, device=device), 1e-6)
    with pytest.raises(ValueError, match="even"):
        silu_and_mul(rand(2, 7, device=device))
    with pytest.raises(ValueError, match="cos_sin_cache"):
        apply_rotary(rand(2, 2, 8, device=device), rand(2, 1, 8, device=device),
                     torch.tensor([0, 1], device=device), rope_cache(4, 6, device))
