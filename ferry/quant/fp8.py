"""FP8 (e4m3) weight linears: compressed-tensors ``float-quantized`` and vLLM-style ``fp8``.

Weights are (N, K) float8_e4m3fn with a scale per tensor (one per merged shard), per
output channel, or per (block_n x block_k) block (``weight_scale_inv``, which despite its
name multiplies). Activations are quantized to FP8 per token (dynamic), per tensor
(dynamic or a static ``input_scale``), per group of ``block_k`` inputs (block weights), or
not at all (weight-only). The reference path here fake-quantizes the activations and
multiplies dequantized weights in the model dtype; on GPUs with FP8 units (sm_89+, MI300)
per-tensor/per-channel layers use ``torch._scaled_mm``.
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from ferry.layers.linear_method import LinearMethod, input_part
from ferry.layers.parameter import new_parameter
from ferry.platform import device_arch
from ferry.quant.wna16 import per_shard_scalar

logger = logging.getLogger(__name__)

FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)          # 448
WEIGHT_STRATEGIES = ("tensor", "channel", "block")
ACTIVATIONS = (None, "token", "tensor", "static", "group")   # None: weight-only


def fp8_quantize(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x / scale, saturated to +-448, as float8_e4m3fn (scale broadcasts against x)."""
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)


def dynamic_scale(x: torch.Tensor, dim: int | None) -> torch.Tensor:
    """Scale that maps the largest |x| (per row when ``dim`` is -1, overall when None) to 448."""
    amax = x.abs().amax() if dim is None else x.abs().amax(dim=dim, keepdim=True)
    return (amax.float() / FP8_MAX).clamp(min=1e-12)


def rows_from_shards(layer: nn.Module, per_shard: torch.Tensor) -> torch.Tensor:
    """(num_shards,) per-tensor scales -> (N, 1), each output row with its shard's scale."""
    offsets = getattr(layer, "shard_offsets", None)
    sizes = [size for _, size in offsets.values()] if offsets else [layer.output_size]
    return torch.repeat_interleave(per_shard, torch.tensor(sizes, device=per_shard.device))[:, None]


def check_whole_blocks(layer: nn.Module, input_size: int, output_sizes: list[int],
                       block: tuple[int, int]) -> None:
    """Each output shard is whole ``block_n`` blocks; a row-parallel rank's inputs whole
    ``block_k`` blocks (its block scales would otherwise straddle two ranks)."""
    bn, bk = block
    start, whole = input_part(layer)
    split = (f" (this rank's share with tensor parallelism; use a tensor_parallel_size "
             f"that keeps whole {bn}x{bk} blocks on each rank)")
    if any(size % bn for size in output_sizes):
        tp = split if getattr(layer, "tp_kind", None) else ""
        raise ValueError(f"{layer.prefix}: output sizes {output_sizes} are not multiples of "
                         f"weight_block_size {bn}{tp}")
    if whole != input_size and input_size % bk:
        raise ValueError(f"{layer.prefix}: this rank's inputs {start}..{start + input_size - 1} "
                         f"of {whole} are not whole blocks of weight_block_size {bk}{split}")
    if input_size % bk:   # the activations are quantized in groups of block_k inputs
        raise ValueError(f"{layer.prefix}: input size {input_size} is not a multiple of "
                         f"weight_block_size {bk} (activation groups of {bk} inputs)")


def fp8_supported(device: torch.device) -> bool:
    """FP8 matmul units: NVIDIA sm_89 and newer, AMD MI300 (gfx942) and newer."""
    arch = device_arch(device)
    if arch.startswith("sm_"):
        return int(arch[3:]) >= 89
    return arch.startswith(("gfx942", "gfx950"))


class FP8LinearMethod(LinearMethod):
    """FP8 weights; ``activation`` in ACTIVATIONS, ``weight_strategy`` in WEIGHT_STRATEGIES."""

    def __init__(self, weight_strategy: str, activation: str | None,
                 block: tuple[int, int] | None = None, scale_name: str = "weight_scale"):
        if weight_strategy not in WEIGHT_STRATEGIES or activation not in ACTIVATIONS:
            raise ValueError(f"unsupported FP8 scheme: weights {weight_strategy}, "
                             f"activations {activation}")
        self.weight_strategy, self.activation = weight_strategy, activation
        self.block, self.scale_name = block, scale_name

    def create_weights(self, layer, input_size, output_sizes, params_dtype):
        out = sum(output_sizes)
        layer.weight = new_parameter((out, input_size), FP8, output_dim=0, input_dim=1)
        if self.weight_strategy == "tensor":
            scale = per_shard_scalar(layer, len(output_sizes), torch.float32)
        elif self.weight_strategy == "channel":
            scale = new_parameter((out, 1), torch.float32, output_dim=0, input_dim=None)
        else:
            bn, bk = self.block
            check_whole_blocks(layer, input_size, output_sizes, self.block)
            scale = new_parameter((out // bn, -(-input_size // bk)), torch.float32, output_dim=0,
                                  input_dim=1, packed_dim=0, pack_factor=bn)
        setattr(layer, self.scale_name, scale)
        if self.activation == "static":
            layer.input_scale = per_shard_scalar(layer, len(output_sizes), torch.float32)

    def process_weights_after_loading(self, layer):
        scale = getattr(layer, self.scale_name).data
        if self.weight_strategy == "tensor":
            scale = rows_from_shards(layer, scale)                     # (N, 1)
        delattr(layer, self.scale_name)
        layer.register_buffer("weight_scale_rows", scale.contiguous(), persistent=False)
        if self.activation == "static":
            # one scale for the merged input: the largest shard's (vLLM does the same)
            static = layer.input_scale.data.max().reshape(())
            del layer.input_scale
            layer.register_buffer("input_scale_value", static, persistent=False)
        layer.fp8_scaled_mm = (self.weight_strategy != "block" and self.activation is not None
                               and self.activation != "group" and fp8_supported(layer.weight.device))

    def dequantized_weight(self, layer, dtype: torch.dtype) -> torch.Tensor:
        w = layer.weight.float()                                        # (N, K)
        scale = layer.weight_scale_rows
        if self.weight_strategy == "block":
            bn, bk = self.block
            n, k = w.shape
            scale = scale.repeat_interleave(bn, 0)[:n].repeat_interleave(bk, 1)[:, :k]
        return (w * scale).to(dtype)

    def quantize_input(self, layer, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x as FP8, its scale) for the layer's activation scheme."""
        if self.activation == "static":
            scale = layer.input_scale_value
        elif self.activation == "tensor":
            scale = dynamic_scale(x, None)
        elif self.activation == "token":
            scale = dynamic_scale(x, -1)                                # (T, 1)
        else:                                                            # groups of block_k
            bk = self.block[1]
            groups = x.reshape(x.shape[0], -1, bk)                       # (T, K/bk, bk)
            scale = dynamic_scale(groups, -1)                            # (T, K/bk, 1)
            return fp8_quantize(groups, scale).reshape(x.shape), scale
        return fp8_quantize(x, scale), scale

    def apply(self, layer, x, bias):
        if self.activation is None:
            return F.linear(x, self.dequantized_weight(layer, x.dtype), bias)
        xq, x_scale = self.quantize_input(layer, x)
        if layer.fp8_scaled_mm:
            out = _scaled_mm(layer, xq, x_scale, x.dtype, bias)
            if out is not None:
                return out
        if self.activation == "group":
            x_deq = (xq.float().reshape(x.shape[0], -1, self.block[1]) * x_scale).reshape(x.shape)
        else:
            x_deq = xq.float() * x_scale
        return F.linear(x_deq.to(x.dtype), self.dequantized_weight(layer, x.dtype), bias)


def _scaled_mm(layer, xq, x_scale, dtype, bias):
    """FP8 GEMM on the device's FP8 units; None (and the reference from then on) if it fails."""
    try:
        scale_a = x_scale.float().reshape(-1, 1) if x_scale.numel() > 1 else x_scale.float().reshape(())
        scale_b = layer.weight_scale_rows.float().reshape(1, -1)
        if scale_a.dim() == 0 and scale_b.numel() > 1:
            scale_a = scale_a.expand(xq.shape[0], 1).contiguous()
        return torch._scaled_mm(xq, layer.weight.t(), scale_a=scale_a, scale_b=scale_b,
                                bias=bias, out_dtype=dtype)
    except (RuntimeError, TypeError) as exc:
        logger.warning("torch._scaled_mm failed on %s (%s); using the dequantize path",
                       layer.prefix, exc)
        layer.fp8_scaled_mm = False
        return None


class FP8Config:
    """vLLM-style ``quant_method: fp8``: activation_scheme, ignored_layers, weight_block_size,
    and AutoFP8's ``kv_cache_scheme: static`` (per-layer FP8 K/V scales)."""

    label = "fp8"

    def __init__(self, raw: dict):
        self.activation_scheme = raw.get("activation_scheme", "dynamic")
        if self.activation_scheme not in ("dynamic", "static"):
            raise ValueError(f"quantization_config.activation_scheme={self.activation_scheme!r} "
                             "is not supported (dynamic or static)")
        fmt = raw.get("fmt", "e4m3")
        if fmt != "e4m3":
            raise ValueError(f"quantization_config.fmt={fmt!r} is not supported (e4m3)")
        block = raw.get("weight_block_size")
        self.block = tuple(int(b) for b in block) if block else None
        if self.block is not None and (len(self.block) != 2 or self.activation_scheme != "dynamic"):
            raise ValueError(f"quantization_config.weight_block_size={block!r} needs two sizes "
                             "and activation_scheme dynamic")
        self.ignored_layers = list(raw.get("ignored_layers") or raw.get("modules_to_not_convert") or [])
        # AutoFP8 writes "static" with per-layer k_proj/v_proj.output_scale (kv_scales.py)
        self.kv_cache_scheme = raw.get("kv_cache_scheme")
        if self.kv_cache_scheme not in (None, "static"):
            raise ValueError(f"quantization_config.kv_cache_scheme={self.kv_cache_scheme!r} is "
                             "not supported (static)")

    def quantizes(self, name: str) -> bool:
        return not any(name == ign or name.startswith(ign + ".") for ign in self.ignored_layers)

    def method(self) -> FP8LinearMethod:
        if self.block is not None:
            return FP8LinearMethod("block", "group", self.block, scale_name="weight_scale_inv")
        activation = "static" if self.activation_scheme == "static" else "tensor"   # as vLLM
        return FP8LinearMethod("tensor", activation)
