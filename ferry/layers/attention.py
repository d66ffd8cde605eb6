"""Paged attention layer: stores the new K/V in the cache, then attends over it."""
from __future__ import annotations

import torch
from torch import nn

from ferry import kernels
from ferry.kernels.attn_metadata import AttentionMetadata

FP8_KV_DTYPES = (torch.float8_e4m3fn,)


class Attention(nn.Module):
    """Multi-head attention over a paged KV cache (GQA when num_kv_heads < num_heads).

    ``forward`` takes projected q (T, H*D), k and v (T, Hkv*D) (rotary already applied)
    and the layer's cache (2, num_blocks, block_size, Hkv, D); returns (T, H*D).

    An FP8 cache (``kv_cache_dtype: fp8``) holds k / k_scale and v / v_scale in e4m3; the
    scales are Python floats (1.0 unless the checkpoint's are set on the layer). Every
    backend only converts the stored values on read: the scales fold into the softmax
    scale (q . k_scale k') and the output (v_scale sum p v'), so no kernel needs them.

    For a step with a traced request (``attn_metadata.trace_rows``) the layer also records
    the debug trace of those rows from the cache it just attended over, with the scale its
    attention used: over an FP8 cache the dequantized scores q . k_scale k'.
    """

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float,
                 sliding_window: int | None = None):
        super().__init__()
        if num_heads % num_kv_heads:
            raise ValueError(f"num_attention_heads ({num_heads}) must be a multiple of "
                             f"num_key_value_heads ({num_kv_heads})")
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale
        self.sliding_window = sliding_window
        self.k_scale = 1.0      # FP8 KV cache scales (set from the checkpoint when it has them)
        self.v_scale = 1.0

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                attn_metadata: AttentionMetadata) -> torch.Tensor:
        num_tokens = q.shape[0]
        q = q.view(num_tokens, self.num_heads, self.head_dim)       # (T, H, D)
        k = k.view(num_tokens, self.num_kv_heads, self.head_dim)    # (T, Hkv, D)
        v = v.view(num_tokens, self.num_kv_heads, self.head_dim)    # (T, Hkv, D)
        if kv_cache.dtype in FP8_KV_DTYPES:
            return self._forward_fp8(q, k, v, kv_cache, attn_metadata)
        kernels.write_kv_cache(k, v, kv_cache, attn_metadata.slot_mapping)
        out = kernels.paged_attention(q, kv_cache, attn_metadata, self.scale, self.sliding_window)
        self._trace(q, kv_cache, attn_metadata, self.scale)
        return out.reshape(num_tokens, self.num_heads * self.head_dim)

    def _forward_fp8(self, q, k, v, kv_cache, attn_metadata) -> torch.Tensor:
        k_scale, v_scale = float(self.k_scale), float(self.v_scale)
        if k_scale != 1.0:
            k = k / k_scale
        if v_scale != 1.0:
            v = v / v_scale
        kernels.write_kv_cache(k, v, kv_cache, attn_metadata.slot_mapping)   # saturating cast
        out = kernels.paged_attention(q, kv_cache, attn_metadata, self.scale * k_scale,
                                      self.sliding_window)                   # (T, H, D)
        self._trace(q, kv_cache, attn_metadata, self.scale * k_scale)
        if v_scale != 1.0:
            out = out * v_scale
        return out.reshape(q.shape[0], self.num_heads * self.head_dim)

    def _trace(self, q, kv_cache, attn_metadata, scale: float) -> None:
        """Append the debug trace of the step's traced rows, scored as the attention just
        did (same q, cache and scale). Steps without a traced request skip it entirely."""
        if attn_metadata.trace_rows is not None:
            attn_metadata.trace_out.append(kernels.attention_trace(
                q, kv_cache, attn_metadata, scale, attn_metadata.trace_rows,
                self.sliding_window))
