"""Pack -> unpack gives back the integer codes, for every layout, checked against test
vectors written from the formats' documentation and against the reference packers where
they load (compressed-tensors always; AutoGPTQ's ``QuantLinear.pack`` and AutoAWQ's
``WQLinear_GEMM.from_linear`` when those packages are installed; they skip otherwise)."""
from __future__ import annotations

import importlib
import importlib.util
import sys
import types

import pytest
import torch
from torch import nn

from ferry.kernels.quant_linear import dequantize_wna16, pack_canonical, unpack_canonical, wna16_linear
from ferry.quant.packing import AWQ_ORDER, pack_int32, unpack_int32
from ferry.quant.quantize import formats
from ferry.quant.quantize.rtn import rtn

GEN = torch.Generator().manual_seed(0)


def codes(shape, bits):
    return torch.randint(0, 2 ** bits, shape, generator=GEN, dtype=torch.int32)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("dim", [0, 1])
def test_int32_pack_round_trips(bits, dim):
    c = codes((16, 32), bits)
    assert torch.equal(unpack_int32(pack_int32(c, bits, dim), bits, dim), c)
    if bits == 4:
        assert torch.equal(unpack_int32(pack_int32(c, 4, dim, AWQ_ORDER), 4, dim, AWQ_ORDER), c)


def test_documented_vectors():
    """GPTQ: code j of a word at bits 4j (codes 0..7 -> 0x76543210); AWQ GEMM: slot i holds
    column [0,2,4,6,1,3,5,7][i] (-> 0x75316420); 8 bits: 4 codes a word, low byte first."""
    run = torch.arange(8).view(1, 8)
    assert pack_int32(run, 4, 1).item() & 0xFFFFFFFF == 0x76543210
    assert pack_int32(run, 4, 1, AWQ_ORDER).item() & 0xFFFFFFFF == 0x75316420
    assert pack_int32(torch.tensor([[0x11, 0x22, 0x33, 0xF4]]), 8, 1).item() & 0xFFFFFFFF == 0xF4332211
    # a word with the top bit set reads back unsigned
    assert unpack_int32(torch.tensor([[-1]], dtype=torch.int32), 4, 1).tolist() == [[15] * 8]


@pytest.mark.parametrize("bits", [4, 8])
def test_canonical_layout(bits):
    c = codes((6, 16), bits)
    packed = pack_canonical(c, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (6, 16 * bits // 8)
    assert torch.equal(unpack_canonical(packed, bits).int(), c)
    if bits == 4:   # low nibble = even k, high nibble = odd k
        assert torch.equal(packed[:, 0].int(), c[:, 0] | (c[:, 1] << 4))


def test_wna16_linear_is_the_dequantized_matmul():
    c = codes((8, 64), 4)
    scales, zeros = torch.rand(8, 2) + 0.1, torch.randint(0, 16, (8, 2)).float()
    x = torch.randn(3, 64)
    w = (c.float() - zeros.repeat_interleave(32, 1)) * scales.repeat_interleave(32, 1)
    got = wna16_linear(x, pack_canonical(c, 4), scales, zeros, 4, 32)
    torch.testing.assert_close(got, x @ w.t())
    torch.testing.assert_close(dequantize_wna16(pack_canonical(c, 4), scales, zeros, 4, 32), w)


@pytest.mark.parametrize("bits", [4, 8])
def test_compressed_tensors_packer_agrees(bits):
    """The package's pack_to_int32 of signed codes is our int32 packing of codes + offset."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32
    c = codes((16, 64), bits)
    signed = (c - 2 ** (bits - 1)).to(torch.int8)
    for dim in (0, 1):
        theirs = pack_to_int32(signed, bits, packed_dim=dim)
        assert torch.equal(theirs, pack_int32(c, bits, dim))
        assert torch.equal(unpack_from_int32(theirs, bits, c.shape, packed_dim=dim).int() + 2 ** (bits - 1), c)


def _reference_module(package: str, relative: str):
    """A module of an installed package, loaded without running the package's __init__
    (AutoGPTQ's and AutoAWQ's import model code for old transformers versions)."""
    if package not in sys.modules:
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            pytest.skip(f"{package} is not installed")
        stub = types.ModuleType(package)
        stub.__path__ = list(spec.submodule_search_locations)
        sys.modules[package] = stub
    try:
        return importlib.import_module(f"{package}.{relative}")
    except Exception as exc:  # noqa: BLE001 - a reference that cannot load is skipped
        pytest.skip(f"{package}.{relative} does not load here: {exc}")


@pytest.mark.parametrize("bits,sym", [(4, True), (4, False), (8, False)])
def test_autogptq_packer_agrees(bits, sym):
    qlinear = _reference_module("auto_gptq", "nn_modules.qlinear.qlinear_cuda_old")
    out_f, in_f, group = 64, 128, 32
    linear = nn.Linear(in_f, out_f, bias=False)
    qw = rtn(linear.weight.data, bits, group, sym, min_zero=1)
    qw.scales = qw.scales.half().float()
    linear.weight.data = qw.dequantize()
    ref = qlinear.QuantLinear(bits, group, in_f, out_f, False)
    g_idx = torch.arange(in_f, dtype=torch.int32) // group
    ref.pack(linear, qw.scales.clone(), qw.zeros.clone().float(), g_idx)   # (N, G) as its quantizer gives
    ours = formats.gptq_tensors("m", qw, "v1")
    assert torch.equal(ref.qweight, ours["m.qweight"])
    assert torch.equal(ref.qzeros, ours["m.qzeros"])
    assert torch.equal(ref.scales.float(), ours["m.scales"].float())


def test_autoawq_packer_agrees():
    gemm = _reference_module("awq", "modules.linear.gemm")
    out_f, in_f, group = 64, 128, 32
    linear = nn.Linear(in_f, out_f, bias=False)
    qw = rtn(linear.weight.data, 4, group, sym=False)
    qw.scales = qw.scales.half().float()
    linear.weight.data = qw.dequantize()
    ref = gemm.WQLinear_GEMM.from_linear(linear, 4, group, scales=qw.scales.t().contiguous(),
                                         zeros=qw.zeros.t().contiguous())
    ours = formats.awq_tensors("m", qw)
    assert torch.equal(ref.qweight, ours["m.qweight"])
    assert torch.equal(ref.qzeros, ours["m.qzeros"])
