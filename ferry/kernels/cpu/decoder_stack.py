"""Every decoder layer of a float32 CPU step in one C++ call (``csrc/decoder_stack.cpp``).

The layers of ``ferry/models/common.py`` call about ten kernels each; at decode sizes the
Python around those calls costs as much as a small model's weight reads. This runs the same
kernels in the same order from C++, once per step: :class:`F32DecoderStack` checks the
weights once when it is built, :meth:`F32DecoderStack.run` checks a step's inputs once.
Which models and steps may take it is ``ferry.models.fused_decode``'s call; everything else
runs layer by layer as before.
"""
from __future__ import annotations

import ctypes

import torch

from ferry.kernels.attn_metadata import AttentionMetadata
from ferry.kernels.checks import check_paged_attention_args
from ferry.kernels.cpu._lib import load_library
from ferry.kernels.cpu.dense import max_kernel_rows
from ferry.kernels.cpu.quant_linear import MAX_KERNEL_ROWS as WNA16_MAX_ROWS
from ferry.kernels.decoder_stack_spec import F32, WNA16, LayerTensors, Projection, StackShape

_I64, _F32, _P = ctypes.c_int64, ctypes.c_float, ctypes.c_void_p

# Field orders match csrc/decoder_stack.cpp's structs.
_PROJECTIONS = ("qkv", "o", "gate_up", "down")
_KIND_CODES = {F32: 0, WNA16: 1}


class _StackShape(ctypes.Structure):
    _fields_ = [("hidden", _I64), ("num_heads", _I64), ("num_kv_heads", _I64),
                ("head_dim", _I64), ("intermediate", _I64), ("block_size", _I64),
                ("max_position", _I64), ("eps", _F32), ("scale", _F32), ("cos_sin_cache", _P)]


class _Projection(ctypes.Structure):
    _fields_ = [("kind", _I64), ("weight", _P), ("bias", _P), ("scales", _P), ("zeros", _P),
                ("bits", _I64), ("group_size", _I64), ("int8_activations", _I64)]


class _LayerWeights(ctypes.Structure):
    _fields_ = [("input_norm", _P), ("post_norm", _P),
                *((name, _Projection) for name in _PROJECTIONS),
                ("key_cache", _P), ("value_cache", _P), ("sliding_window", _I64)]


class _StepInputs(ctypes.Structure):
    _fields_ = [("tokens", _I64), ("num_seqs", _I64), ("block_table_stride", _I64),
                ("positions", _P), ("slot_mapping", _P), ("block_tables", _P),
                ("query_start_loc", _P), ("seq_lens", _P)]


def _library():
    lib = load_library()
    if lib is None or max_kernel_rows() == 0:
        return None
    lib.ferry_f32_decoder_stack.argtypes = [_P, _P, _I64, _P, _P, _P, _P, ctypes.c_int]
    lib.ferry_f32_decoder_stack.restype = ctypes.c_int
    lib.ferry_f32_decoder_stack_scratch.argtypes = [_P, _I64]
    lib.ferry_f32_decoder_stack_scratch.restype = _I64
    return lib


def _projection_shapes(shape: StackShape) -> dict[str, tuple[int, int]]:
    """(outputs, inputs) of each projection."""
    q, kv = shape.num_heads * shape.head_dim, shape.num_kv_heads * shape.head_dim
    h, inter = shape.hidden, shape.intermediate
    return {"qkv": (q + 2 * kv, h), "o": (h, q), "gate_up": (2 * inter, h), "down": (h, inter)}


def _float_vector(tensor: torch.Tensor | None, size: int) -> bool:
    return tensor is None or (tensor.dtype == torch.float32 and tensor.is_cpu
                              and tuple(tensor.shape) == (size,) and tensor.is_contiguous())


def _unusable(name: str, p: Projection, out_in: tuple[int, int]) -> str | None:
    """Why projection ``p`` cannot go to the kernel (None: it can)."""
    n, k = out_in
    if not _float_vector(p.bias, n):
        return f"{name}'s bias is not a float32 vector of {n}"
    w = p.weight
    if p.kind == F32:
        if w.dtype != torch.float32 or not w.is_cpu or tuple(w.shape) != (n, k):
            return f"{name} is {w.dtype} {tuple(w.shape)} on {w.device}"
        return None if w.stride() == (1, n) else f"{name} is not stored column-major"
    if p.kind == WNA16:
        codes = (n, k // 2 if p.bits == 4 else k)
        scales_ok = all(t is not None and t.dtype == torch.float32 and t.is_contiguous()
                        and t.shape[0] == n for t in (p.scales, p.zeros))
        if w.dtype != torch.uint8 or tuple(w.shape) != codes or not w.is_contiguous() or not scales_ok:
            return f"{name}'s {p.bits}-bit codes or float32 scales do not fit"
        return None
    return f"{name} is a {p.kind} projection"


class F32DecoderStack:
    """The C++ decoder stack over fixed weights. ``F32DecoderStack.build`` gives None (with
    the reason in ``why_not``) when the library or a weight does not fit."""

    why_not: str | None = None

    def __init__(self, lib, shape: StackShape, layers: list[LayerTensors],
                 cos_sin_cache: torch.Tensor):
        self._lib = lib
        self._layers = layers                  # keeps the weights the pointers name alive
        self._cos_sin = cos_sin_cache
        self._shape = _StackShape(shape.hidden, shape.num_heads, shape.num_kv_heads,
                                  shape.head_dim, shape.intermediate, 0, cos_sin_cache.shape[0],
                                  shape.eps, shape.scale, cos_sin_cache.data_ptr())
        self._weights = (_LayerWeights * len(layers))()
        for slot, layer in zip(self._weights, layers):
            slot.input_norm, slot.post_norm = layer.input_norm.data_ptr(), layer.post_norm.data_ptr()
            for name in _PROJECTIONS:
                setattr(slot, name, _projection(getattr(layer, name)))
            slot.sliding_window = layer.sliding_window or 0
        # Rows one step may have: the GEMV's limit, the int kernel's when a layer uses it.
        quantized = any(getattr(layer, name).kind == WNA16 for layer in layers for name in _PROJECTIONS)
        self.max_rows = min(max_kernel_rows(), WNA16_MAX_ROWS) if quantized else max_kernel_rows()
        self._caches: tuple[int, ...] = ()
        self._scratch = torch.empty(0, dtype=torch.float32)

    @classmethod
    def build(cls, shape: StackShape, layers: list[LayerTensors],
              cos_sin_cache: torch.Tensor) -> "F32DecoderStack | None":
        lib = _library()
        if lib is None:
            cls.why_not = "the C++ kernels or their AVX-512 GEMV are not available"
            return None
        shapes = _projection_shapes(shape)
        for index, layer in enumerate(layers):
            reasons = [_unusable(name, getattr(layer, name), shapes[name]) for name in _PROJECTIONS]
            if not (_float_vector(layer.input_norm, shape.hidden)
                    and _float_vector(layer.post_norm, shape.hidden)):
                reasons.append("its norms are not float32 vectors")
            reason = next((r for r in reasons if r is not None), None)
            if reason is not None:
                cls.why_not = f"layer {index}: {reason}"
                return None
        if (cos_sin_cache.dtype != torch.float32 or not cos_sin_cache.is_contiguous()
                or cos_sin_cache.shape[1] != shape.head_dim or not layers):
            cls.why_not = "the rotary table does not fit"
            return None
        return cls(lib, shape, layers, cos_sin_cache)

    def takes(self, num_tokens: int, kv_caches: list[torch.Tensor]) -> bool:
        """A step of ``num_tokens`` rows over these caches fits the kernel."""
        first = kv_caches[0]
        return (0 < num_tokens <= self.max_rows and len(kv_caches) == len(self._layers)
                and all(cache.dtype == torch.float32 and cache.is_cpu and cache.is_contiguous()
                        and cache.shape == first.shape for cache in kv_caches))

    def run(self, hidden: torch.Tensor, positions: torch.Tensor, kv_caches: list[torch.Tensor],
            meta: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
        """hidden (T, hidden) embeddings -> (the last layer's output, the residual stream),
        what the layer-by-layer loop returns; the caches get the step's K/V."""
        tokens = hidden.shape[0]
        query = hidden.new_empty((tokens, self._shape.num_heads, self._shape.head_dim))
        check_paged_attention_args(query, kv_caches[0], meta, None)
        self._point_at(kv_caches)
        hidden = hidden.contiguous().clone()
        residual = torch.empty_like(hidden)
        # Held in locals until the call returns: the struct keeps only their addresses.
        positions = positions.to(torch.int64).contiguous()
        slots = meta.slot_mapping.to(torch.int64).contiguous()
        block_tables = meta.block_tables.to(torch.int32).contiguous()
        starts = meta.query_start_loc.to(torch.int32).contiguous()
        seq_lens = meta.seq_lens.to(torch.int32).contiguous()
        step = _StepInputs(tokens, meta.num_seqs, block_tables.shape[1], positions.data_ptr(),
                           slots.data_ptr(), block_tables.data_ptr(), starts.data_ptr(),
                           seq_lens.data_ptr())
        status = self._lib.ferry_f32_decoder_stack(
            ctypes.byref(self._shape), self._weights, len(self._layers), ctypes.byref(step),
            hidden.data_ptr(), residual.data_ptr(), self._scratch_for(tokens).data_ptr(),
            torch.get_num_threads())
        if status == 2:
            raise IndexError(f"positions must lie in [0, {self._shape.max_position})")
        if status:
            raise ValueError(f"decoder_stack: a CPU kernel rejected its arguments (code {status})")
        return hidden, residual

    def _point_at(self, kv_caches: list[torch.Tensor]) -> None:
        """Aim each layer at its cache (the runner keeps the same caches between steps)."""
        key = tuple(cache.data_ptr() for cache in kv_caches)
        if key == self._caches:
            return
        for slot, cache in zip(self._weights, kv_caches):
            slot.key_cache, slot.value_cache = cache[0].data_ptr(), cache[1].data_ptr()
        self._shape.block_size = kv_caches[0].shape[2]
        self._caches = key

    def _scratch_for(self, tokens: int) -> torch.Tensor:
        needed = self._lib.ferry_f32_decoder_stack_scratch(ctypes.byref(self._shape), tokens)
        if self._scratch.numel() < needed:
            self._scratch = torch.empty(needed, dtype=torch.float32)
        return self._scratch


def _projection(p: Projection) -> _Projection:
    def address(tensor):
        return tensor.data_ptr() if tensor is not None else None

    return _Projection(_KIND_CODES[p.kind], p.weight.data_ptr(), address(p.bias),
                       address(p.scales), address(p.zeros), p.bits, p.group_size,
                       int(p.int8_activations))
