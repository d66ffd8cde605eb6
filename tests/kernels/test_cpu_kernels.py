"""The C++ CPU kernels (ferry/kernels/cpu/) against the naive oracle and the PyTorch reference.

They are built on first use with the system compiler. Where there is no compiler the
kernels cannot exist and these tests skip; where there is one, a failed build fails them.
"""
from __future__ import annotations

import logging
import random
import subprocess
import sys

import pytest
import torch

import ferry.kernels
from attention_cases import (BLOCK, MIXED_QUERY_LENS, MIXED_SEQ_LENS, check, make_batch,
                             naive_attention)
from ferry.kernels import cpu, reference
from ferry.kernels.cpu import build

if build.find_compiler() is None:
    pytest.skip("no C++ compiler: the CPU kernels cannot be built here", allow_module_level=True)


def test_library_builds_and_is_dispatched_for_cpu_tensors():
    assert cpu.available(), "a compiler is present but the CPU kernels did not build (see the log)"
    assert ferry.kernels._ops_for(torch.zeros(1)) is cpu
    for name in ferry.kernels.OP_NAMES:   # every dispatched op has its C++-path twin
        assert callable(getattr(cpu, name)) and callable(getattr(reference, name))


# --------------------------------------------------------------------- paged attention
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_heads,num_kv_heads", [(2, 2), (6, 2), (8, 1)])
@pytest.mark.parametrize("head_dim", [64, 128, 24])   # unrolled 64 and 128, generic 24
def test_mixed_batch_matches_naive(dtype, num_heads, num_kv_heads, head_dim):
    meta, cache = make_batch(MIXED_QUERY_LENS, MIXED_SEQ_LENS, num_kv_heads, head_dim, dtype, "cpu")
    query = torch.randn(sum(MIXED_QUERY_LENS), num_heads, head_dim,
                        generator=torch.Generator().manual_seed(1)).to(dtype)
    out = cpu.paged_attention(query, cache, meta, head_dim ** -0.5)
    assert out.dtype == dtype and out.shape == query.shape
    check(out, naive_attention(query, cache, meta, head_dim ** -0.5, None), dtype)


@pytest.mark.parametrize("window", [1, 3, BLOCK, 9, 40])
def test_sliding_window(window):
    meta, cache = make_batch(MIXED_QUERY_LENS, MIXED_SEQ_LENS, 2, 64, torch.float32, "cpu", seed=2)
    query = torch.randn(sum(MIXED_QUERY_LENS), 4, 64)
    out = cpu.paged_attention(query, cache, meta, 0.125, sliding_window=window)
    check(out, naive_attention(query, cache, meta, 0.125, window), torch.float32)


@pytest.mark.parametrize("window", [None, 21])
def test_long_chunk_on_prefix_spans_query_tiles(window):
    """40 new tokens on a 35-token prefix, 16-token blocks: three query tiles whose rows
    see different key ranges, with block boundaries inside every tile."""
    meta, cache = make_batch([1, 40], [70, 75], 2, 64, torch.float32, "cpu", seed=3, block_size=16)
    query = torch.randn(41, 6, 64)
    check(cpu.paged_attention(query, cache, meta, 0.125, window),
          naive_attention(query, cache, meta, 0.125, window), torch.float32)


def test_long_context_uses_smaller_query_tiles():
    """32 heads over 20,000 positions: the kernel cuts its query tiles (to bound its score
    buffers), which must not change the result."""
    meta, cache = make_batch([1, 20], [20_000, 20_000], 1, 64, torch.float32, "cpu", seed=9,
                             block_size=16)
    query = torch.randn(21, 32, 64)
    torch.testing.assert_close(cpu.paged_attention(query, cache, meta, 0.125),
                               reference.paged_attention(query, cache, meta, 0.125),
                               atol=1e-5, rtol=1e-5)


def test_random_ragged_batches_match_reference():
    """Many random mixes of decodes and chunks; the reference path is the oracle."""
    rng = random.Random(4)
    for trial in range(12):
        num = rng.randint(1, 9)
        query_lens = sorted((rng.choice([1, 1, 1, rng.randint(1, 30)]) for _ in range(num)),
                            key=lambda n: n != 1)
        seq_lens = [q + rng.randint(0, 50) for q in query_lens]
        meta, cache = make_batch(query_lens, seq_lens, 2, 64, torch.float32, "cpu", seed=trial,
                                 block_size=rng.choice([4, 16]))
        query = torch.randn(sum(query_lens), 4, 64)
        window = rng.choice([None, None, rng.randint(1, 30)])
        torch.testing.assert_close(cpu.paged_attention(query, cache, meta, 0.125, window),
                                   reference.paged_attention(query, cache, meta, 0.125, window),
                                   atol=1e-5, rtol=1e-5)


def test_strided_query_and_padding_rows():
    meta, cache = make_batch([1, 4], [6, 4], 2, 64, torch.float32, "cpu", seed=7)
    qkv = torch.randn(5 + 2, 4 * 64 + 2 * 2 * 64)                  # 2 padding tokens
    query = qkv[:, :256].view(7, 4, 64)
    out = cpu.paged_attention(query, cache, meta, 0.125)
    check(out[:5], naive_attention(query[:5], cache, meta, 0.125, None), torch.float32)
    assert torch.count_nonzero(out[5:]) == 0


def test_float16_falls_back_to_the_reference():
    meta, cache = make_batch([1, 3], [9, 6], 2, 32, torch.float16, "cpu", seed=8)
    query = torch.randn(4, 4, 32).to(torch.float16)
    check(cpu.paged_attention(query, cache, meta, 0.2),
          naive_attention(query, cache, meta, 0.2, None), torch.float16)


def test_invalid_arguments_raise_value_error():
    meta, cache = make_batch([1], [3], 2, 16, torch.float32, "cpu")
    with pytest.raises(ValueError, match="sliding_window"):
        cpu.paged_attention(torch.randn(1, 4, 16), cache, meta, 1.0, sliding_window=0)
    with pytest.raises(ValueError, match="multiple"):
        cpu.paged_attention(torch.randn(1, 3, 16), cache, meta, 1.0)
    with pytest.raises(ValueError, match="head dim"):
        cpu.paged_attention(torch.randn(1, 4, 32), cache, meta, 1.0)
    meta.seq_lens_cpu = [40]                         # more positions than the table covers
    with pytest.raises(ValueError, match="block_tables"):
        cpu.paged_attention(torch.randn(1, 4, 16), cache, meta, 1.0)


# --------------------------------------------------------------------- row-wise ops
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}
DTYPES = [torch.float32, torch.bfloat16]


def _qkv(tokens: int, dtype, heads=6, kv_heads=2, dim=64):
    """q, k, v as views into one fused projection output, like the model makes them."""
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * dim, generator=torch.Generator().manual_seed(5))
    q, k, v = qkv.to(dtype).split([heads * dim, kv_heads * dim, kv_heads * dim], dim=-1)
    return (q.view(tokens, heads, dim), k.view(tokens, kv_heads, dim), v.view(tokens, kv_heads, dim))


def _close(actual, expected, dtype):
    torch.testing.assert_close(actual, expected, atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens", [1, 7, 400])   # 400 x 384: large enough to run in parallel
def test_norms_match_reference(dtype, tokens):
    x, residual = torch.randn(tokens, 384).to(dtype), torch.randn(tokens, 384).to(dtype)
    weight = torch.randn(384).to(dtype)
    _close(cpu.rms_norm(x, weight, 1e-6), reference.rms_norm(x, weight, 1e-6), dtype)
    for got, want in zip(cpu.fused_add_rms_norm(x, residual, weight, 1e-6),
                         reference.fused_add_rms_norm(x, residual, weight, 1e-6)):
        _close(got, want, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_over_heads_of_a_strided_view(dtype):
    """q-norm (Qwen3) normalises (T, H, D) views of qkv: rows that are not uniformly
    strided (the kernel gets a contiguous copy), and the input is left as it was."""
    q, _, _ = _qkv(5, dtype)
    before = q.clone()
    weight = torch.randn(64).to(dtype)
    _close(cpu.rms_norm(q, weight, 1e-6), reference.rms_norm(q, weight, 1e-6), dtype)
    assert torch.equal(q, before)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rotary_matches_reference_on_views(dtype):
    q, k, _ = _qkv(9, dtype)
    positions = torch.tensor([0, 1, 5, 17, 3, 99, 100, 2, 64])
    cos_sin = torch.randn(128, 64)
    for got, want in zip(cpu.apply_rotary(q, k, positions, cos_sin),
                         reference.apply_rotary(q, k, positions, cos_sin)):
        _close(got, want, dtype)
    with pytest.raises(IndexError):
        cpu.apply_rotary(q, k, positions + 100, cos_sin)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens", [1, 13, 300])
def test_silu_and_mul_matches_reference(dtype, tokens):
    x = (3 * torch.randn(tokens, 2 * 1024)).to(dtype)
    _close(cpu.silu_and_mul(x), reference.silu_and_mul(x), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_write_kv_cache_matches_reference(dtype):
    _, k, v = _qkv(7, dtype)
    ours, theirs = torch.zeros(2, 4, 16, 2, 64, dtype=dtype), torch.zeros(2, 4, 16, 2, 64, dtype=dtype)
    slots = torch.tensor([0, 17, -1, 63, 5, 6, 40])
    cpu.write_kv_cache(k, v, ours, slots)
    reference.write_kv_cache(k, v, theirs, slots)
    assert torch.equal(ours, theirs)
    with pytest.raises((IndexError, RuntimeError)):      # never a write out of bounds
        cpu.write_kv_cache(k, v, ours, slots[:3])


def test_mismatched_shapes_never_reach_the_kernels():
    """What the C++ side cannot take safely goes to the reference, which raises."""
    x = torch.randn(3, 8)
    with pytest.raises(RuntimeError):
        cpu.rms_norm(x, torch.randn(4), 1e-6)
    with pytest.raises(RuntimeError):
        cpu.fused_add_rms_norm(x, x, torch.randn(4), 1e-6)
    with pytest.raises(RuntimeError):
        cpu.apply_rotary(torch.randn(3, 2, 8), torch.randn(3, 1, 8), torch.tensor([0, 1]),
                         torch.randn(16, 8))


# --------------------------------------------------------------------- build and dispatch
def test_disabled_or_without_a_compiler_the_reference_runs(monkeypatch, caplog):
    build.load_library.cache_clear()
    try:
        monkeypatch.setenv("FERRY_CPU_KERNELS", "0")
        assert build.load_library() is None
        build.load_library.cache_clear()
        monkeypatch.delenv("FERRY_CPU_KERNELS")
        monkeypatch.setattr(build, "find_compiler", lambda: None)
        with caplog.at_level(logging.WARNING):
            assert build.load_library() is None
        assert "No C++ compiler" in caplog.text
    finally:
        build.load_library.cache_clear()


def test_a_failing_build_is_reported_not_raised(monkeypatch, tmp_path, caplog):
    """A compiler that fails (here: one that does not understand the flags) leaves the
    reference path running and says why."""
    fake = tmp_path / "fake-cxx"
    fake.write_text("#!/bin/sh\necho 'unknown flag' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("FERRY_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(build, "find_compiler", lambda: str(fake))
    build.load_library.cache_clear()
    try:
        with caplog.at_level(logging.WARNING):
            assert build.load_library() is None
        assert "unknown flag" in caplog.text
        assert not list((tmp_path / "cache").rglob("*.so"))    # no half-written library
    finally:
        build.load_library.cache_clear()


def test_build_is_cached_by_source(monkeypatch, tmp_path):
    monkeypatch.setenv("FERRY_CACHE_DIR", str(tmp_path))
    build.load_library.cache_clear()
    try:
        assert build.load_library() is not None
        built = list((tmp_path / "cpu_kernels").glob("*.so"))
        assert len(built) == 1
        build.load_library.cache_clear()
        assert build.load_library() is not None                 # loaded, not rebuilt
        assert list((tmp_path / "cpu_kernels").glob("*.so")) == built
    finally:
        build.load_library.cache_clear()


# --------------------------------------------------------------------- whole engine

@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen3"])   # + sliding window, q/k norm
def test_engine_greedy_matches_hf_on_both_cpu_paths(tmp_path, monkeypatch, arch):
    """The engine's default CPU path (these kernels) and the pure reference path give HF's
    greedy tokens: prefill, chunked prefill on a cached prefix, and decode."""
    from ferry import LLM, SamplingParams
    from hf_reference import assert_greedy_matches, hf_greedy
    from tiny_models import make_tiny_model

    model_dir = str(make_tiny_model(arch, tmp_path / arch))
    rng = random.Random(0)
    prefix = [rng.randrange(3, 256) for _ in range(20)]
    prompts = [prefix + [rng.randrange(3, 256) for _ in range(n)] for n in (3, 25, 9)]
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)

    def greedy():
        llm = LLM(model_dir, dtype="float32", kv_cache_memory="16MiB", max_num_batched_tokens=16)
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        return [o.outputs[0].token_ids for o in outs]

    with_kernels = greedy()
    for name in ferry.kernels.OP_NAMES:
        monkeypatch.setattr(ferry.kernels, name, getattr(reference, name))
    with_reference = greedy()
    for prompt, ours, theirs in zip(prompts, with_kernels, with_reference):
        expected = hf_greedy(model_dir, prompt, 8)
        assert_greedy_matches(ours, expected, arch)
        assert_greedy_matches(theirs, expected, arch)


def test_loading_the_kernels_keeps_subnormals_in_this_process():
    """The library must not switch the process to flush-to-zero (crtfastmath.o does)."""
    code = ("import torch, ferry.kernels.cpu as c; assert c.available(); "
            "print(torch.tensor(1e-40).item() != 0.0)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True,
                         text=True, timeout=300)
    assert out.stdout.strip().splitlines()[-1] == "True", out.stdout + out.stderr
