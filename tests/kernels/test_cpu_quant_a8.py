"""Integer linears with int8 activations (``cpu_int8_activations``): the PyTorch reference
(``quant_reference.wna16_linear_a8``) against the definition written out element by
element, and the C++ kernel (``csrc/wna8.cpp``, its VNNI and portable paths) against the
reference. The integer dots are exact, so kernel and reference differ only by the float
rounding of the final per-group sums (rtol 1e-5).
"""
from __future__ import annotations

import pytest
import torch

from ferry.kernels import quant_reference as ref
from ferry.kernels.cpu import build
from ferry.kernels.cpu import quant_linear as cpu_quant

needs_cpp = pytest.mark.skipif(build.find_compiler() is None or not build.enabled(),
                               reason="no C++ kernels")


def _case(n, k, bits, group_size, symmetric, rows, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q, s, z = ref.quantize_rtn(torch.randn(n, k, generator=gen), bits, group_size, symmetric)
    x = torch.randn(rows, k, generator=gen)
    bias = torch.randn(n, generator=gen)
    return x.to(dtype), q, s.to(dtype), z.to(dtype), bias.to(dtype)


def test_activation_codes_follow_the_definition():
    x = torch.tensor([[0.5, -1.0, 0.25, 0.0, 0.0, 0.0, 0.0, 0.0],
                      [4.0, 1.0, -2.0, 0.01, 0.0, 0.0, 0.0, 0.0]])
    codes, scales = ref.quantize_activations(x, 4)
    assert codes.tolist() == [[64, -127, 32, 0, 0, 0, 0, 0],     # 0.5 * 127 = 63.5 -> 64 (even)
                              [127, 32, -64, 0, 0, 0, 0, 0]]     # -2 * 31.75 = -63.5 -> -64
    torch.testing.assert_close(scales, torch.tensor([[1.0 / 127, 0.0], [4.0 / 127, 0.0]]))


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
def test_reference_is_the_fake_quantized_float_linear(bits, symmetric):
    """(dequantized codes) @ (dequantized activations), in float64, is the same number."""
    x, q, s, z, bias = _case(6, 128, bits, 32, symmetric, rows=3)
    codes, sx = ref.quantize_activations(x, 32)
    x_fake = (codes.double().view(3, 4, 32) * sx.double()[..., None]).view(3, 128)
    w = ref.dequantize_wna16(q, s.double(), z.double(), bits, 32)
    expected = x_fake @ w.T + bias.double()
    torch.testing.assert_close(ref.wna16_linear_a8(x.double(), q, s.double(), z.double(), bits,
                                                   32, bias.double()), expected)


def test_reference_is_close_to_the_float_activation_linear():
    x, q, s, z, bias = _case(64, 512, 8, 128, True, rows=2)
    exact = ref.wna16_linear(x, q, s, z, 8, 128)
    approx = ref.wna16_linear_a8(x, q, s, z, 8, 128)
    assert (approx - exact).norm() / exact.norm() < 0.01   # int8 rounding of x: ~0.4%


@needs_cpp
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group_size", [64, 128, 256])
@pytest.mark.parametrize("rows", [1, 3, 6])
@pytest.mark.parametrize("simd", [True, False])
def test_cpp_kernel_matches_reference(bits, symmetric, group_size, rows, simd):
    x, q, s, z, bias = _case(40, 512, bits, group_size, symmetric, rows)
    out = cpu_quant.wna16_linear_a8(x, q, s, z, bits, group_size, bias, allow_simd=simd)
    torch.testing.assert_close(out, ref.wna16_linear_a8(x, q, s, z, bits, group_size, bias),
                               rtol=1e-5, atol=1e-4)


@needs_cpp
@pytest.mark.skipif(not cpu_quant.int8_activations_fit(64), reason="no AVX512-VNNI")
@pytest.mark.parametrize("n", [33, 1030])    # rows left over by the 4-row step and the items
def test_vnni_path_is_taken_and_agrees_with_the_portable_twin(n):
    x, q, s, z, bias = _case(n, 1024, 4, 128, False, rows=5)
    vnni = cpu_quant.wna16_linear_a8(x, q, s, z, 4, 128, bias)
    portable = cpu_quant.wna16_linear_a8(x, q, s, z, 4, 128, bias, allow_simd=False)
    float_path = cpu_quant.wna16_linear(x, q, s, z, 4, 128, bias)
    torch.testing.assert_close(vnni, portable, rtol=1e-5, atol=1e-4)
    assert not torch.allclose(vnni, float_path, rtol=1e-5, atol=1e-4)   # activations rounded


@needs_cpp
@pytest.mark.parametrize("bits", [4, 8])
def test_cpp_kernel_bfloat16_and_strided_rows(bits):
    x, q, s, z, bias = _case(24, 256, bits, 64, True, rows=4, dtype=torch.bfloat16)
    wide = torch.zeros(4, 300, dtype=torch.bfloat16)
    wide[:, :256] = x
    out = cpu_quant.wna16_linear_a8(wide[:, :256], q, s, z, bits, 64, bias)
    torch.testing.assert_close(out, ref.wna16_linear_a8(x, q, s, z, bits, 64, bias),
                               rtol=1.6e-2, atol=1e-2)   # one bfloat16 rounding of the output


@needs_cpp
def test_zero_activations_give_the_bias():
    x, q, s, z, bias = _case(16, 128, 8, 64, False, rows=2)
    x[0] = 0.0
    out = cpu_quant.wna16_linear_a8(x, q, s, z, 8, 64, bias)
    assert torch.equal(out[0], bias)


@needs_cpp
def test_unfit_group_sizes_and_long_inputs_run_the_float_kernel():
    x, q, s, z, _ = _case(16, 96, 8, 32, True, rows=2)
    torch.testing.assert_close(cpu_quant.wna16_linear_a8(x, q, s, z, 8, 32),
                               cpu_quant.wna16_linear(x, q, s, z, 8, 32), rtol=0, atol=0)
    x, q, s, z, _ = _case(16, 128, 8, 64, True, rows=cpu_quant.MAX_KERNEL_ROWS + 1)
    torch.testing.assert_close(cpu_quant.wna16_linear_a8(x, q, s, z, 8, 64),
                               cpu_quant.wna16_linear(x, q, s, z, 8, 64), rtol=0, atol=0)
