"""The PyTorch reference kernels against straightforward dense computations and HF.

paged_attention is checked against a naive per-sequence attention over the full K/V
(explicit causal + sliding-window mask, GQA by repeating KV heads), with ragged lengths,
non-contiguous shuffled blocks, block-boundary lengths and prefix + chunk batches.
"""
from __future__ import annotations

import math

import pytest
import torch

from ferry.kernels import reference as ref
from paged_helpers import BlockAllocator, make_kv_caches, make_metadata

HEAD_DIM = 8
NUM_BLOCKS = 64


def naive_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, first_pos: int,
                    scale: float, window: int | None) -> torch.Tensor:
    """q (L, H, D) at positions first_pos + i over all keys k, v (S, Hkv, D); float64."""
    group = q.shape[1] // k.shape[1]
    k = k.double().repeat_interleave(group, dim=1)               # (S, H, D)
    v = v.double().repeat_interleave(group, dim=1)
    out = torch.empty(q.shape, dtype=torch.float64)
    for i in range(q.shape[0]):
        p = first_pos + i
        lo = 0 if window is None else max(0, p - window + 1)
        scores = torch.einsum("hd,shd->hs", q[i].double(), k[lo:p + 1]) * scale   # (H, n)
        out[i] = torch.einsum("hs,shd->hd", scores.softmax(-1), v[lo:p + 1])
    return out


def run_batch(computed: list[int], new: list[int], num_heads: int, num_kv_heads: int,
              block_size: int, window: int | None, dtype=torch.float32, seed: int = 0):
    """Random K/V for every sequence, cached through write_kv_cache in two steps (prefix,
    then the new tokens), and paged_attention over the new tokens vs the naive oracle."""
    gen = torch.Generator().manual_seed(seed)
    alloc = BlockAllocator(NUM_BLOCKS, block_size, seed=seed)
    cache = make_kv_caches(1, NUM_BLOCKS, block_size, num_kv_heads, HEAD_DIM, dtype, seed)[0]
    totals = [c + n for c, n in zip(computed, new)]
    keys = [torch.randn(t, num_kv_heads, HEAD_DIM, generator=gen).to(dtype) for t in totals]
    values = [torch.randn(t, num_kv_heads, HEAD_DIM, generator=gen).to(dtype) for t in totals]
    queries = [torch.randn(n, num_heads, HEAD_DIM, generator=gen).to(dtype) for n in new]
    blocks = [alloc.grow(i, t) for i, t in enumerate(totals)]
    for lens, start_of in ((computed, lambda i: 0), (new, lambda i: computed[i])):
        present = [i for i, n in enumerate(lens) if n]   # write prefixes, then the new tokens
        if not present:
            continue
        meta, _ = make_metadata([blocks[i] for i in present], [start_of(i) for i in present],
                                [lens[i] for i in present], block_size)
        k = torch.cat([keys[i][start_of(i):start_of(i) + lens[i]] for i in present])
        v = torch.cat([values[i][start_of(i):start_of(i) + lens[i]] for i in present])
        ref.write_kv_cache(k, v, cache, meta.slot_mapping)
    meta, _ = make_metadata(blocks, computed, new, block_size)
    scale = HEAD_DIM ** -0.5
    out = ref.paged_attention(torch.cat(queries), cache, meta, scale, window)
    expected = torch.cat([naive_attention(q, k, v, c, scale, window)
                          for q, k, v, c in zip(queries, keys, values, computed)])
    return out, expected


@pytest.mark.parametrize("num_heads,num_kv_heads", [(4, 4), (4, 2), (8, 2)])
@pytest.mark.parametrize("window", [None, 3, 8])
def test_mixed_batch_matches_naive(num_heads, num_kv_heads, window):
    # three decodes (ragged, one exactly on a block boundary), then prefills: fresh,
    # on top of a cached prefix, and a prefix ending mid-block
    computed = [4, 9, 15, 0, 8, 5]
    new = [1, 1, 1, 11, 8, 6]
    out, expected = run_batch(computed, new, num_heads, num_kv_heads, block_size=4, window=window)
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("block_size", [1, 3, 16])
@pytest.mark.parametrize("seq_len", [1, 15, 16, 17, 32])
def test_block_boundaries(block_size, seq_len):
    for computed in sorted({0, seq_len // 2, seq_len - 1}):
        out, expected = run_batch([seq_len - 1, computed], [1, seq_len - computed], 4, 2,
                                  block_size, window=None, seed=seq_len)
        torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)


def test_decodes_only_and_prefills_only():
    out, expected = run_batch([3, 20, 7], [1, 1, 1], 4, 2, 4, window=5)
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)
    out, expected = run_batch([0, 12], [9, 3], 4, 1, 4, window=None)
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)


def test_window_of_one_sees_only_itself():
    out, expected = run_batch([6, 0], [1, 5], 2, 2, 4, window=1)
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)


def test_bfloat16_close_to_float64():
    out, expected = run_batch([5, 0, 9], [1, 13, 4], 4, 2, 4, window=None, dtype=torch.bfloat16)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), expected, atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize("junk", [0.0, 1e4, -1e4])
def test_junk_in_unused_cache_slots_does_not_leak(junk):
    """Padded block-table entries point at block 0; whatever it holds must not count."""
    block_size, num_kv_heads = 4, 2
    cache = torch.full((2, 8, block_size, num_kv_heads, HEAD_DIM), junk)
    k = torch.randn(5, num_kv_heads, HEAD_DIM)
    v = torch.randn(5, num_kv_heads, HEAD_DIM)
    # two decodes: 5 and 2 tokens; the short one's table is padded with block 0 (NaN junk)
    meta, _ = make_metadata([[3, 6], [1]], [0, 0], [5, 2], block_size)
    ref.write_kv_cache(torch.cat([k, k[:2]]), torch.cat([v, v[:2]]), cache, meta.slot_mapping)
    decode_meta, _ = make_metadata([[3, 6], [1]], [4, 1], [1, 1], block_size)
    query = torch.randn(2, 4, HEAD_DIM, generator=torch.Generator().manual_seed(0))
    out = ref.paged_attention(query, cache, decode_meta, 0.3)
    for row, n in enumerate([5, 2]):  # dense attention over the tokens actually written
        keys = (k if n == 5 else k[:2]).repeat_interleave(2, dim=1).transpose(0, 1)  # (H, n, D)
        vals = (v if n == 5 else v[:2]).repeat_interleave(2, dim=1).transpose(0, 1)
        probs = torch.softmax(query[row][:, None, :] @ keys.transpose(1, 2) * 0.3, dim=-1)
        torch.testing.assert_close(out[row], (probs @ vals)[:, 0], atol=1e-5, rtol=1e-5)


def test_write_kv_cache_places_tokens_and_skips_padding():
    block_size, num_kv_heads = 4, 2
    cache = torch.zeros(2, 6, block_size, num_kv_heads, HEAD_DIM)
    key = torch.randn(4, num_kv_heads, HEAD_DIM)
    value = torch.randn(4, num_kv_heads, HEAD_DIM)
    slots = torch.tensor([9, -1, 22, 3])     # block 2 off 1, padding, block 5 off 2, block 0 off 3
    ref.write_kv_cache(key, value, cache, slots)
    expected = torch.zeros_like(cache)
    for token, (block, offset) in {0: (2, 1), 2: (5, 2), 3: (0, 3)}.items():
        expected[0, block, offset] = key[token]
        expected[1, block, offset] = value[token]
    torch.testing.assert_close(cache, expected, atol=0, rtol=0)


def test_padding_rows_are_zero():
    block_size = 4
    cache = make_kv_caches(1, 8, block_size, 2, HEAD_DIM)[0]
    meta, _ = make_metadata([[5, 2]], [0], [6], block_size)
    query = torch.randn(8, 4, HEAD_DIM)   # 6 real tokens + 2 padding rows
    out = ref.paged_attention(query, cache, meta, 0.5)
    assert out.shape == query.shape
    assert torch.equal(out[6:], torch.zeros(2, 4, HEAD_DIM))


def test_bad_inputs_raise_value_error():
    cache = make_kv_caches(1, 4, 4, 3, HEAD_DIM)[0]
    meta, _ = make_metadata([[0]], [0], [2], 4)
    with pytest.raises(ValueError, match="multiple"):
        ref.paged_attention(torch.randn(2, 4, HEAD_DIM), cache, meta, 1.0)
    with pytest.raises(ValueError, match="sliding_window"):
        ref.paged_attention(torch.randn(2, 3, HEAD_DIM), cache, meta, 1.0, sliding_window=0)


# ---- the other reference ops, against HF Llama's modules -------------------------------

def test_rms_norm_matches_hf():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    hf = LlamaRMSNorm(16, eps=1e-5)
    with torch.no_grad():
        hf.weight.copy_(torch.randn(16))
    x, residual = torch.randn(5, 16), torch.randn(5, 16)
    torch.testing.assert_close(ref.rms_norm(x, hf.weight, 1e-5), hf(x))
    normed, summed = ref.fused_add_rms_norm(x, residual, hf.weight, 1e-5)
    torch.testing.assert_close(summed, x + residual)
    torch.testing.assert_close(normed, hf(x + residual))


def test_silu_and_mul():
    x = torch.randn(3, 10)
    torch.testing.assert_close(ref.silu_and_mul(x), torch.nn.functional.silu(x[:, :5]) * x[:, 5:])


def test_apply_rotary_matches_hf():
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb
    dim, base = 8, 10000.0
    inv_freq = 1.0 / base ** (torch.arange(0, dim, 2).float() / dim)
    angles = torch.arange(50).float()[:, None] * inv_freq[None, :]         # (P, D/2)
    cache = torch.cat([angles.cos(), angles.sin()], dim=-1)                # (P, D)
    positions = torch.tensor([0, 7, 3, 49])
    q, k = torch.randn(4, 4, dim), torch.randn(4, 2, dim)
    emb = torch.cat([angles[positions]] * 2, dim=-1)                       # (T, D)
    hf_q, hf_k = apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None],
                                      emb.cos()[None], emb.sin()[None])
    got_q, got_k = ref.apply_rotary(q, k, positions, cache)
    torch.testing.assert_close(got_q, hf_q[0].transpose(0, 1))
    torch.testing.assert_close(got_k, hf_k[0].transpose(0, 1))
    assert not math.isclose(float((got_q - q).abs().max()), 0.0)
