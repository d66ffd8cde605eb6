"""Write ``QuantizedWeight``s in the standard checkpoint layouts, with their quantization_config.

- ``gptq``: AutoGPTQ's ``qweight`` / ``qzeros`` (v1: zero - 1) / ``scales`` / ``g_idx``;
- ``awq``: AutoAWQ's GEMM layout (interleaved nibbles, 4 bits only);
- ``compressed-tensors``: ``pack-quantized`` with the package's own ``pack_to_int32``.

Each ``*_tensors(prefix, qw)`` returns the module's checkpoint tensors; ``*_config`` the
``quantization_config`` for config.json. Scales are stored in float16, as the formats do.
"""
from __future__ import annotations

import torch

from ferry.quant.packing import AWQ_ORDER, pack_int32
from ferry.quant.quantize.rtn import QuantizedWeight

FORMATS = ("gptq", "awq", "compressed-tensors")
SCALE_DTYPE = torch.float16


def gptq_tensors(prefix: str, qw: QuantizedWeight, version: str = "v1") -> dict[str, torch.Tensor]:
    stored = qw.zeros - (1 if version == "v1" else 0)                   # (N, G)
    if (stored < 0).any():
        raise ValueError("GPTQ v1 cannot store a zero point of 0 (it stores zero - 1)")
    g_idx = qw.group_index().to(torch.int32)
    return {f"{prefix}.qweight": pack_int32(qw.codes.t(), qw.bits, dim=0),      # (K/f, N)
            f"{prefix}.qzeros": pack_int32(stored.t(), qw.bits, dim=1),         # (G, N/f)
            f"{prefix}.scales": qw.scales.t().contiguous().to(SCALE_DTYPE),    # (G, N)
            f"{prefix}.g_idx": g_idx}


def gptq_config(bits: int, group_size: int, sym: bool, desc_act: bool,
                version: str = "v1") -> dict:
    return {"quant_method": "gptq", "bits": bits, "group_size": group_size, "sym": sym,
            "desc_act": desc_act, "damp_percent": 0.01, "true_sequential": True,
            "static_groups": False, "checkpoint_format": "gptq" if version == "v1" else "gptq_v2"}


def awq_tensors(prefix: str, qw: QuantizedWeight) -> dict[str, torch.Tensor]:
    if qw.bits != 4 or qw.g_idx is not None:
        raise ValueError("the AWQ GEMM layout holds 4-bit weights in input order only")
    return {f"{prefix}.qweight": pack_int32(qw.codes.t(), 4, dim=1, order=AWQ_ORDER),   # (K, N/8)
            f"{prefix}.qzeros": pack_int32(qw.zeros.t(), 4, dim=1, order=AWQ_ORDER),    # (G, N/8)
            f"{prefix}.scales": qw.scales.t().contiguous().to(SCALE_DTYPE)}             # (G, N)


def awq_config(group_size: int, modules_to_not_convert: list[str] | None = None) -> dict:
    return {"quant_method": "awq", "bits": 4, "group_size": group_size, "zero_point": True,
            "version": "gemm", "modules_to_not_convert": modules_to_not_convert or None}


def ct_tensors(prefix: str, qw: QuantizedWeight) -> dict[str, torch.Tensor]:
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
    if qw.g_idx is not None:
        raise ValueError("write act-order weights in the gptq format")
    offset = 2 ** (qw.bits - 1)
    out = {f"{prefix}.weight_packed": pack_to_int32((qw.codes - offset).to(torch.int8), qw.bits),
           f"{prefix}.weight_scale": qw.scales.contiguous().to(SCALE_DTYPE),
           f"{prefix}.weight_shape": torch.tensor(list(qw.codes.shape))}
    if not qw.sym:
        out[f"{prefix}.weight_zero_point"] = pack_to_int32(
            (qw.zeros - offset).to(torch.int8), qw.bits, packed_dim=0)
    return out


def ct_config(bits: int, group_size: int, sym: bool, ignore: list[str]) -> dict:
    weights = {"num_bits": bits, "type": "int", "symmetric": sym, "dynamic": False,
               "strategy": "channel" if group_size == -1 else "group",
               "group_size": None if group_size == -1 else group_size}
    return {"quant_method": "compressed-tensors", "format": "pack-quantized",
            "quantization_status": "compressed", "ignore": ignore,
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights,
                                          "input_activations": None, "output_activations": None}}}
