"""Weight-only int8/int4 linears: the canonical layout, RTN, and the C++ kernel (both its
AVX-512 and portable paths) against the PyTorch reference (ferry/kernels/quant_reference.py).

The reference itself is checked against a naive per-element dequantization written from
the layout's definition, so the kernels are not only compared with each other.
"""
from __future__ import annotations

import pytest
import torch

import ferry.kernels
from ferry.kernels import quant_linear, quant_reference as ref
from ferry.kernels.cpu import build
from ferry.kernels.cpu import quant_linear as cpu_quant


def _naive_weight(qweight, scales, zeros, bits, group_size):
    """w[n, k] from the layout's definition, one element at a time (float64)."""
    n = qweight.shape[0]
    k = qweight.shape[1] * (2 if bits == 4 else 1)
    w = torch.empty(n, k, dtype=torch.float64)
    for row in range(n):
        for col in range(k):
            byte = int(qweight[row, col // 2 if bits == 4 else col])
            code = (byte >> 4 if col % 2 else byte & 15) if bits == 4 else byte
            g = col // group_size
            w[row, col] = (code - float(zeros[row, g])) * float(scales[row, g])
    return w


def _case(n, k, bits, group_size, symmetric, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(n, k, generator=gen).to(dtype)
    return ref.quantize_rtn(weight, bits, group_size, symmetric), weight


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
def test_reference_dequantizes_by_the_layout_definition(bits, symmetric):
    (q, s, z), _ = _case(5, 64, bits, 16, symmetric)
    expected = _naive_weight(q, s, z, bits, 16)
    torch.testing.assert_close(ref.dequantize_wna16(q, s, z, bits, 16).double(), expected)


def test_int4_nibble_order_low_is_even_k():
    codes = torch.tensor([[1, 2, 3, 15]], dtype=torch.uint8)
    packed = ref.pack_int4(codes)
    assert packed.tolist() == [[0x21, 0xF3]]
    assert torch.equal(ref.unpack_int4(packed), codes)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
def test_rtn_error_is_within_half_a_step(bits, symmetric):
    (q, s, z), weight = _case(16, 256, bits, 64, symmetric)
    w = ref.dequantize_wna16(q, s, z, bits, 64)
    step = s.repeat_interleave(64, dim=1)
    assert ((w - weight).abs() <= step * 0.5 + 1e-6).all()
    if symmetric:
        assert (z == 2 ** (bits - 1)).all()


def test_bad_layouts_are_refused_clearly():
    (q, s, z), _ = _case(8, 64, 4, 32, True)
    x = torch.randn(2, 64)
    with pytest.raises(ValueError, match="bits must be 4 or 8"):
        ref.wna16_linear(x, q, s, z, 3, 32)
    with pytest.raises(ValueError, match="group_size 48 must divide K=64"):
        ref.wna16_linear(x, q, s, z, 4, 48)
    with pytest.raises(ValueError, match="qweight is"):
        ref.wna16_linear(x, q, s, z, 8, 32)
    with pytest.raises(ValueError, match="scales is"):
        ref.wna16_linear(x, q, s[:, :1], z, 4, 32)


# ------------------------------------------------------------------------ the C++ kernel
needs_cpp = pytest.mark.skipif(build.find_compiler() is None, reason="no C++ compiler")

SHAPES = [(1, 64, 32), (3, 128, 96), (5, 256, 40), (17, 512, 130), (33, 256, 64), (64, 128, 20)]


@needs_cpp
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group_size", [32, 64, 128, 0])   # 0: per channel (group = K)
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("simd", [True, False])
def test_cpp_kernel_matches_reference(bits, group_size, symmetric, simd):
    if simd and not cpu_quant.has_simd():
        pytest.skip("built without AVX-512")
    for t, k, n in SHAPES:
        gs = group_size or k
        if k % gs:
            continue
        (q, s, z), _ = _case(n, k, bits, gs, symmetric, seed=t)
        x = torch.randn(t, k, generator=torch.Generator().manual_seed(k))
        bias = torch.randn(n)
        expected = ref.wna16_linear(x, q, s, z, bits, gs, bias)
        out = cpu_quant.wna16_linear(x, q, s, z, bits, gs, bias, allow_simd=simd)
        # the kernel sums raw codes and subtracts zero * sum(x): float32 rounding, not layout
        torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-3)


@needs_cpp
@pytest.mark.parametrize("bits", [4, 8])
def test_cpp_kernel_odd_group_sizes_take_the_portable_path(bits):
    (q, s, z), _ = _case(24, 96, bits, 24, False)    # 24 is not a multiple of 32
    x = torch.randn(3, 96)
    torch.testing.assert_close(cpu_quant.wna16_linear(x, q, s, z, bits, 24),
                               ref.wna16_linear(x, q, s, z, bits, 24), rtol=1e-4, atol=1e-4)


@needs_cpp
@pytest.mark.parametrize("bits", [4, 8])
def test_cpp_kernel_bfloat16(bits):
    (q, s, z), _ = _case(64, 256, bits, 64, True, dtype=torch.bfloat16)
    x = torch.randn(4, 256).bfloat16()
    out = cpu_quant.wna16_linear(x, q, s, z, bits, 64)
    expected = ref.wna16_linear(x.float(), q, s.float(), z.float(), bits, 64)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), expected, rtol=2e-2, atol=5e-2)
    # the dequantize-then-GEMM path (long prefills) rounds like the reference
    torch.testing.assert_close(cpu_quant.dequantize(q, s, z, bits, 64),
                               ref.dequantize_wna16(q, s, z, bits, 64))


@needs_cpp
def test_non_contiguous_input_rows():
    (q, s, z), _ = _case(32, 64, 4, 32, True)
    x = torch.randn(6, 128)[:, :64]     # row stride 128
    torch.testing.assert_close(cpu_quant.wna16_linear(x, q, s, z, 4, 32),
                               ref.wna16_linear(x.contiguous(), q, s, z, 4, 32), rtol=1e-4, atol=1e-4)


@needs_cpp
@pytest.mark.skipif(not build.enabled(), reason="C++ kernels switched off (FERRY_CPU_KERNELS=0): "
                                               "the dispatch rightly picks the reference")
def test_dispatch_and_prepared_weights_use_the_cpu_kernel(monkeypatch):
    (q, s, z), _ = _case(48, 128, 8, 64, False)
    x = torch.randn(2, 128)
    prepared = quant_linear.prepare_wna16(q, s, z, 8, 64, "cpu")
    assert prepared.nbytes == 48 * 128 + 2 * 48 * 2 * 4
    calls = []
    real = cpu_quant.wna16_linear
    monkeypatch.setattr(ferry.kernels.cpu, "wna16_linear",
                        lambda *a: calls.append(1) or real(*a))
    ferry.kernels._ops_by_device_type.pop("cpu", None)
    expected = ref.wna16_linear(x, q, s, z, 8, 64)
    torch.testing.assert_close(quant_linear.wna16_apply(x, prepared), expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(quant_linear.wna16_linear(x, q, s, z, 8, 64), expected,
                               rtol=1e-4, atol=1e-4)
    assert len(calls) == 2


@pytest.mark.parametrize("per_channel", [False, True])
def test_fp8_linear_dequantize_fallback(per_channel):
    """Off FP8 hardware: the float8 weight times its scale (per tensor or per output)."""
    gen = torch.Generator().manual_seed(5)
    weight = torch.randn(24, 32, generator=gen)
    scale = weight.abs().amax(dim=1) / 448 if per_channel else weight.abs().amax() / 448
    w8 = ref.quantize_fp8(weight, scale[:, None] if per_channel else scale)
    x, bias = torch.randn(3, 32, generator=gen), torch.randn(24, generator=gen)
    expected = x @ (w8.float() * (scale[:, None] if per_channel else scale)).t() + bias
    torch.testing.assert_close(quant_linear.fp8_linear(x, w8, scale, bias), expected)
    assert (w8.float() * (scale[:, None] if per_channel else scale) - weight).abs().max() < 0.07 * weight.abs().max()


@needs_cpp
@pytest.mark.parametrize("simd", [True, False])
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
def test_bf16_weight_kernel_matches_float32_math(simd, x_dtype):
    gen = torch.Generator().manual_seed(7)
    for t, k, n in [(1, 64, 40), (3, 96, 33), (5, 40, 17), (33, 64, 8)]:   # K=40: portable
        weight = torch.randn(n, k, generator=gen).bfloat16()
        bias = torch.randn(n, generator=gen).bfloat16()
        x = torch.randn(t, k, generator=gen).to(x_dtype)
        out = cpu_quant.bf16_weight_linear(x, weight, bias, allow_simd=simd)
        expected = ref.bf16_weight_linear(x, weight, bias)
        assert out.dtype == x_dtype
        tol = 1e-4 if x_dtype == torch.float32 else 1e-2
        torch.testing.assert_close(out.float(), expected.float(), rtol=tol, atol=tol)
