"""The online-softmax step shared by the paged decode and prefill kernels."""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def attend_key_tile(q, acc, m_i, l_i, kv_cache_ptr, table, pos, in_range, visible, kv_head,
                    offs_d, d_mask, qk_scale, stride_kv, stride_kb, stride_ks, stride_kh,
                    PAGE_SIZE: tl.constexpr):
    """Fold one tile of keys into a flash-attention state; returns (acc, m_i, l_i).

    q (R, BLOCK_D) rows already in the dot dtype; pos (BLOCK_N,) key positions, read from
    the paged cache through ``table`` where ``in_range``; ``visible`` (R or 1, BLOCK_N)
    masks the scores (causal, window). Scores are in the log2 domain (``qk_scale``
    includes log2(e)). m_i starts finite, so a fully masked tile adds exp2(-inf) = 0.
    """
    block = tl.load(table + pos // PAGE_SIZE, mask=in_range, other=0).to(tl.int64)
    row = block * stride_kb + (pos % PAGE_SIZE) * stride_ks + kv_head * stride_kh  # (BLOCK_N,)
    kv_mask = in_range[:, None] & d_mask[None, :]
    k = tl.load(kv_cache_ptr + row[:, None] + offs_d[None, :], mask=kv_mask, other=0.0).to(q.dtype)
    # NOTE: input_precision="ieee" only matters for fp32 inputs (no TF32 for fp32 models);
    # 16-bit inputs still use the tensor cores / matrix cores.
    s = tl.dot(q, tl.trans(k), input_precision="ieee") * qk_scale  # (R, BLOCK_N)
    s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    v = tl.load(kv_cache_ptr + stride_kv + row[:, None] + offs_d[None, :], mask=kv_mask,
                other=0.0).to(q.dtype)
    acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v, input_precision="ieee")  # (R, D)
    return acc, m_new, l_i
