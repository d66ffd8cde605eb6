"""The attention trace op (ferry/kernels/attention_trace.py) against HF transformers'
eager attention weights (``output_attentions=True``) on tiny random models.

ferry runs a prompt and greedy decode steps (chunked prefill included) on the C++ CPU
kernels or on the PyTorch reference; at every attention call the trace op reads that
call's query and paged KV cache. For every layer, head and position (prompt tokens and
the generated tokens fed back), the entropy and the top-k weights must equal those of HF's
attention probabilities within 1e-4 (float32), and each top-k position must carry in HF
the weight ferry reports (ties may order differently).
"""
from __future__ import annotations

import random
from collections import defaultdict

import pytest
import torch

import ferry.kernels
from ferry.kernels import reference
from ferry.engine.debug_trace import entropy_jumps
from ferry.kernels.attention_trace import attention_trace, rows_of_sequences

TOP_K = 4
ATOL = 1e-4


def _traced_run(model_dir: str, prompt: list[int], max_tokens: int, monkeypatch, backend: str):
    """ferry's greedy tokens and {(layer, position): (entropy (H,), positions, weights)}."""
    from ferry import LLM, SamplingParams

    if backend == "reference":
        for name in ferry.kernels.OP_NAMES:
            monkeypatch.setattr(ferry.kernels, name, getattr(reference, name))
    attend = ferry.kernels.paged_attention
    records: dict[tuple[int, int], tuple] = {}
    calls = defaultdict(int)

    def traced(query, kv_cache, meta, scale, sliding_window=None):
        out = attend(query, kv_cache, meta, scale, sliding_window)
        layer = calls["n"] % num_layers
        calls["n"] += 1
        rows = rows_of_sequences(meta, list(range(meta.num_seqs)), include_prompt=True)
        trace = attention_trace(query, kv_cache, meta, scale, rows, TOP_K, sliding_window)
        for i, position in enumerate(rows.positions):
            records[(layer, position)] = (trace.entropy[i], trace.top_positions[i],
                                          trace.top_weights[i])
        return out

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
    tokens, records, num_layers = _traced_run(model_dir, prompt, 5, monkeypatch, backend)
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
