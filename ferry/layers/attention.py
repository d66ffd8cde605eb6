"""Paged attention layer: stores the new K/V in the cache, then attends over it."""
from __future__ import annotations

import torch
from torch import nn

from ferry import kernels
from ferry.kernels.attn_metadata import AttentionMetadata


class Attention(nn.Module):
    """Multi-head attention over a paged KV cache (GQA when num_kv_heads < num_heads).

    ``forward`` takes projected q (T, H*D), k and v (T, Hkv*D) (rotary already applied)
    and the layer's cache (2, num_blocks, block_size, Hkv, D); returns (T, H*D).
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

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                attn_metadata: AttentionMetadata) -> torch.Tensor:
        num_tokens = q.shape[0]
        q = q.view(num_tokens, self.num_heads, self.head_dim)       # (T, H, D)
        k = k.view(num_tokens, self.num_kv_heads, self.head_dim)    # (T, Hkv, D)
        v = v.view(num_tokens, self.num_kv_heads, self.head_dim)    # (T, Hkv, D)
        kernels.write_kv_cache(k, v, kv_cache, attn_metadata.slot_mapping)
        out = kernels.paged_attention(q, kv_cache, attn_metadata, self.scale, self.sliding_window)
        if attn_metadata.trace_rows is not None:   # only steps with a traced request
            attn_metadata.trace_out.append(kernels.attention_trace(
                q, kv_cache, attn_metadata, self.scale, attn_metadata.trace_rows,
                self.sliding_window))
        return out.reshape(num_tokens, self.num_heads * self.head_dim)
