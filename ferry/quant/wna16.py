"""Integer weight-only linears (GPTQ, AWQ, compressed-tensors W4A16/W8A16): one runtime layout.

Each format registers its checkpoint tensors and, after loading, decodes them into
integer codes, zeros and scales (``decode``). This module turns those into the canonical
layout of ``ferry.kernels.quant_linear`` and calls ``wna16_linear``, so one kernel serves
every format. Act-order (a permuted ``g_idx``): the inputs are sorted by group at load so
each group is contiguous, and the forward permutes ``x`` by the same ``perm``. Shards of a
merged layer with different permutations run as separate parts.
"""
from __future__ import annotations

from abc import abstractmethod
from dataclasses import dataclass

import torch
from torch import nn

from ferry.kernels.decoder_stack_spec import WNA16, Projection
from ferry.kernels.quant_linear import pack_canonical, wna16_linear, wna16_linear_a8
from ferry.layers.linear_method import LinearMethod, input_part
from ferry.layers.parameter import copy_checked, new_parameter
from ferry.quant.selection import shard_index


@dataclass
class Decoded:
    """A layer's weight as integer codes: w = (codes - zeros) * scales, group by group."""

    codes: torch.Tensor            # (N, K) integers in [0, 2**bits)
    scales: torch.Tensor           # (N, G) model dtype
    zeros: torch.Tensor            # (N, G) model dtype
    g_idx: torch.Tensor | None     # (K,) group of each input; None: k // group_size


class WNA16LinearMethod(LinearMethod):
    """Base of the integer weight-only formats: ``create_weights`` and ``decode`` per format.

    ``int8_activations`` (set by the weight methods from ``cpu_int8_activations``): CPU
    inputs are quantized to int8 per group too (``kernels.wna16_linear_a8``)."""

    int8_activations = False

    def __init__(self, bits: int, group_size: int):
        if bits not in (4, 8):
            raise ValueError(f"weight-only integer linears support bits 4 and 8, got {bits}")
        self.bits = bits
        self.group_size = group_size          # -1: one group per output channel

    def groups(self, input_size: int, prefix: str = "") -> tuple[int, int]:
        """(group size, number of groups) of a layer with ``input_size`` inputs."""
        size = input_size if self.group_size in (-1, 0, None) else self.group_size
        if input_size % size:
            raise ValueError(f"group_size={self.group_size} does not divide the {input_size} "
                             f"inputs of {prefix or 'a layer'}; ferry needs whole groups")
        return size, input_size // size

    @abstractmethod
    def decode(self, layer: nn.Module) -> Decoded:
        """The loaded checkpoint tensors as codes, scales and zeros."""

    @abstractmethod
    def checkpoint_params(self) -> tuple[str, ...]:
        """Names of the checkpoint parameters ``create_weights`` registered (dropped after decode)."""

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        decoded = self.decode(layer)
        for name in self.checkpoint_params():
            delattr(layer, name)
        group_size, num_groups = self.groups(layer.input_size)
        localise_g_idx(layer, decoded, self.group_size, num_groups)
        parts = split_by_permutation(layer, decoded)
        layer.wna16_parts = len(parts)
        for i, (rows, perm, g_idx) in enumerate(parts):
            codes, scales, zeros = decoded.codes[rows], decoded.scales[rows], decoded.zeros[rows]
            if perm is not None:
                codes = codes[:, perm]                    # (n, K), groups now contiguous
                check_sorted_groups(g_idx[perm], group_size, layer.prefix)
            _register(layer, f"qweight{i}", pack_canonical(codes, self.bits))
            _register(layer, f"scales{i}", scales.contiguous())
            _register(layer, f"zeros{i}", zeros.contiguous())
            _register(layer, f"perm{i}", perm)
        layer.wna16_group_size = group_size

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if layer.wna16_parts == 1:
            return self._part(layer, 0, x, bias)           # (T, K) -> (T, N)
        outs = [self._part(layer, i, x, None) for i in range(layer.wna16_parts)]
        out = torch.cat(outs, dim=-1)
        return out + bias if bias is not None else out

    def fused_projection(self, layer: nn.Module) -> Projection | None:
        if layer.wna16_parts != 1 or layer.perm0 is not None:
            return None   # act-order splits: several kernel calls and a gather
        bias = None if layer.bias is None else layer.bias.detach()
        return Projection(WNA16, layer.qweight0, bias, layer.scales0, layer.zeros0, self.bits,
                          layer.wna16_group_size, self.int8_activations)

    def _part(self, layer: nn.Module, i: int, x: torch.Tensor, bias) -> torch.Tensor:
        perm = getattr(layer, f"perm{i}")
        if perm is not None:
            x = x[:, perm]                                 # (T, K) in sorted-group order
        linear = wna16_linear_a8 if self.int8_activations and x.is_cpu else wna16_linear
        return linear(x, getattr(layer, f"qweight{i}"), getattr(layer, f"scales{i}"),
                      getattr(layer, f"zeros{i}"), self.bits, layer.wna16_group_size, bias)


def _register(layer: nn.Module, name: str, tensor: torch.Tensor | None) -> None:
    if tensor is None:
        setattr(layer, name, None)
    else:
        layer.register_buffer(name, tensor, persistent=False)


def localise_g_idx(layer: nn.Module, decoded: Decoded, group_size: int, num_groups: int) -> None:
    """The whole layer's group numbers in ``g_idx`` -> this layer part's.

    A row-parallel rank holds inputs ``start ..`` of the whole layer and, sliced alike,
    the scales of its groups ``start // group_size ..`` (``group_size`` as configured;
    -1: one group over all inputs, which every rank holds); its slice of ``g_idx`` still
    numbers the whole layer's groups. ValueError when one of its inputs belongs to a
    group outside its slice: an act-order (``desc_act``) permutation across the ranks'
    slices, whose groups no rank holds whole.
    """
    start, whole = input_part(layer)
    if decoded.g_idx is None or whole == layer.input_size:
        return
    first = start // group_size if group_size not in (-1, 0, None) else 0

    def local(g_idx: torch.Tensor) -> torch.Tensor:
        g_idx = g_idx - first
        if ((g_idx < 0) | (g_idx >= num_groups)).any():
            raise ValueError(
                f"{layer.prefix}: this rank's inputs {start}..{start + layer.input_size - 1} "
                f"of {whole} include inputs of quantization groups held by another rank "
                f"(an act-order / desc_act g_idx that mixes the ranks' slices); ferry "
                f"cannot split such a layer along its inputs: use tensor_parallel_size=1, "
                f"pipeline parallelism, or a checkpoint quantized without act-order")
        return g_idx

    decoded.g_idx = local(decoded.g_idx)
    if getattr(layer, "g_idx_shards", None):
        layer.g_idx_shards = {shard: local(g) for shard, g in layer.g_idx_shards.items()}


def split_by_permutation(layer: nn.Module, decoded: Decoded
                         ) -> list[tuple[slice, torch.Tensor | None, torch.Tensor | None]]:
    """(output rows, input permutation or None, its g_idx) per part of the layer.

    One part unless the merged shards carry different act-order permutations.
    """
    g_idx = decoded.g_idx
    out = decoded.codes.shape[0]
    if g_idx is None:
        return [(slice(0, out), None, None)]
    shards = getattr(layer, "g_idx_shards", None) or {None: g_idx}
    perms = {}
    for shard_id, shard_g in shards.items():
        perms[shard_id] = None if _trivial(shard_g, decoded) else torch.argsort(shard_g, stable=True)
    distinct = {None if p is None else tuple(p.tolist()) for p in perms.values()}
    if len(distinct) == 1:
        shard_id = next(iter(perms))
        return [(slice(0, out), perms[shard_id], shards[shard_id])]
    parts = []
    for shard_id, (offset, size) in layer.shard_offsets.items():   # output order
        perm = perms[shard_id]
        parts.append((slice(offset, offset + size), perm, shards[shard_id]))
    return parts


def _trivial(g_idx: torch.Tensor, decoded: Decoded) -> bool:
    k = g_idx.shape[0]
    group_size = k // decoded.scales.shape[1]
    return torch.equal(g_idx.long().cpu(), torch.arange(k) // group_size)


def check_sorted_groups(sorted_g_idx: torch.Tensor, group_size: int, prefix: str) -> None:
    """After sorting, input k must fall in group k // group_size (every group full)."""
    want = torch.arange(sorted_g_idx.shape[0], device=sorted_g_idx.device) // group_size
    if not torch.equal(sorted_g_idx.long(), want):
        raise ValueError(f"g_idx of {prefix} does not give every group {group_size} inputs; "
                         "ferry cannot load this act-order layout")


def g_idx_parameter(layer: nn.Module, input_size: int, name: str = "g_idx") -> nn.Parameter:
    """A (K,) int32 ``g_idx`` whose loader keeps each merged shard's own copy.

    Shards of one merged layer may come with different act-order permutations; the
    parameter holds the last one loaded and ``layer.g_idx_shards`` all of them.
    """
    param = new_parameter((input_size,), torch.int32, output_dim=None, input_dim=0)
    layer.g_idx_shards = {}

    def load(param: torch.Tensor, loaded: torch.Tensor, shard_id=None) -> None:
        copy_checked(param.data, loaded)
        layer.g_idx_shards[shard_id] = loaded.to(torch.int64).clone()
    param.weight_loader = load
    return param


def per_shard_scalar(layer: nn.Module, num_shards: int, dtype: torch.dtype) -> nn.Parameter:
    """One float per merged shard (a per-tensor scale): a (num_shards,) parameter."""
    param = new_parameter((num_shards,), dtype, output_dim=None, input_dim=None)

    def load(param: torch.Tensor, loaded: torch.Tensor, shard_id=None) -> None:
        if loaded.numel() != 1:
            raise ValueError(f"expected one scale per tensor, got shape {tuple(loaded.shape)}")
        param.data[shard_index(layer, shard_id)] = loaded.reshape(()).to(param.dtype)
    param.weight_loader = load
    return param
