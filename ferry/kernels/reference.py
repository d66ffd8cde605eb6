"""PyTorch reference kernels: the CPU path and the oracle for the Triton kernels.

Every function here has a Triton twin with EXACTLY the same signature and semantics;
``ferry/kernels/__init__.py`` picks one of the two. Keep these simple and correct first,
then reasonably fast on the CPU (batched decodes, one attention call per prefill chunk).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ferry.kernels.attn_metadata import AttentionMetadata
from ferry.kernels.checks import check_paged_attention_args
from ferry.kernels.quant_reference import (bf16_weight_linear, wna16_linear,  # noqa: F401  (dispatched ops)
                                           wna16_linear_a8)


def write_kv_cache(key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
                   slot_mapping: torch.Tensor) -> None:
    """Store the new tokens' keys and values into the paged cache, in place.

    key, value: (T, Hkv, D); kv_cache: (2, num_blocks, block_size, Hkv, D);
    slot_mapping: (T,) int64, ``block_id * block_size + offset``. Slots < 0 are padding
    tokens and are skipped.
    """
    num_kv_heads, head_dim = kv_cache.shape[-2:]
    flat_keys = kv_cache[0].view(-1, num_kv_heads, head_dim)      # (num_slots, Hkv, D)
    flat_values = kv_cache[1].view(-1, num_kv_heads, head_dim)    # (num_slots, Hkv, D)
    valid = slot_mapping >= 0                                       # (T,)
    slots = slot_mapping[valid]
    flat_keys[slots] = _to_cache_dtype(key[valid], kv_cache.dtype)
    flat_values[slots] = _to_cache_dtype(value[valid], kv_cache.dtype)


def _to_cache_dtype(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x in the cache's dtype; into float8 saturating at its largest finite value (an
    out-of-range cast would be NaN on some devices)."""
    if dtype.is_floating_point and dtype.itemsize == 1:
        fmax = torch.finfo(dtype).max
        return x.float().clamp(-fmax, fmax).to(dtype)
    return x.to(dtype)


def paged_attention(query: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata,
                    scale: float, sliding_window: int | None = None) -> torch.Tensor:
    """Causal attention of the batch's new tokens over the paged KV cache.

    query: (T, H, D) with H a multiple of Hkv (GQA). The keys and values of the new tokens
    must already be in the cache (``write_kv_cache``). Query i of a sequence with
    ``seq_len`` tokens and ``query_len`` new ones sits at position
    ``p = seq_len - query_len + i`` and sees the keys at positions ``j <= p``, and with a
    sliding window W only those with ``j > p - W`` (HF/Mistral semantics: W keys including
    itself). Computed in float32, returned in the query's dtype as (T, H, D). Rows past
    ``query_start_loc[-1]`` (padding) are zero.
    """
    check_paged_attention_args(query, kv_cache, meta, sliding_window)
    output = torch.zeros_like(query)
    num_decodes = meta.num_decodes
    if num_decodes:
        output[:num_decodes] = _decode_attention(query[:num_decodes], kv_cache, meta, scale,
                                                 sliding_window)
    start = num_decodes  # decodes contribute one token each
    for seq in range(num_decodes, meta.num_seqs):
        query_len = meta.query_lens_cpu[seq]
        end = start + query_len
        output[start:end] = _prefill_attention(query[start:end], kv_cache, meta, seq, scale,
                                               sliding_window)
        start = end
    return output


def _first_visible_position(seq_len: int, query_len: int, sliding_window: int | None) -> int:
    """Lowest key position any of the sequence's queries can see."""
    if sliding_window is None:
        return 0
    return max(0, seq_len - query_len + 1 - sliding_window)


def _gather_blocks(kv_cache: torch.Tensor, block_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values of the given blocks, flattened per sequence.

    block_ids: (B, nb) -> keys, values (B, nb * block_size, Hkv, D).
    """
    batch, num_blocks = block_ids.shape
    block_size, num_kv_heads, head_dim = kv_cache.shape[2:]
    ids = block_ids.reshape(-1).long()
    # index_select copies whole blocks (one memcpy each): ~3x faster than fancy indexing.
    keys = kv_cache[0].index_select(0, ids).view(batch, num_blocks * block_size, num_kv_heads, head_dim)
    values = kv_cache[1].index_select(0, ids).view(batch, num_blocks * block_size, num_kv_heads, head_dim)
    return keys, values


def _visible(query_positions: torch.Tensor, key_positions: torch.Tensor,
             sliding_window: int | None) -> torch.Tensor:
    """(Q,) query and (K,) key positions -> (Q, K) bool: causal, and within the window."""
    visible = key_positions[None, :] <= query_positions[:, None]
    if sliding_window is not None:
        visible &= key_positions[None, :] > query_positions[:, None] - sliding_window
    return visible


def _decode_attention(query: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata,
                      scale: float, sliding_window: int | None) -> torch.Tensor:
    """All decodes (one query each), batched. query: (B, H, D).

    Gathering K/V pads every sequence to the longest one in its batch, and the copy is
    most of the CPU time: sequences of similar length are batched together instead.
    """
    seq_lens_cpu = meta.seq_lens_cpu[:query.shape[0]]
    output = torch.empty_like(query)
    for rows in _length_buckets(seq_lens_cpu):
        index = torch.tensor(rows, device=query.device)
        output[index] = _decode_group(
            query[index], kv_cache, meta.block_tables[index], meta.seq_lens[index],
            [seq_lens_cpu[r] for r in rows], meta.block_size, scale, sliding_window)
    return output


def _length_buckets(seq_lens: list[int], min_fill: float = 0.6) -> list[list[int]]:
    """Rows grouped so that each group's shortest is at least ``min_fill`` of its longest."""
    order = sorted(range(len(seq_lens)), key=lambda r: -seq_lens[r])
    buckets: list[list[int]] = []
    for row in order:
        if buckets and seq_lens[row] >= min_fill * seq_lens[buckets[-1][0]]:
            buckets[-1].append(row)
        else:
            buckets.append([row])
    return buckets


def _decode_group(query: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
                  seq_lens: torch.Tensor, seq_lens_cpu: list[int], block_size: int,
                  scale: float, sliding_window: int | None) -> torch.Tensor:
    """Decode attention for one group of sequences. query: (B, H, D)."""
    batch, num_heads, head_dim = query.shape
    num_kv_heads = kv_cache.shape[3]
    group = num_heads // num_kv_heads
    # Only gather the blocks some sequence can see: from the lowest visible block up.
    first_block = min(_first_visible_position(n, 1, sliding_window) for n in seq_lens_cpu) // block_size
    last_block = (max(seq_lens_cpu) + block_size - 1) // block_size
    keys, values = _gather_blocks(kv_cache, block_tables[:, first_block:last_block])
    # keys, values: (B, L, Hkv, D) covering positions first_block * block_size + [0, L)
    key_positions = first_block * block_size + torch.arange(keys.shape[1], device=query.device)
    query_positions = seq_lens.to(device=query.device, dtype=torch.long) - 1      # (B,)
    visible = _visible(query_positions, key_positions, sliding_window)          # (B, L)
    # NOTE: slots past a sequence's end hold whatever the cache had. Masking makes any
    # finite junk harmless, but a NaN would survive as 0 * NaN: the cache must be
    # allocated zeroed (the runner does) so that it only ever holds finite values.
    keys, values = keys.float(), values.float()
    # One fused SDPA call: the G query heads of a KV head act as G query rows.
    out = F.scaled_dot_product_attention(
        query.float().view(batch, num_kv_heads, group, head_dim),  # (B, Hkv, G, D)
        keys.transpose(1, 2),                                        # (B, Hkv, L, D)
        values.transpose(1, 2),                                      # (B, Hkv, L, D)
        attn_mask=visible[:, None, None, :], scale=scale,
    )                                                                # (B, Hkv, G, D)
    return out.reshape(batch, num_heads, head_dim).to(query.dtype)


def _prefill_attention(query: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata,
                       seq: int, scale: float, sliding_window: int | None) -> torch.Tensor:
    """One prefill chunk (possibly on top of a cached prefix). query: (L, H, D)."""
    query_len, num_heads, head_dim = query.shape
    seq_len = meta.seq_lens_cpu[seq]
    block_size = meta.block_size
    first_block = _first_visible_position(seq_len, query_len, sliding_window) // block_size
    last_block = (seq_len + block_size - 1) // block_size
    keys, values = _gather_blocks(kv_cache, meta.block_tables[seq:seq + 1, first_block:last_block])
    start = first_block * block_size
    keys = keys[0, :seq_len - start]                                                   # (S, Hkv, D)
    values = values[0, :seq_len - start]                                               # (S, Hkv, D)
    key_positions = start + torch.arange(keys.shape[0], device=query.device)          # (S,)
    query_positions = seq_len - query_len + torch.arange(query_len, device=query.device)  # (L,)
    visible = _visible(query_positions, key_positions, sliding_window)               # (L, S)
    out = F.scaled_dot_product_attention(
        query.float().transpose(0, 1),          # (H, L, D)
        keys.float().transpose(0, 1),           # (Hkv, S, D)
        values.float().transpose(0, 1),         # (Hkv, S, D)
        attn_mask=visible, scale=scale, enable_gqa=True,
    )                                           # (H, L, D)
    return out.transpose(0, 1).to(query.dtype)


def dense_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x W^T + b for an unquantized weight: ``F.linear`` (the vendor BLAS)."""
    return F.linear(x, weight, bias)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * x / sqrt(mean(x^2) + eps), normalised in float32 (as HF Llama). x: (..., D)."""
    x32 = x.float()
    normed = x32 * torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + eps)
    return weight * normed.to(x.dtype)


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                       eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Residual add then RMSNorm: returns (rms_norm(x + residual), x + residual)."""
    summed = x + residual
    return rms_norm(summed, weight, eps), summed


def apply_rotary(query: torch.Tensor, key: torch.Tensor, positions: torch.Tensor,
                 cos_sin_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Neox-style rotary embedding (HF Llama's rotate_half), returning new tensors.

    query (T, H, D), key (T, Hkv, D), positions (T,) int64,
    cos_sin_cache (max_pos, D) = cat(cos, sin), each of D/2 frequencies.
    """
    half = cos_sin_cache.shape[-1] // 2
    cos_sin = cos_sin_cache[positions].to(query.dtype)      # (T, D)
    cos = cos_sin[:, None, :half]                           # (T, 1, D/2)
    sin = cos_sin[:, None, half:]                           # (T, 1, D/2)
    return _rotate(query, cos, sin), _rotate(key, cos, sin)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]                   # (T, H, D/2) each
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """(T, 2I) -> silu(x[:, :I]) * x[:, I:], the SwiGLU gate."""
    inter = x.shape[-1] // 2
    return F.silu(x[..., :inter]) * x[..., inter:]


from ferry.kernels.lora_reference import lora_expand, lora_shrink  # noqa: E402,F401  (LoRA ops)


def apply_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor,
                        rows: torch.Tensor | None = None) -> torch.Tensor:
    """Structured output's mask: a new (N, V) float tensor where the logits of tokens that
    mask row i forbids are -inf in logits row ``rows[i]`` (row i when ``rows`` is None).

    bitmask: (C, W) int32 on the logits' device, bit ``t % 32`` of word ``t // 32`` set
    when token t is allowed. A row left with no finite logit (an earlier processor removed
    every allowed token, e.g. ``min_tokens`` banning the EOS the grammar needs) gets 0 for
    its allowed tokens instead: the grammar always wins, and no host sync.
    """
    masked_rows = logits.shape[0] if rows is None else rows.numel()
    if bitmask.dim() != 2 or bitmask.shape[0] != masked_rows:
        raise ValueError(f"apply_token_bitmask: {bitmask.shape[0]} mask rows for "
                         f"{masked_rows} logits rows")
    allowed = unpack_bitmask(bitmask, logits.shape[1])             # (C, V)
    picked = logits if rows is None else logits[rows]               # (C, V)
    masked = picked.masked_fill(~allowed, float("-inf"))
    empty = torch.isneginf(masked).all(dim=-1, keepdim=True)        # (C, 1)
    masked = torch.where(empty & allowed, torch.zeros((), device=logits.device), masked)
    return masked if rows is None else logits.index_copy(0, rows, masked)


_BIT_SHIFTS: dict[torch.device, torch.Tensor] = {}


def unpack_bitmask(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """(C, W) int32 -> (C, V) bool: bit ``t % 32`` of word ``t // 32`` is token ``t``."""
    device = bitmask.device
    shifts = _BIT_SHIFTS.get(device)
    if shifts is None:
        shifts = _BIT_SHIFTS[device] = torch.arange(32, dtype=torch.int32, device=device)
    bits = (bitmask.unsqueeze(-1) >> shifts) & 1  # (C, W, 32)
    return bits.view(bitmask.shape[0], -1)[:, :vocab_size].bool()  # (C, V)
