"""Decode graphs (ferry/runner/cuda_graphs.py): buckets, padding and static buffers.

On the CPU the capture backend is ``EagerReplay``, which runs the recorded forward again
on the static buffers, as a replayed graph does. That checks everything but the CUDA
capture itself: which steps take a graph, the copies into the static inputs, padding rows
that must neither write the cache nor disturb the real rows, and the attention planned
for max_model_len. Greedy tokens must equal the eager engine's and HF's.
"""
from __future__ import annotations

import logging
import random

import pytest
import torch

from ferry import LLM, SamplingParams, kernels
from ferry.kernels import reference
from ferry.kernels.attn_metadata import AttentionMetadata
from ferry.runner.cuda_graphs import DecodeGraphs, EagerReplay, decode_buckets
from hf_reference import assert_greedy_matches, hf_greedy
from tiny_models import make_tiny_model


def test_buckets_cover_every_batch_size_up_to_max_num_seqs():
    assert decode_buckets(1) == [1]
    assert decode_buckets(10) == [1, 2, 4, 8, 10]
    big = decode_buckets(256)
    assert big[:5] == [1, 2, 4, 8, 16] and big[-1] == 256
    assert all(b - a <= 8 for a, b in zip(big, big[1:]))   # padding wastes < 8 rows


class CountingReplay(EagerReplay):
    def __init__(self):
        self.replays: list[int] = []

    def capture(self, forward):
        super().capture(forward)
        index = len(self.replays)
        self.replays.append(0)

        def replay():
            self.replays[index] += 1
            forward()
        return replay


@pytest.fixture(scope="module")
def mistral_dir(tmp_path_factory):
    # mistral: sliding window 8, so graph rows also exercise the windowed attention
    return str(make_tiny_model("mistral", tmp_path_factory.mktemp("graphs") / "mistral"))


def _prompts():
    rng = random.Random(3)
    return [[rng.randrange(3, 256) for _ in range(rng.randint(4, 30))] for _ in range(7)]


def _skip_on_the_reference_backend():
    if kernels.prepare(torch.device("cpu")) == "reference":
        pytest.skip("the reference attention is never captured "
                    "(test_the_reference_attention_is_never_captured)")


def _generate(llm: LLM, prompts, max_tokens):
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in max_tokens]
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs]


def test_graph_steps_give_the_eager_tokens_and_hf_tokens(mistral_dir):
    _skip_on_the_reference_backend()
    prompts = _prompts()
    max_tokens = [3, 12, 7, 12, 1, 9, 5]     # the batch shrinks: several buckets, with padding
    eager = _generate(LLM(mistral_dir, dtype="float32", kv_cache_memory="16MiB"), prompts, max_tokens)

    llm = LLM(mistral_dir, dtype="float32", kv_cache_memory="16MiB", max_num_seqs=8)
    capture = CountingReplay()
    runner = llm.engine.executor.runner
    assert runner.capture_decode_graphs(max_num_seqs=8, max_model_len=llm.engine.max_model_len,
                                        capture=capture)
    graphs = llm.engine.executor.runner.decode_graphs
    assert graphs.buckets == [1, 2, 4, 8]
    with_graphs = _generate(llm, prompts, max_tokens)

    assert with_graphs == eager
    assert sum(capture.replays) >= 8                     # decode steps replayed graphs
    assert sum(1 for n in capture.replays if n) >= 3     # in several buckets
    for prompt, tokens, n in zip(prompts, with_graphs, max_tokens):
        assert_greedy_matches(tokens, hf_greedy(mistral_dir, prompt, n), "mistral")
    stats = llm.engine.get_stats()
    assert stats.num_running == 0 and stats.kv_cache_usage == 0.0


def test_only_decode_only_steps_within_the_largest_bucket_use_a_graph(mistral_dir):
    llm = LLM(mistral_dir, dtype="float32", kv_cache_memory="16MiB", max_num_seqs=4)
    runner = llm.engine.executor.runner
    graphs = DecodeGraphs(runner.model, runner.kv_caches, max_num_seqs=4, max_model_len=64,
                          block_size=16, device=torch.device("cpu"), capture=EagerReplay())

    def meta(query_lens, width=1):
        n = len(query_lens)
        return AttentionMetadata(torch.zeros(sum(query_lens), dtype=torch.int64),
                                 torch.zeros(n + 1, dtype=torch.int32), torch.ones(n, dtype=torch.int32),
                                 torch.zeros(n, width, dtype=torch.int32), list(query_lens),
                                 [1] * n, sum(q == 1 for q in query_lens), 16)

    assert graphs.bucket_for(meta([1, 1, 1])) == 4
    assert graphs.bucket_for(meta([1])) == 1
    assert graphs.bucket_for(meta([1, 1, 5])) is None          # a prefill chunk: eager
    assert graphs.bucket_for(meta([1] * 5)) is None            # above the largest bucket
    assert graphs.bucket_for(meta([1], width=9)) is None       # longer than max_model_len


def test_a_failed_capture_leaves_the_runner_eager(mistral_dir, caplog):
    class Broken:
        def capture(self, forward):
            raise RuntimeError("operation not permitted when stream is capturing")

    llm = LLM(mistral_dir, dtype="float32", kv_cache_memory="16MiB", max_num_seqs=4)
    with caplog.at_level(logging.WARNING):
        assert not llm.engine.executor.runner.capture_decode_graphs(
            max_num_seqs=4, max_model_len=64, capture=Broken())
    assert llm.engine.executor.runner.decode_graphs is None
    assert "running eagerly" in caplog.text
    prompts = _prompts()[:2]
    assert len(_generate(llm, prompts, [3, 3])) == 2


def test_graphs_with_async_scheduling_fill_placeholders_before_the_copy(mistral_dir):
    """Placeholders are written into input_ids before the graph copies them in."""
    _skip_on_the_reference_backend()
    prompts = _prompts()
    max_tokens = [3, 12, 7, 12, 1, 9, 5]
    eager = _generate(LLM(mistral_dir, dtype="float32", kv_cache_memory="16MiB"), prompts, max_tokens)
    llm = LLM(mistral_dir, dtype="float32", kv_cache_memory="16MiB", max_num_seqs=8,
              async_scheduling="on")
    capture = CountingReplay()
    runner = llm.engine.executor.runner
    assert runner.capture_decode_graphs(max_num_seqs=8, max_model_len=llm.engine.max_model_len,
                                        capture=capture)
    assert _generate(llm, prompts, max_tokens) == eager
    assert sum(capture.replays) >= 8


def test_the_reference_attention_is_never_captured(mistral_dir, caplog, monkeypatch):
    # It groups decode rows by host-side lengths: a replayed graph would attend over the
    # lengths of the step it was captured in.
    llm = LLM(mistral_dir, dtype="float32", kv_cache_memory="16MiB", max_num_seqs=4)
    monkeypatch.setitem(kernels._ops_by_device_type, "cpu", reference)
    capture = CountingReplay()
    with caplog.at_level(logging.WARNING):
        assert not llm.engine.executor.runner.capture_decode_graphs(
            max_num_seqs=4, max_model_len=64, capture=capture)
    assert capture.replays == [] and llm.engine.executor.runner.decode_graphs is None
    assert "reference" in caplog.text and "running eagerly" in caplog.text
