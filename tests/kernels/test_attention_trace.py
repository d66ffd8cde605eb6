"""The attention trace op (ferry/kernels/attention_trace.py) against HF transformers'
eager attention weights (``output_attentions=True``) on tiny random models.

ferry runs a prompt and greedy decode steps (chunked prefill included) on the C++ CPU
kernels or on the PyTorch reference; at every attention call the trace op reads that
call's query and paged KV cache. For every layer, head and position (prompt tokens and
the generated tokens fed back), the entropy and the top-k weights must equal those of HF's
attention probabilities within 1e-4 (float32), and each top-k position must carry in HF
the weight ferry reports (ties may order differently). On the C++ backend the trace is the
C++ kernel's (ferry/kernels/cpu/csrc/attention_trace.cpp), taken through the dispatch.

Then the C++ kernel against the PyTorch op on random paged caches: float32 and bfloat16,
an FP8 cache (against the op on its dequantized keys), GQA, scattered block tables, sliding
windows, ties (the lower position first in both).
"""
from __future__ import annotations

import random
from collections import defaultdict

import pytest
import torch

import ferry.kernels
from attention_cases import MIXED_QUERY_LENS, MIXED_SEQ_LENS, make_batch
from ferry.kernels import cpu, reference
from ferry.kernels.cpu import build
from ferry.engine.debug_trace import entropy_jumps
from ferry.kernels.attention_trace import TraceRows, attention_trace, rows_of_sequences

TOP_K = 4
ATOL = 1e-4


def _traced_run(model_dir: str, prompt: list[int], max_tokens: int, monkeypatch, backend: str):
    """ferry's greedy tokens and {(layer, position): (entropy (H,), positions, weights)}."""
    from ferry import LLM, SamplingParams

    if backend == "reference":
        for name in ferry.kernels.OP_NAMES:
            monkeypatch.setattr(ferry.kernels, name, getattr(reference, name))
    attend = ferry.kernels.paged_attention
    # The reference backend: the PyTorch op; the C++ one: whatever the dispatch picks (the
    # C++ kernel, which test_trace_matches_hf_eager_attention checks did run).
    trace_op = ((lambda q, kv, meta, scale, rows, window:
                 attention_trace(q, kv, meta, scale, rows, rows.top_k, window))
                if backend == "reference" else ferry.kernels.attention_trace)
    records: dict[tuple[int, int], tuple] = {}
    calls = defaultdict(int)

    def traced(query, kv_cache, meta, scale, sliding_window=None):
        out = attend(query, kv_cache, meta, scale, sliding_window)
        layer = calls["n"] % num_layers
        calls["n"] += 1
        rows = rows_of_sequences(meta, list(range(meta.num_seqs)), include_prompt=True,
                                 top_k=TOP_K)
        trace = trace_op(query, kv_cache, meta, scale, rows, sliding_window)
        for i, position in enumerate(rows.positions):
            records[(layer, position)] = (trace.entropy[i], trace.top_positions[i],
                                          trace.top_weights[i])
        return out

    # The spies wrap the per-layer kernels: keep the layers from the fused decoder stack.
    monkeypatch.setenv("FERRY_CPU_DECODER_STACK", "0")
    llm = LLM(model_dir, dtype="float32", kv_cache_memory="16MiB", max_num_batched_tokens=8,
              enable_prefix_caching=False)
    num_layers = llm.engine.executor.runner.model.num_layers
    monkeypatch.setattr(ferry.kernels, "paged_attention", traced)
    out = llm.generate([{"prompt_token_ids": prompt}],
                       SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True),
                       use_tqdm=False)
    return list(out[0].outputs[0].token_ids), records, num_layers


@torch.inference_mode()
def _hf_attentions(model_dir: str, ids: list[int]) -> list[torch.Tensor]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32,
                                                 attn_implementation="eager").eval()
    out = model(torch.tensor([ids]), output_attentions=True)
    return [a[0].float() for a in out.attentions]                # per layer (H, L, L)


@pytest.mark.parametrize("backend", ["cpp", "reference"])
@pytest.mark.parametrize("arch", ["llama", "mistral"])       # mistral: a sliding window
def test_trace_matches_hf_eager_attention(tiny_model_dir, monkeypatch, backend, arch):
    if backend == "cpp" and not ferry.kernels.prepare(torch.device("cpu")) == "cpu":
        pytest.skip("the C++ CPU kernels are not available here")
    overrides = {"sliding_window": 8} if arch == "mistral" else {}
    model_dir = str(tiny_model_dir(arch, **overrides))
    rng = random.Random(1)
    prompt = [rng.randrange(3, 256) for _ in range(13)]          # two chunks of 8, then decodes
    kernel_calls = _spy_on_cpp_kernel(monkeypatch) if backend == "cpp" else None
    tokens, records, num_layers = _traced_run(model_dir, prompt, 5, monkeypatch, backend)
    if kernel_calls is not None:
        assert len(kernel_calls) == num_layers * 6               # 2 chunks + 4 fed-back tokens
    ids = prompt + tokens[:-1]                                   # the last token is never fed
    attentions = _hf_attentions(model_dir, ids)
    assert len(attentions) == num_layers
    assert sorted(records) == [(layer, p) for layer in range(num_layers) for p in range(len(ids))]
    for (layer, position), (entropy, positions, weights) in records.items():
        probs = attentions[layer][:, position, :position + 1]    # (H, position + 1)
        expected = -(probs * torch.log(probs.clamp_min(1e-30))).sum(-1)
        torch.testing.assert_close(entropy, expected, atol=ATOL, rtol=0)
        k = min(TOP_K, position + 1)
        hf_top = probs.topk(k, dim=-1).values
        torch.testing.assert_close(weights[:, :k], hf_top, atol=ATOL, rtol=0)
        torch.testing.assert_close(probs.gather(1, positions[:, :k]), weights[:, :k],
                                   atol=ATOL, rtol=0)
        assert (positions[:, k:] == -1).all() and (weights[:, k:] == 0).all()
        if arch == "mistral":   # nothing outside the window is ever attended
            assert (positions[:, :k] > position - 8).all()


def test_only_the_rows_asked_for_are_traced():
    from ferry.kernels.attn_metadata import AttentionMetadata

    meta = AttentionMetadata(slot_mapping=torch.zeros(6, dtype=torch.int64),
                             query_start_loc=torch.tensor([0, 1, 6], dtype=torch.int32),
                             seq_lens=torch.tensor([9, 5], dtype=torch.int32),
                             block_tables=torch.tensor([[0, 1], [2, 0]], dtype=torch.int32),
                             query_lens_cpu=[1, 5], seq_lens_cpu=[9, 5], num_decodes=1,
                             block_size=8)
    last = rows_of_sequences(meta, [1])
    assert (last.rows, last.seqs, last.positions) == ([5], [1], [4])
    every = rows_of_sequences(meta, [0, 1], include_prompt=True)
    assert every.rows == [0, 1, 2, 3, 4, 5] and every.positions == [8, 0, 1, 2, 3, 4]
    kv = torch.randn(2, 3, 8, 1, 4)
    query = torch.randn(6, 2, 4)
    trace = attention_trace(query, kv, meta, 0.5, last, top_k=8)
    assert trace.entropy.shape == (1, 2) and trace.top_positions.shape == (1, 2, 8)
    assert (trace.top_positions[0, :, 5:] == -1).all()          # 5 keys visible, k = 8
    torch.testing.assert_close(trace.top_weights.sum(-1), torch.ones(1, 2))


def test_entropy_jumps_flag_the_token_after_the_change():
    assert entropy_jumps([1.0, 1.1, 2.5, 2.4, 0.9], threshold=1.0) == [2, 4]
    assert entropy_jumps([1.0], threshold=0.1) == []


# ------------------------------------------------- the C++ kernel against the PyTorch op
def _cpp_kernels_or_skip() -> None:
    if build.find_compiler() is None or not cpu.available():
        pytest.skip("the C++ CPU kernels are not available here")


def _spy_on_cpp_kernel(monkeypatch) -> list[int]:
    """Counts the calls into the compiled ``ferry_attention_trace`` (each returns its status)."""
    _cpp_kernels_or_skip()
    from ferry.kernels.cpu._lib import functions

    calls: list[int] = []
    kernel = functions().attention_trace
    monkeypatch.setattr(functions(), "attention_trace",
                        lambda *args: calls.append(kernel(*args)) or calls[-1])
    return calls


def _assert_same_trace(got, want, entropy_atol: float = 1e-5) -> None:
    """Entropy and weights within float32 rounding; positions equal wherever the reference's
    weights at neighbouring ranks are not within rounding of each other (a near-tie may
    order either way: there, the kernel's position must carry the reference's weight)."""
    torch.testing.assert_close(got.entropy, want.entropy, atol=entropy_atol, rtol=0)
    torch.testing.assert_close(got.top_weights, want.top_weights, atol=1e-6, rtol=0)
    gaps = want.top_weights.diff(dim=-1).abs()
    near_tie = torch.zeros_like(want.top_weights, dtype=torch.bool)
    near_tie[..., 1:] |= gaps < 1e-6
    near_tie[..., :-1] |= gaps < 1e-6
    assert torch.equal(got.top_positions[~near_tie], want.top_positions[~near_tie])
    assert got.top_positions.dtype == torch.int64 and got.top_weights.dtype == torch.float32


def _all_rows(meta) -> TraceRows:
    return rows_of_sequences(meta, list(range(meta.num_seqs)), include_prompt=True, top_k=5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_heads,num_kv_heads", [(2, 2), (6, 2), (8, 1)])
@pytest.mark.parametrize("window", [None, 3, 9])
def test_cpp_kernel_matches_the_pytorch_op(dtype, num_heads, num_kv_heads, window):
    """Decodes at block-boundary lengths, prompts, chunks on a cached prefix: every row of
    every sequence, blocks scattered over the cache, a row seeing fewer keys than top-k."""
    _cpp_kernels_or_skip()
    meta, cache = make_batch(MIXED_QUERY_LENS, MIXED_SEQ_LENS, num_kv_heads, 24, dtype, "cpu",
                             seed=num_heads + (window or 0))
    query = torch.randn(sum(MIXED_QUERY_LENS), num_heads, 24,
                        generator=torch.Generator().manual_seed(7)).to(dtype)
    rows = _all_rows(meta)
    got = cpu.attention_trace(query, cache, meta, 0.2, rows, rows.top_k, window)
    want = attention_trace(query, cache, meta, 0.2, rows, rows.top_k, window)
    _assert_same_trace(got, want)
    assert (got.top_positions[rows.positions.index(0), :, 1:] == -1).all()   # sees one key


@pytest.mark.parametrize("query_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_heads,num_kv_heads,window", [(2, 2, None), (6, 2, 3), (8, 1, 9)])
def test_cpp_kernel_over_an_fp8_cache_is_the_op_on_its_dequantized_keys(
        monkeypatch, query_dtype, num_heads, num_kv_heads, window):
    """An FP8 (e4m3fn) cache: the FP8 kernel (no fallback to the op) scores the keys widened
    to float32, as the op does on a float32 copy of the dequantized cache."""
    _cpp_kernels_or_skip()
    from ferry.kernels.cpu._lib import functions

    calls: list[int] = []
    kernel = functions().attention_trace_fp8
    monkeypatch.setattr(functions(), "attention_trace_fp8",
                        lambda *args: calls.append(kernel(*args)) or calls[-1])
    meta, cache = make_batch(MIXED_QUERY_LENS, MIXED_SEQ_LENS, num_kv_heads, 24, torch.float32,
                             "cpu", seed=num_heads + (window or 0))
    fp8_cache = (cache * 4).to(torch.float8_e4m3fn)
    query = torch.randn(sum(MIXED_QUERY_LENS), num_heads, 24,
                        generator=torch.Generator().manual_seed(7)).to(query_dtype)
    rows = _all_rows(meta)
    got = ferry.kernels.attention_trace(query, fp8_cache, meta, 0.05, rows, window)
    assert calls == [0]
    _assert_same_trace(got, attention_trace(query, fp8_cache.float(), meta, 0.05, rows,
                                            rows.top_k, window))
    _assert_same_trace(got, attention_trace(query, fp8_cache, meta, 0.05, rows, rows.top_k,
                                            window))   # the op reads fp8 itself too


@pytest.mark.parametrize("head_dim,block_size", [(64, 16), (128, 4)])
def test_cpp_kernel_on_a_long_sequence_and_a_strided_query(head_dim, block_size):
    """A 70-token prefix under 40 new tokens; q a view into a fused qkv projection (the
    layer's layout, read in place); a few chosen rows only, not in batch order."""
    _cpp_kernels_or_skip()
    meta, cache = make_batch([1, 40], [70, 75], 2, head_dim, torch.float32, "cpu", seed=3,
                             block_size=block_size)
    qkv = torch.randn(41, (4 + 2 * 2) * head_dim)
    query = qkv[:, :4 * head_dim].view(41, 4, head_dim)
    assert not query.is_contiguous()
    rows = TraceRows(rows=[40, 0, 3], seqs=[1, 0, 1], positions=[74, 69, 37], top_k=8)
    _assert_same_trace(cpu.attention_trace(query, cache, meta, head_dim ** -0.5, rows, 8, 21),
                       attention_trace(query, cache, meta, head_dim ** -0.5, rows, 8, 21))


def test_ties_list_the_lower_position_first_in_both():
    """A zero query sees every key with the same weight; a block table naming one block
    three times gives each key three equal copies. Both ops list ties by position."""
    _cpp_kernels_or_skip()
    meta, cache = make_batch([1, 1], [9, 12], 2, 8, torch.float32, "cpu", seed=4)
    meta.block_tables[1, :3] = meta.block_tables[1, 0]           # positions p, p+4, p+8 alike
    query = torch.randn(2, 4, 8)
    query[0] = 0
    rows = TraceRows(rows=[0, 1], seqs=[0, 1], positions=[8, 11], top_k=6)
    for op in (cpu.attention_trace, attention_trace):
        trace = op(query, cache, meta, 0.5, rows, 6, None)
        assert trace.top_positions[0].tolist() == [[0, 1, 2, 3, 4, 5]] * 4
        torch.testing.assert_close(trace.top_weights[0], torch.full((4, 6), 1 / 9))
        for head in trace.top_positions[1].tolist():         # three copies of each of 2 keys
            assert sorted(p % 4 for p in head) == sorted([head[0] % 4] * 3 + [head[3] % 4] * 3)
            assert head[:3] == sorted(head[:3]) and head[3:] == sorted(head[3:])
    _assert_same_trace(cpu.attention_trace(query, cache, meta, 0.5, rows, 6, None),
                       attention_trace(query, cache, meta, 0.5, rows, 6, None))


def test_dispatch_runs_the_cpp_kernel_on_cpu_tensors(monkeypatch):
    calls = _spy_on_cpp_kernel(monkeypatch)
    meta, cache = make_batch([1, 5], [9, 5], 2, 16, torch.bfloat16, "cpu", seed=5)
    query = torch.randn(6, 4, 16).to(torch.bfloat16)
    rows = _all_rows(meta)
    got = ferry.kernels.attention_trace(query, cache, meta, 0.25, rows, None)
    assert calls == [0]
    _assert_same_trace(got, attention_trace(query, cache, meta, 0.25, rows, rows.top_k))


def test_dtypes_the_kernel_does_not_take_go_to_the_pytorch_op(monkeypatch):
    calls = _spy_on_cpp_kernel(monkeypatch)
    meta, cache = make_batch([3], [3], 1, 8, torch.float16, "cpu", seed=6)
    query = torch.randn(3, 2, 8).to(torch.float16)
    rows = _all_rows(meta)
    got = ferry.kernels.attention_trace(query, cache, meta, 0.25, rows, None)
    assert calls == []
    _assert_same_trace(got, attention_trace(query, cache, meta, 0.25, rows, rows.top_k))


def test_rows_outside_the_cache_are_refused_not_read():
    _cpp_kernels_or_skip()
    meta, cache = make_batch([1], [6], 1, 8, torch.float32, "cpu", seed=8)
    query = torch.randn(1, 1, 8)
    meta.block_tables[0, 1] = cache.shape[1] + 100               # a block past the cache
    with pytest.raises(ValueError, match="rejected its arguments"):
        cpu.attention_trace(query, cache, meta, 1.0, TraceRows([0], [0], [5]), 8, None)
    too_long = TraceRows([0], [0], [meta.block_tables.shape[1] * meta.block_size])
    with pytest.raises(ValueError, match="rejected its arguments"):
        cpu.attention_trace(query, cache, meta, 1.0, too_long, 8, None)
    with pytest.raises(ValueError, match="outside the batch"):
        cpu.attention_trace(query, cache, meta, 1.0, TraceRows([1], [0], [0]), 8, None)
